//go:build tools

// Package tools pins the Helm release scripts/helm.sh builds: the chart's tests render it with
// `helm template` and check it with `helm lint --strict`.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
