//go:build tools

// Package tools pins the BuildKit commands this module builds: buildkitd (with its runc
// worker) and buildctl.
package tools

import (
	_ "github.com/moby/buildkit/cmd/buildctl"
	_ "github.com/moby/buildkit/cmd/buildkitd"
)
