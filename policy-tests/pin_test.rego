# The pin injection: a managed image runs by the one digest its holders agree on.
package coral.mutate_test

import data.coral.mutate

digest_a := "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

digest_b := "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

# nginx held under `digests` (Coral sets `digest` when there is exactly one).
held_under(digests) := object.union(images, {"docker.io/library/nginx:1.27": object.union(
	images["docker.io/library/nginx:1.27"],
	{"digests": digests, "digest": agreed(digests)},
)})

agreed(digests) := digests[0] if count(digests) == 1

agreed(digests) := null if count(digests) != 1

# nginx pinned already; Coral's key is the image it pins.
pinned_web := object.union(web, {
	"image": concat("", ["nginx:1.27@", digest_a]),
	"normalized": concat("", ["docker.io/library/nginx:1.27@", digest_a]),
})

image_ops(patches) := {op | some op in patches; endswith(op.path, "/image")}

test_an_image_every_holder_agrees_on_is_pinned_and_still_steered_to if {
	patches := mutate.patch with input as request(inject("pin,selectors"), {}, [web, cache, sidecar])
		with data.coral.images as held_under([digest_a])
	patches == {
		{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": concat("", ["nginx:1.27@", digest_a])},
		{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}},
	}
}

test_an_image_held_under_different_digests_is_not_pinned_and_the_warning_names_them if {
	patches := mutate.patch with input as request(inject("pin"), {}, [web])
		with data.coral.images as held_under([digest_a, digest_b])
	count(image_ops(patches)) == 0
	warnings := mutate.warn with input as request(inject("pin"), {}, [web])
		with data.coral.images as held_under([digest_a, digest_b])
	warnings == {sprintf(`container "web": image "nginx:1.27" is held under different digests (%s, %s); not pinned`, [digest_a, digest_b])}
}

test_an_image_no_node_reports_a_digest_for_is_not_pinned if {
	patches := mutate.patch with input as request(inject("pin"), {}, [web])
		with data.coral.images as held_under([])
	count(patches) == 0
	warnings := mutate.warn with input as request(inject("pin"), {}, [web])
		with data.coral.images as held_under([])
	warnings == {`container "web": no node reports a digest for image "nginx:1.27" yet; not pinned`}
}

test_a_pinned_reference_is_left_alone_and_is_the_same_image_for_placement if {
	patches := mutate.patch with input as request(inject("pin,selectors"), {}, [pinned_web])
		with data.coral.images as held_under([digest_a])
	patches == {{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}}}

	# The stale-key rule: the pinned image's entry stays, an unmanaged one's goes.
	pod_spec := {"nodeSelector": {nginx_label: "available", redis_label: "available"}}
	kept := mutate.patch with input as request(inject("pull-policy"), pod_spec, [pinned_web])
		with data.coral.images as held_under([digest_a])
	{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available"}} in kept
}

test_unmanaged_and_unselected_images_are_not_pinned if {
	annotations := object.union(inject("pin"), {"coral.dev/exclude-containers": "web"})
	patches := mutate.patch with input as request(annotations, {}, [web, sidecar])
		with data.coral.images as held_under([digest_a])
	count(patches) == 0
}

test_a_pod_run_from_the_mirror_is_pinned_to_the_digest_the_mirror_serves if {
	mirrored := object.union(held_under([digest_a]), {"docker.io/library/nginx:1.27": object.union(
		held_under([digest_a])["docker.io/library/nginx:1.27"],
		{"mirror": {"reference": mirror_ref, "digest": digest_b, "registry": "local", "ready": true}},
	)})
	patches := mutate.patch with input as pod(inject("mirror,pin"), [pod_web])
		with data.coral.images as mirrored
		with data.coral.mirrors as mirrors
	patches == {{"op": "replace", "path": "/spec/containers/0/image", "value": concat("", [mirror_ref, "@", digest_b])}}

	# Pinned without the mirror: the source by its own digest.
	source := mutate.patch with input as pod(inject("pin"), [pod_web])
		with data.coral.images as mirrored
		with data.coral.mirrors as mirrors
	source == {{"op": "replace", "path": "/spec/containers/0/image", "value": concat("", ["nginx:1.27@", digest_a])}}
}

test_a_pod_already_on_the_mirror_is_pinned_there_and_then_left_alone if {
	mirrored := object.union(held_under([digest_a]), {"docker.io/library/nginx:1.27": object.union(
		held_under([digest_a])["docker.io/library/nginx:1.27"],
		{"mirror": {"reference": mirror_ref, "digest": digest_b, "registry": "local", "ready": true}},
	)})
	patches := mutate.patch with input as pod(inject("pin"), [from_the_mirror])
		with data.coral.images as mirrored
		with data.coral.mirrors as mirrors
	patches == {{"op": "replace", "path": "/spec/containers/0/image", "value": concat("", [mirror_ref, "@", digest_b])}}

	pinned_copy := object.union(from_the_mirror, {
		"image": concat("", [mirror_ref, "@", digest_b]),
		"normalized": concat("", [mirror_ref, "@", digest_b]),
	})
	again := mutate.patch with input as pod(inject("mirror,pin"), [pinned_copy])
		with data.coral.images as mirrored
		with data.coral.mirrors as mirrors
	count(again) == 0
}

test_a_mirror_reference_whose_copy_is_not_ready_goes_back_to_its_source_unpinned if {
	not_ready := object.union(held_under([digest_a]), {"docker.io/library/nginx:1.27": object.union(
		held_under([digest_a])["docker.io/library/nginx:1.27"],
		{"mirror": {"reference": mirror_ref, "digest": digest_a, "registry": "local", "ready": false}},
	)})
	patches := mutate.patch with input as pod(inject("mirror,pin"), [from_the_mirror])
		with data.coral.images as not_ready
		with data.coral.mirrors as mirrors
	image_ops(patches) == {{"op": "replace", "path": "/spec/containers/0/image", "value": "docker.io/library/nginx:1.27"}}
}
