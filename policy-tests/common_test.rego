# Which injections apply, to which containers, and the warnings of common.rego.
package coral.mutate_test

import data.coral.mutate

test_nothing_changes_without_annotation if {
	ops := mutate.patch with input as request({}, {}, [web]) with data.coral.images as images
	count(ops) == 0
	warnings := mutate.warn with input as request({}, {}, [web]) with data.coral.images as images
	count(warnings) == 0
}

test_annotation_list_is_trimmed if {
	got := mutate.requested_injections with input as request(inject(" selectors ,, pull-policy "), {}, [])
	got == {"selectors", "pull-policy"}
}

test_default_inject_applies_without_annotation if {
	got := mutate.requested_injections with input as request({}, {}, [])
		with data.coral.settings as settings({"defaultInject": ["selectors"]})
	got == {"selectors"}
}

test_annotation_overrides_default_inject if {
	got := mutate.requested_injections with input as request(inject("none"), {}, [])
		with data.coral.settings as settings({"defaultInject": ["selectors"]})
	got == {"none"}
	ops := mutate.patch with input as request(inject(""), {}, [web])
		with data.coral.settings as settings({"defaultInject": ["selectors"]})
		with data.coral.images as images
	count(ops) == 0
}

test_unknown_injection_warns if {
	warnings := mutate.warn with input as request(inject("selectors,mirrors"), {}, [])
	warnings == {`coral.dev/inject: unknown injection "mirrors" ignored (known: none, mirror, pin, pull-policy, selectors)`}
}

test_every_container_selected_by_default if {
	got := mutate.selected with input as request(inject("selectors"), {}, [web, cache, init_web])
	got == {0, 1, 2}
}

test_ephemeral_containers_never_selected if {
	got := mutate.selected with input as request(inject("selectors"), {}, [web, debug])
	got == {0}
}

test_exclude_containers if {
	annotations := object.union(inject("selectors"), {"coral.dev/exclude-containers": "cache, setup"})
	got := mutate.selected with input as request(annotations, {}, [web, cache, init_web])
	got == {0}
}

test_include_containers_wins_over_exclude if {
	annotations := object.union(inject("selectors"), {
		"coral.dev/include-containers": "cache",
		"coral.dev/exclude-containers": "cache",
	})
	got := mutate.selected with input as request(annotations, {}, [web, cache])
	got == {1}
}

test_unmanaged_image_warns_and_is_left_alone if {
	req := request(inject("selectors,pull-policy"), {}, [sidecar])
	ops := mutate.patch with input as req with data.coral.images as images
	count(ops) == 0
	warnings := mutate.warn with input as req with data.coral.images as images
	warnings == {`container "sidecar": image "busybox:1.36" is not managed by any ImageSet; left unchanged`}
}

test_unmanaged_warning_can_be_turned_off if {
	warnings := mutate.warn with input as request(inject("selectors"), {}, [sidecar])
		with data.coral.images as images
		with data.coral.settings as settings({"warnUnmanaged": false})
	count(warnings) == 0
}

test_image_below_min_available_nodes_warns if {
	req := request(inject("selectors"), {}, [cache])
	ops := mutate.patch with input as req with data.coral.images as images
	count(ops) == 0
	warnings := mutate.warn with input as req with data.coral.images as images
	warnings == {`container "cache": image "redis:7.4" not steered to: no node holds it yet; left unchanged`}
}

test_min_available_nodes_setting_is_honoured if {
	req := request(inject("selectors"), {}, [web])
	ops := mutate.patch with input as req with data.coral.images as images
		with data.coral.settings as settings({"minAvailableNodes": 3})
	count(ops) == 0
	warnings := mutate.warn with input as req with data.coral.images as images
		with data.coral.settings as settings({"minAvailableNodes": 3})
	count(warnings) == 1
}

test_invalid_image_warns if {
	bad := {"name": "bad", "list": "containers", "index": 0, "path": "/spec/template/spec/containers/0", "image": "Bad:Image", "error": "invalid reference"}
	warnings := mutate.warn with input as request(inject("selectors"), {}, [bad]) with data.coral.images as images
	warnings == {`container "bad": invalid reference; left unchanged`}
}

test_no_warnings_without_injection if {
	warnings := mutate.warn with input as request(inject("none"), {}, [sidecar, cache])
		with data.coral.images as images
	count(warnings) == 0
}

test_pointer_segment_escapes if {
	mutate.pointer_segment("image.coral.dev/a~b") == "image.coral.dev~1a~0b"
}
