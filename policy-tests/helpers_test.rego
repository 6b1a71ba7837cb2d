# Shared fixtures of the default-policy tests.
package coral.mutate_test

nginx_label := "image.coral.dev/nginx"

redis_label := "image.coral.dev/redis"

# nginx is on two nodes, redis (managed) on none, busybox is not managed.
images := {
	"docker.io/library/nginx:1.27": {
		"label": nginx_label,
		"imageSets": ["shop/web"],
		"nodes": {"targeted": 3, "available": 2, "failed": 0},
	},
	"docker.io/library/redis:7.4": {
		"label": redis_label,
		"imageSets": ["shop/web"],
		"nodes": {"targeted": 3, "available": 0, "failed": 1},
	},
}

spec_path := "/spec/template/spec"

container(list, index, name, image, normalized) := {
	"name": name,
	"list": list,
	"index": index,
	"path": sprintf("%s/%s/%d", [spec_path, list, index]),
	"image": image,
	"normalized": normalized,
	"key": normalized,
}

web := container("containers", 0, "web", "nginx:1.27", "docker.io/library/nginx:1.27")

cache := container("containers", 1, "cache", "redis:7.4", "docker.io/library/redis:7.4")

sidecar := container("containers", 2, "sidecar", "busybox:1.36", "docker.io/library/busybox:1.36")

init_web := container("initContainers", 0, "setup", "nginx:1.27", "docker.io/library/nginx:1.27")

debug := container("ephemeralContainers", 0, "debug", "nginx:1.27", "docker.io/library/nginx:1.27")

# Where the pod may run, as Coral computes it per request: three nodes it may use, two of
# them holding nginx; redis is on none.
everywhere := {
	"nodes": 3,
	"images": {
		nginx_label: usable(2),
		redis_label: usable(0),
	},
	"groups": [{"labels": [nginx_label], "nodes": 2}],
}

# An image on n nodes, all of which the pod may use.
usable(n) := {"held": n, "nodes": n, "cordoned": 0, "tainted": 0, "unselected": 0}

# An input for a Deployment with these annotations, pod spec and containers, placed as
# `everywhere`.
request(annotations, pod_spec, containers) := placed(annotations, pod_spec, containers, everywhere)

# The same with its own placement.
placed(annotations, pod_spec, containers, placement) := {
	"operation": "CREATE",
	"kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
	"namespace": "shop",
	"pod_spec_path": spec_path,
	"object": {
		"apiVersion": "apps/v1",
		"kind": "Deployment",
		"metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
		"spec": {"template": {"spec": pod_spec}},
	},
	"containers": containers,
	"placement": placement,
}

inject(value) := {"coral.dev/inject": value}

# The default settings with some fields replaced.
settings(overrides) := object.union(data.coral.settings, overrides)
