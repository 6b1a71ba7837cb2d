# The mirror injection: a ready copy is pulled from the mirror, anything else from the source.
package coral.mutate_test

import data.coral.mutate

mirror_ref := "localhost:30500/docker.io/library/nginx:1.27"

# nginx is mirrored into Registry local; ready: the copy is there and the Registry answers.
mirrored_images(ready) := object.union(images, {"docker.io/library/nginx:1.27": object.union(
	images["docker.io/library/nginx:1.27"],
	{"mirror": {"reference": mirror_ref, "digest": "sha256:aaaa", "registry": "local", "ready": ready}},
)})

mirrors := {mirror_ref: "docker.io/library/nginx:1.27"}

# The mirror injection rewrites Pods: a Pod of these annotations and containers, placed as
# `everywhere`.
pod(annotations, containers) := object.union(request(annotations, {}, containers), {
	"kind": {"group": "", "version": "v1", "kind": "Pod"},
	"pod_spec_path": "/spec",
	"object": {
		"apiVersion": "v1",
		"kind": "Pod",
		"metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
		"spec": {},
	},
})

# `key` is the managed image: the source's, for a mirror reference (Coral sets it from
# data.coral.mirrors).
pod_container(index, name, image, normalized, key) := {
	"name": name,
	"list": "containers",
	"index": index,
	"path": sprintf("/spec/containers/%d", [index]),
	"image": image,
	"normalized": normalized,
	"key": key,
}

pod_web := pod_container(0, "web", "nginx:1.27", "docker.io/library/nginx:1.27", "docker.io/library/nginx:1.27")

pod_cache := pod_container(1, "cache", "redis:7.4", "docker.io/library/redis:7.4", "docker.io/library/redis:7.4")

# A container already rewritten to the mirror.
from_the_mirror := pod_container(0, "web", mirror_ref, mirror_ref, "docker.io/library/nginx:1.27")

web_image_ops(patches) := {op | some op in patches; op.path == "/spec/containers/0/image"}

test_a_ready_copy_is_pulled_from_the_mirror if {
	patches := mutate.patch with input as pod(inject("mirror"), [pod_web, pod_cache])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
	patches == {{"op": "replace", "path": "/spec/containers/0/image", "value": mirror_ref}}
}

test_a_copy_that_is_not_ready_leaves_the_image_alone_and_says_why if {
	patches := mutate.patch with input as pod(inject("mirror"), [pod_web])
		with data.coral.images as mirrored_images(false)
		with data.coral.mirrors as mirrors
	count(patches) == 0
	warnings := mutate.warn with input as pod(inject("mirror"), [pod_web])
		with data.coral.images as mirrored_images(false)
		with data.coral.mirrors as mirrors
	`container "web": image "nginx:1.27" is not ready in mirror Registry local; left unchanged` in warnings
}

test_a_mirror_reference_whose_copy_is_not_ready_goes_back_to_its_source if {
	# Whatever the injections: a pod made from a template rewritten earlier.
	patches := mutate.patch with input as pod(inject("selectors"), [from_the_mirror])
		with data.coral.images as mirrored_images(false)
		with data.coral.mirrors as mirrors
	web_image_ops(patches) == {{"op": "replace", "path": "/spec/containers/0/image", "value": "docker.io/library/nginx:1.27"}}
	warnings := mutate.warn with input as pod(inject("selectors"), [from_the_mirror])
		with data.coral.images as mirrored_images(false)
		with data.coral.mirrors as mirrors
	`container "web": the mirror's copy of "docker.io/library/nginx:1.27" is not ready; it pulls from the source` in warnings

	# An object that opts out is left as written.
	none := mutate.patch with input as pod(inject("none"), [from_the_mirror])
		with data.coral.images as mirrored_images(false)
		with data.coral.mirrors as mirrors
	count(none) == 0
}

test_a_pod_running_the_mirror_runs_the_same_image if {
	# Steered to the nodes holding nginx, and left on the mirror: nothing more to change.
	patches := mutate.patch with input as pod(inject("selectors,mirror"), [from_the_mirror])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
	count(web_image_ops(patches)) == 0
	{"op": "add", "path": "/spec/nodeSelector", "value": {nginx_label: "available"}} in patches
	warnings := mutate.warn with input as pod(inject("selectors,mirror"), [from_the_mirror])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
		with data.coral.settings as settings({"warnUnmanaged": true})
	every msg in warnings {
		not contains(msg, "not managed")
	}
}

test_selectors_pull_policy_and_mirror_together if {
	patches := mutate.patch with input as pod(inject("selectors,pull-policy,mirror"), [pod_web])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
	{"op": "replace", "path": "/spec/containers/0/image", "value": mirror_ref} in patches
	{"op": "add", "path": "/spec/nodeSelector", "value": {nginx_label: "available"}} in patches
	{"op": "add", "path": "/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"} in patches
}

test_a_private_image_is_never_pulled_from_the_mirror if {
	private := object.union(mirrored_images(true), {"docker.io/library/nginx:1.27": object.union(
		mirrored_images(true)["docker.io/library/nginx:1.27"],
		{"private": true, "namespaces": ["shop"]},
	)})
	patches := mutate.patch with input as pod(inject("mirror"), [pod_web])
		with data.coral.images as private
		with data.coral.mirrors as mirrors
	count(patches) == 0
	warnings := mutate.warn with input as pod(inject("mirror"), [pod_web])
		with data.coral.images as private
		with data.coral.mirrors as mirrors
	`container "web": image "nginx:1.27" is private; it pulls from its source with the pod's pull secrets, not from the mirror` in warnings
}

test_a_workload_template_keeps_its_images_and_says_where_the_injection_applies if {
	patches := mutate.patch with input as request(inject("mirror"), {}, [web])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
	count(patches) == 0
	warnings := mutate.warn with input as request(inject("mirror"), {}, [web])
		with data.coral.images as mirrored_images(true)
		with data.coral.mirrors as mirrors
	some msg in warnings
	startswith(msg, "mirror: the injection rewrites Pods")
}
