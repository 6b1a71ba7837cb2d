# Node-selector injection, required (nodeSelector) and preferred (node affinity).
package coral.mutate_test

import data.coral.mutate

test_selector_added_as_new_node_selector if {
	ops := mutate.patch with input as request(inject("selectors"), {}, [web, cache, sidecar])
		with data.coral.images as images
	ops == {{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}}}
}

test_selector_added_to_existing_node_selector if {
	pod_spec := {"nodeSelector": {"kubernetes.io/os": "linux"}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
	ops == {{
		"op": "add", "path": "/spec/template/spec/nodeSelector",
		"value": {"kubernetes.io/os": "linux", nginx_label: "available"},
	}}
}

test_null_node_selector_is_replaced_whole if {
	ops := mutate.patch with input as request(inject("selectors"), {"nodeSelector": null}, [web])
		with data.coral.images as images
	ops == {{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}}}
}

test_wrong_selector_value_is_corrected if {
	pod_spec := {"nodeSelector": {nginx_label: "no"}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
	ops == {{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}}}
}

test_selector_already_present_changes_nothing if {
	pod_spec := {"nodeSelector": {nginx_label: "available"}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
	count(ops) == 0
}

test_init_container_images_are_selected_too if {
	ops := mutate.patch with input as request(inject("selectors"), {}, [init_web])
		with data.coral.images as images
	ops == {{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}}}
}

test_no_selector_for_pull_policy_only if {
	ops := mutate.patch with input as request(inject("pull-policy"), {}, [web])
		with data.coral.images as images
	every op in ops {
		not contains(op.path, "nodeSelector")
	}
}

preferred := settings({"scheduling": "preferred", "preferredWeight": 50})

nginx_term := {
	"weight": 50,
	"preference": {"matchExpressions": [{"key": nginx_label, "operator": "In", "values": ["available"]}]},
}

test_preferred_scheduling_adds_affinity if {
	ops := mutate.patch with input as request(inject("selectors"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	ops == {{
		"op": "add",
		"path": "/spec/template/spec/affinity",
		"value": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [nginx_term]}},
	}}
}

test_preferred_scheduling_adds_node_affinity_to_existing_affinity if {
	pod_spec := {"affinity": {"podAntiAffinity": {}}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	ops == {{
		"op": "add",
		"path": "/spec/template/spec/affinity/nodeAffinity",
		"value": {"preferredDuringSchedulingIgnoredDuringExecution": [nginx_term]},
	}}
}

test_preferred_scheduling_adds_term_list if {
	pod_spec := {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	ops == {{
		"op": "add",
		"path": "/spec/template/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution",
		"value": [nginx_term],
	}}
}

test_preferred_scheduling_appends_to_existing_terms if {
	other := {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [other]}}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	ops == {{
		"op": "add",
		"path": "/spec/template/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution",
		"value": [other, nginx_term],
	}}
}

test_preferred_term_already_present_changes_nothing if {
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [nginx_term]}}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	count(ops) == 0
}

test_preferred_scheduling_adds_no_node_selector if {
	ops := mutate.patch with input as request(inject("selectors"), {}, [web])
		with data.coral.images as images
		with data.coral.settings as preferred
	every op in ops {
		not contains(op.path, "nodeSelector")
	}
}
