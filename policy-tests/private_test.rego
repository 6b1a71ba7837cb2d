# Private images: an image an ImageSet pulls with imagePullSecrets is for its namespace only,
# unless settings.sharePrivateImagesWith shares it.
package coral.mutate_test

import data.coral.mutate

# nginx is pulled by an ImageSet in team-a with its pull secret; redis is public.
private_images := object.union(images, {
	"docker.io/library/nginx:1.27": object.union(images["docker.io/library/nginx:1.27"], {
		"imageSets": ["team-a/app"],
		"private": true,
		"namespaces": ["team-a"],
	}),
	"docker.io/library/redis:7.4": {
		"label": redis_label,
		"imageSets": ["shop/web"],
		"private": false,
		"namespaces": [],
		"nodes": {"targeted": 3, "available": 2, "failed": 0},
	},
})

with_both := {
	"nodes": 3,
	"images": {nginx_label: usable(2), redis_label: usable(2)},
	"groups": [{"labels": [nginx_label, redis_label], "nodes": 2}],
}

in_namespace(namespace, always) := object.union(
	placed(inject("selectors,pull-policy"), {"containers": [
		object.union(web, {"imagePullPolicy": always}),
		object.union(cache, {"imagePullPolicy": always}),
	]}, [object.union(web, {"imagePullPolicy": always}), object.union(cache, {"imagePullPolicy": always})], with_both),
	{"namespace": namespace},
)

touches_nginx(patches) if {
	some op in patches
	contains(op.path, "/containers/0/")
}

touches_nginx(patches) if {
	some op in patches
	endswith(op.path, "/nodeSelector")
	op.value[nginx_label]
}

test_another_namespace_gets_nothing_for_a_private_image_and_a_warning if {
	patches := mutate.patch with input as in_namespace("team-b", "Always")
		with data.coral.images as private_images
	not touches_nginx(patches)

	# The public image is still steered to and its pull policy set.
	{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {redis_label: "available"}} in patches
	{"op": "add", "path": "/spec/template/spec/containers/1/imagePullPolicy", "value": "IfNotPresent"} in patches
	warnings := mutate.warn with input as in_namespace("team-b", "Always")
		with data.coral.images as private_images
	some msg in warnings
	contains(msg, `image "nginx:1.27" is private to namespace(s) team-a`)
	contains(msg, `not to "team-b"`)
}

test_the_image_sets_own_namespace_uses_its_private_image if {
	patches := mutate.patch with input as in_namespace("team-a", "Always")
		with data.coral.images as private_images
	{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": {nginx_label: "available", redis_label: "available"}} in patches
	{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"} in patches
	warnings := mutate.warn with input as in_namespace("team-a", "Always")
		with data.coral.images as private_images
	every msg in warnings {
		not contains(msg, "private")
	}
}

test_shared_namespaces_use_private_images if {
	patches := mutate.patch with input as in_namespace("team-b", "Always")
		with data.coral.images as private_images
		with data.coral.settings as settings({"sharePrivateImagesWith": ["team-b"]})
	touches_nginx(patches)
	everyone := mutate.patch with input as in_namespace("team-c", "Always")
		with data.coral.images as private_images
		with data.coral.settings as settings({"sharePrivateImagesWith": ["*"]})
	touches_nginx(everyone)
	others := mutate.patch with input as in_namespace("team-c", "Always")
		with data.coral.images as private_images
		with data.coral.settings as settings({"sharePrivateImagesWith": ["team-b"]})
	not touches_nginx(others)
}
