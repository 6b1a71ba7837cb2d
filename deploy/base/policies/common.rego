# Helpers shared by the default policies: which injections an object asks for, which of its
# containers they apply to, and whether a container's image is managed and available.
#
# input:       one admission request (see the README, "Policy input"). Images are looked up
#              by each container's `key`: its normalized reference, or for a mirror reference
#              the source image it is a copy of (data.coral.mirrors), so that mirrored or not
#              it is one image: the same label, the same decisions.
# data.coral:  images, nodes and settings (see the README, "Policy data").
package coral.mutate

settings := data.coral.settings

annotations := object.get(input.object, ["metadata", "annotations"], {})

# Comma-separated annotation value as a set, spaces trimmed, empty entries dropped.
annotation_list(key) := {name |
	some item in split(annotations[key], ",")
	name := trim_space(item)
	name != ""
}

# Injections the object asks for: its coral.dev/inject annotation, else the cluster default.
requested_injections := annotation_list("coral.dev/inject") if {
	is_string(annotations["coral.dev/inject"])
} else := {name | some name in settings.defaultInject}

known_injections := {"selectors", "pull-policy", "mirror", "pin"}

# "none" opts an object out of a cluster-wide defaultInject.
opt_out := "none"

inject_selectors if "selectors" in requested_injections

inject_pull_policy if "pull-policy" in requested_injections

inject_mirror if "mirror" in requested_injections

inject_pin if "pin" in requested_injections

opted_out if opt_out in requested_injections

injecting if count(requested_injections & known_injections) > 0

# Indexes (into input.containers) of the containers the injections apply to.
# coral.dev/include-containers, when present, names them (and wins over exclude); otherwise
# every container not named in coral.dev/exclude-containers. Ephemeral containers are never
# changed. Sets of indexes rather than of containers keep set operations cheap.
selected contains i if {
	has_include
	some i, c in input.containers
	c.list != "ephemeralContainers"
	c.name in include_containers
}

selected contains i if {
	not has_include
	some i, c in input.containers
	c.list != "ephemeralContainers"
	not c.name in exclude_containers
}

has_include if is_string(annotations["coral.dev/include-containers"])

include_containers := annotation_list("coral.dev/include-containers")

exclude_containers := annotation_list("coral.dev/exclude-containers")

# Private images: an image an ImageSet pulls with imagePullSecrets is for the pods of that
# ImageSet's namespace (info.namespaces) and of the namespaces settings.sharePrivateImagesWith
# names ("*": every namespace). A pod elsewhere is neither steered to it nor told not to pull
# it, so the registry still decides whether it may have the image.
# One chain: a public image (the common case) is decided by its first test.
may_use(info) := true if {
	not info.private
} else := true if {
	input.namespace in info.namespaces
} else := true if {
	shares_private_images
}

# Computed once per decision.
shares_private_images if input.namespace in object.get(settings, "sharePrivateImagesWith", [])

shares_private_images if "*" in object.get(settings, "sharePrivateImagesWith", [])

# Selected containers whose image is managed and may be used in the pod's namespace.
usable contains i if {
	injecting
	some i in selected
	may_use(data.coral.images[input.containers[i].key])
}

# Of those, the containers whose image is held by at least settings.minAvailableNodes nodes.
available contains i if {
	some i in usable
	data.coral.images[input.containers[i].key].nodes.available >= settings.minAvailableNodes
}

# The pod spec of the object, wherever its kind keeps it.
pod_spec := object.get(input.object, split(trim_prefix(input.pod_spec_path, "/"), "/"), {})

# A label key as one JSON-pointer segment (RFC 6901).
pointer_segment(s) := replace(replace(s, "~", "~0"), "/", "~1")

warn contains msg if {
	some name in requested_injections
	not name in known_injections
	name != opt_out
	msg := sprintf("coral.dev/inject: unknown injection %q ignored (known: none, mirror, pin, pull-policy, selectors)", [name])
}

warn contains msg if {
	injecting
	settings.warnUnmanaged
	some i in selected
	c := input.containers[i]
	is_string(c.normalized)
	not data.coral.images[c.key]
	msg := sprintf("container %q: image %q is not managed by any ImageSet; left unchanged", [c.name, c.image])
}

warn contains msg if {
	injecting
	some i in selected
	not i in usable
	c := input.containers[i]
	info := data.coral.images[c.key]
	msg := sprintf(
		"container %q: image %q is private to namespace(s) %s (pulled with their pull secrets), not to %q; left unchanged",
		[c.name, c.image, concat(", ", info.namespaces), input.namespace],
	)
}

# With selectors injected, feasibility.rego says why an image is left out.
warn contains msg if {
	injecting
	not inject_selectors
	some i in selected
	c := input.containers[i]
	i in usable
	info := data.coral.images[c.key]
	info.nodes.available < settings.minAvailableNodes
	msg := sprintf(
		"container %q: image %q is on %d node(s), fewer than the %d required (minAvailableNodes); left unchanged",
		[c.name, c.image, info.nodes.available, settings.minAvailableNodes],
	)
}

warn contains msg if {
	injecting
	some i in selected
	c := input.containers[i]
	is_string(c.error)
	msg := sprintf("container %q: %s; left unchanged", [c.name, c.error])
}
