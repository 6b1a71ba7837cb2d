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

test_never_without_selectors_becomes_if_not_present_and_warns if {
	req := request(inject("pull-policy"), {}, [web])
	ops := mutate.patch with input as req
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	ops == {{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"}}
	warnings := mutate.warn with input as req
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	warnings == {`container "web": imagePullPolicy IfNotPresent, not Never: not every node the pod may run on holds "nginx:1.27"`}
}

test_never_with_selectors_does_not_warn if {
	warnings := mutate.warn with input as request(inject("pull-policy,selectors"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	count(warnings) == 0
}

test_never_when_the_pods_own_constraints_require_the_image if {
	# Every node the pod may use holds nginx: its own node affinity asks for it.
	on_all := {"nodes": 2, "images": {nginx_label: usable(2)}, "groups": [{"labels": [nginx_label], "nodes": 2}]}
	ops := mutate.patch with input as placed(inject("pull-policy"), {}, [web], on_all)
		with data.coral.images as images
		with data.coral.settings as settings({"pullPolicy": "Never"})
	ops == {{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"}}
}

test_never_only_for_the_images_steered_to if {
	# nginx and redis are on different nodes: the pod is steered to redis (more nodes), so
	# only the redis container gets Never.
	apart := {
		"nodes": 3,
		"images": {nginx_label: usable(1), redis_label: usable(2)},
		"groups": [{"labels": [nginx_label], "nodes": 1}, {"labels": [redis_label], "nodes": 2}],
	}
	on_two := json.patch(images, [{"op": "replace", "path": "/docker.io~1library~1redis:7.4/nodes/available", "value": 2}])
	ops := mutate.patch with input as placed(inject("pull-policy,selectors"), {}, [web, cache], apart)
		with data.coral.images as on_two
		with data.coral.settings as settings({"pullPolicy": "Never"})
	ops == {
		{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {redis_label: "available"}},
		{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"},
		{"op": "add", "path": "/spec/template/spec/containers/1/imagePullPolicy", "value": "Never"},
	}
}
