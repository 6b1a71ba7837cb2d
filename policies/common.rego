# Helpers shared by the default policies: which injections an object asks for, which of its
# containers they apply to, and whether a container's image is managed and available.
#
# input:       one admission request (see the README, "Policy input").
# data.coral:  images, nodes and settings (see the README, "Policy data").
package coral.mutate

settings := data.coral.settings

annotations := object.get(input.object, ["metadata", "annotations"], {})

# Comma-separated annotation value as a set, spaces trimmed, empty entries dropped.
annotation_list(key) := {trim_space(item) |
	some item in split(annotations[key], ",")
	trim_space(item) != ""
}

# Injections the object asks for: its coral.dev/inject annotation, else the cluster default.
requested_injections := annotation_list("coral.dev/inject") if {
	is_string(annotations["coral.dev/inject"])
} else := {name | some name in settings.defaultInject}

known_injections := {"selectors", "pull-policy"}

# "none" opts an object out of a cluster-wide defaultInject.
opt_out := "none"

inject(name) if name in requested_injections

injecting if count(requested_injections & known_injections) > 0

# Containers the injections apply to. coral.dev/include-containers, when present, names them
# (and wins over exclude); otherwise every container not named in coral.dev/exclude-containers.
# Ephemeral containers are never changed.
selected contains c if {
	some c in input.containers
	c.list != "ephemeralContainers"
	container_selected(c.name)
}

container_selected(name) if {
	is_string(annotations["coral.dev/include-containers"])
	name in annotation_list("coral.dev/include-containers")
}

container_selected(name) if {
	not is_string(annotations["coral.dev/include-containers"])
	not name in annotation_list("coral.dev/exclude-containers")
}

# What data.coral knows of a container's image; undefined when no ImageSet manages it.
image_info(c) := data.coral.images[c.normalized]

# Managed, and held by at least settings.minAvailableNodes nodes.
available(c) if image_info(c).nodes.available >= settings.minAvailableNodes

# The pod spec of the object, wherever its kind keeps it.
pod_spec := object.get(input.object, split(trim_prefix(input.pod_spec_path, "/"), "/"), {})

# A label key as one JSON-pointer segment (RFC 6901).
pointer_segment(s) := replace(replace(s, "~", "~0"), "/", "~1")

warn contains msg if {
	some name in requested_injections
	not name in known_injections
	name != opt_out
	msg := sprintf("coral.dev/inject: unknown injection %q ignored (known: none, pull-policy, selectors)", [name])
}

warn contains msg if {
	injecting
	settings.warnUnmanaged
	some c in selected
	is_string(c.normalized)
	not image_info(c)
	msg := sprintf("container %q: image %q is not managed by any ImageSet; left unchanged", [c.name, c.image])
}

warn contains msg if {
	injecting
	some c in selected
	info := image_info(c)
	info.nodes.available < settings.minAvailableNodes
	msg := sprintf(
		"container %q: image %q is on %d node(s), fewer than the %d required (minAvailableNodes); left unchanged",
		[c.name, c.image, info.nodes.available, settings.minAvailableNodes],
	)
}

warn contains msg if {
	injecting
	some c in selected
	is_string(c.error)
	msg := sprintf("container %q: %s; left unchanged", [c.name, c.error])
}
