# Pull-policy injection.
package coral.mutate_test

import data.coral.mutate

test_pull_policy_set_on_available_containers if {
	ops := mutate.patch with input as request(inject("pull-policy"), {}, [web, cache, sidecar, init_web])
		with data.coral.images as images
	ops == {
		{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"},
		{"op": "add", "path": "/spec/template/spec/initContainers/0/imagePullPolicy", "value": "IfNotPresent"},
	}
}

test_pull_policy_never_from_settings if {
	ops := mutate.patch with input as request(inject("selectors,pull-policy"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"} in ops
}

test_pull_policy_replaces_always if {
	always := object.union(web, {"imagePullPolicy": "Always"})
	ops := mutate.patch with input as request(inject("pull-policy"), {}, [always])
		with data.coral.images as images
	ops == {{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"}}
}

test_pull_policy_already_set_changes_nothing if {
	done := object.union(web, {"imagePullPolicy": "IfNotPresent"})
	ops := mutate.patch with input as request(inject("pull-policy"), {}, [done])
		with data.coral.images as images
	count(ops) == 0
}

test_pull_policy_not_set_on_ephemeral_containers if {
	ops := mutate.patch with input as request(inject("pull-policy"), {}, [debug])
		with data.coral.images as images
	count(ops) == 0
}

test_never_without_selectors_warns if {
	warnings := mutate.warn with input as request(inject("pull-policy"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	warnings == {`container "web": imagePullPolicy Never without selectors injection; the pod may land on a node without "nginx:1.27" and fail to start`}
}

test_never_with_selectors_does_not_warn if {
	warnings := mutate.warn with input as request(inject("pull-policy,selectors"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	count(warnings) == 0
}
