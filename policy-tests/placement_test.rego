# Placement safety: the stranding cases, stale keys, and positive controls. input.placement
# is given as Coral computes it for the pod (see the README, "Placement").
package coral.mutate_test

import data.coral.mutate

nginx_next_label := "image.coral.dev/nginx-next"

managed := object.union(images, {
	"docker.io/library/nginx:1.28": {
		"label": nginx_next_label,
		"imageSets": ["shop/web"],
		"nodes": {"targeted": 3, "available": 2, "failed": 0},
	},
	"docker.io/library/redis:7.4": {
		"label": redis_label,
		"imageSets": ["shop/web"],
		"nodes": {"targeted": 3, "available": 1, "failed": 0},
	},
})

web_next := container("containers", 0, "web", "nginx:1.28", "docker.io/library/nginx:1.28")

selector_op(value) := {"op": "add", "path": "/spec/template/spec/nodeSelector", "value": value}

# Node a holds nginx, node b holds redis.
apart := {
	"nodes": 2,
	"images": {nginx_label: usable(1), redis_label: usable(1)},
	"groups": [{"labels": [nginx_label], "nodes": 1}, {"labels": [redis_label], "nodes": 1}],
}

test_images_on_different_nodes_steer_to_one_of_them_and_warn_about_the_other if {
	req := placed(inject("selectors"), {}, [web, cache], apart)
	ops := mutate.patch with input as req with data.coral.images as managed
	ops == {selector_op({nginx_label: "available"})}
	warnings := mutate.warn with input as req with data.coral.images as managed
	warnings == {`container "cache": image "redis:7.4" not steered to: 1 usable node(s) hold it, but fewer than 1 hold it together with "nginx:1.27"; left unchanged`}
}

test_the_combination_with_more_nodes_wins if {
	wider := json.patch(apart, [
		{"op": "replace", "path": "/images/image.coral.dev~1redis", "value": usable(3)},
		{"op": "replace", "path": "/groups/1/nodes", "value": 3},
		{"op": "replace", "path": "/nodes", "value": 4},
	])
	ops := mutate.patch with input as placed(inject("selectors"), {}, [web, cache], wider)
		with data.coral.images as managed
	ops == {selector_op({redis_label: "available"})}
}

test_a_node_holding_every_image_gets_every_label if {
	together := {
		"nodes": 3,
		"images": {nginx_label: usable(2), redis_label: usable(1)},
		"groups": [{"labels": [nginx_label], "nodes": 1}, {"labels": [nginx_label, redis_label], "nodes": 1}],
	}
	ops := mutate.patch with input as placed(inject("selectors"), {}, [web, cache], together)
		with data.coral.images as managed
	ops == {selector_op({nginx_label: "available", redis_label: "available"})}
}

test_min_available_nodes_applies_to_the_combination if {
	# Two nodes hold both images, three more nginx alone: with minAvailableNodes 3 only nginx.
	mixed := {
		"nodes": 5,
		"images": {nginx_label: usable(5), redis_label: usable(2)},
		"groups": [{"labels": [nginx_label], "nodes": 3}, {"labels": [nginx_label, redis_label], "nodes": 2}],
	}
	req := placed(inject("selectors"), {}, [web, cache], mixed)
	ops := mutate.patch with input as req
		with data.coral.images as managed
		with data.coral.settings as settings({"minAvailableNodes": 3})
	ops == {selector_op({nginx_label: "available"})}
	ops_two := mutate.patch with input as req
		with data.coral.images as managed
		with data.coral.settings as settings({"minAvailableNodes": 2})
	ops_two == {selector_op({nginx_label: "available", redis_label: "available"})}
}

# Where nginx's two nodes are, and why the pod may not use them.
ruled_out(reasons) := {
	"nodes": 1,
	"images": {nginx_label: object.union({"held": 2, "nodes": 0, "cordoned": 0, "tainted": 0, "unselected": 0}, reasons)},
	"groups": [],
}

test_an_image_only_outside_the_pods_node_selector_is_not_steered_to if {
	pod_spec := {"nodeSelector": {"pool": "db"}}
	req := placed(inject("selectors"), pod_spec, [web], ruled_out({"unselected": 2}))
	ops := mutate.patch with input as req with data.coral.images as images
	count(ops) == 0
	warnings := mutate.warn with input as req with data.coral.images as images
	warnings == {`container "web": image "nginx:1.27" not steered to: 2 node(s) hold it, 0 of them usable by this pod (0 cordoned, 0 with taints it does not tolerate, 2 outside its nodeSelector, node affinity or nodeName); minAvailableNodes is 1; left unchanged`}
}

test_an_image_only_on_tainted_nodes_is_not_steered_to if {
	req := placed(inject("selectors"), {}, [web], ruled_out({"tainted": 2}))
	count(mutate.patch) == 0 with input as req with data.coral.images as images
	some msg in mutate.warn with input as req with data.coral.images as images
	contains(msg, "2 with taints it does not tolerate")
}

test_an_image_only_on_cordoned_nodes_is_not_steered_to if {
	req := placed(inject("selectors"), {}, [web], ruled_out({"cordoned": 2}))
	count(mutate.patch) == 0 with input as req with data.coral.images as images
	some msg in mutate.warn with input as req with data.coral.images as images
	contains(msg, "(2 cordoned,")
}

test_a_tolerated_taint_keeps_the_label if {
	# Coral counts the tainted nodes as usable when the pod tolerates the taint.
	tolerated := {"nodes": 2, "images": {nginx_label: usable(2)}, "groups": [{"labels": [nginx_label], "nodes": 2}]}
	pod_spec := {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}
	ops := mutate.patch with input as placed(inject("selectors"), pod_spec, [web], tolerated)
		with data.coral.images as images
	ops == {selector_op({nginx_label: "available"})}
}

test_an_updated_image_replaces_its_stale_key if {
	# kubectl set image leaves the old key in the template; the pod must not need both.
	pod_spec := {"nodeSelector": {"pool": "web", nginx_label: "available"}}
	next := {"nodes": 2, "images": {nginx_next_label: usable(2)}, "groups": [{"labels": [nginx_next_label], "nodes": 2}]}
	req := placed(inject("selectors"), pod_spec, [web_next], next)
	ops := mutate.patch with input as req with data.coral.images as managed
	ops == {selector_op({"pool": "web", nginx_next_label: "available"})}
}

test_stale_keys_go_without_any_injection if {
	pod_spec := {"nodeSelector": {"pool": "web", nginx_label: "available", nginx_next_label: "available"}}
	req := placed({}, pod_spec, [web_next], everywhere)
	ops := mutate.patch with input as req with data.coral.images as managed
	ops == {selector_op({"pool": "web", nginx_next_label: "available"})}
}

test_keys_of_images_no_longer_managed_go if {
	# The ImageSet of nginx was deleted: its key must not keep the pod from scheduling.
	pod_spec := {"nodeSelector": {nginx_label: "available"}}
	req := placed({}, pod_spec, [web], everywhere)
	ops := mutate.patch with input as req with data.coral.images as {}
	ops == {{"op": "remove", "path": "/spec/template/spec/nodeSelector"}}
}

test_keys_that_are_not_corals_are_never_touched if {
	pod_spec := {"nodeSelector": {"pool": "web", "image.example.com/x": "yes"}}
	req := placed({}, pod_spec, [web], everywhere)
	count(mutate.patch) == 0 with input as req with data.coral.images as {}
}

test_an_infeasible_key_is_taken_back_when_selectors_are_injected if {
	pod_spec := {"nodeSelector": {"pool": "db", nginx_label: "available"}}
	req := placed(inject("selectors"), pod_spec, [web], ruled_out({"unselected": 2}))
	ops := mutate.patch with input as req with data.coral.images as images
	ops == {selector_op({"pool": "db"})}
}

coral_term(weight, keys) := {
	"weight": weight,
	"preference": {"matchExpressions": [{"key": k, "operator": "In", "values": ["available"]} | some k in keys]},
}

user_term := {"weight": 5, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}

terms_path := "/spec/template/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution"

test_stale_preferred_terms_go_and_user_terms_stay if {
	stale := coral_term(100, [nginx_label])
	mixed := coral_term(100, [nginx_label, nginx_next_label])
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [user_term, stale, mixed]}}}
	ops := mutate.patch with input as placed({}, pod_spec, [web_next], everywhere)
		with data.coral.images as managed
	ops == {{"op": "add", "path": terms_path, "value": [user_term, coral_term(100, [nginx_next_label])]}}
}

test_preferred_steering_replaces_corals_terms_with_one if {
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [coral_term(100, [redis_label]), user_term]}}}
	ops := mutate.patch with input as placed(inject("selectors"), pod_spec, [web], everywhere)
		with data.coral.images as managed
		with data.coral.settings as settings({"scheduling": "preferred"})
	ops == {{"op": "add", "path": terms_path, "value": [user_term, coral_term(100, [nginx_label])]}}
}

test_the_last_coral_term_going_removes_the_list if {
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [coral_term(100, [nginx_label])]}}}
	ops := mutate.patch with input as placed({}, pod_spec, [web], everywhere)
		with data.coral.images as {}
	ops == {{"op": "remove", "path": terms_path}}
}

test_a_pod_is_judged_the_same_way if {
	pod := {
		"operation": "CREATE",
		"kind": {"group": "", "version": "v1", "kind": "Pod"},
		"namespace": "shop",
		"pod_spec_path": "/spec",
		"object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": inject("selectors")}, "spec": {}},
		"containers": [object.union(web, {"path": "/spec/containers/0"}), object.union(cache, {"path": "/spec/containers/1"})],
		"placement": apart,
	}
	ops := mutate.patch with input as pod with data.coral.images as managed
	ops == {{"op": "add", "path": "/spec/nodeSelector", "value": {nginx_label: "available"}}}
}

test_no_placement_means_no_steering if {
	req := object.remove(request(inject("selectors"), {}, [web]), ["placement"])
	count(mutate.patch) == 0 with input as req with data.coral.images as images
}

test_corals_terms_for_images_still_run_stay_without_injection if {
	pod_spec := {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [coral_term(100, [nginx_label])]}}}
	count(mutate.patch) == 0 with input as placed({}, pod_spec, [web], everywhere)
		with data.coral.images as images
}

test_preferred_steering_drops_hard_entries_the_pod_cannot_be_steered_to if {
	# Left from required scheduling: nginx (feasible) stays, redis (on no node) goes.
	pod_spec := {"nodeSelector": {nginx_label: "available", redis_label: "available"}}
	ops := mutate.patch with input as request(inject("selectors"), pod_spec, [web, cache])
		with data.coral.images as images
		with data.coral.settings as settings({"scheduling": "preferred"})
	{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}} in ops
}
