# Mirror injection: a container of a Pod whose image is mirrored into an in-cluster Registry
# runs the mirror's copy. Its image becomes the mirror reference (data.coral.images[...].mirror),
# which keeps the tag and the digest of the original, only while the copy is ready: the mirror
# holds it and the Registry answered the controller's last probe. Pods only: each Pod is
# decided when it is created, against the mirror as it is then, and workload templates keep
# their source (a template rewritten to the mirror would keep making pods that pull from it
# after it fails). A container that runs a mirror reference whose copy is not ready gets its
# source reference back, so a pod created while the mirror is down pulls from where it would
# without Coral.
#
# Private images (pulled with an ImageSet's pull secrets) are never rewritten: the pod keeps
# pulling from the source with its own pull secrets, which the source checks.
package coral.mutate

mirror_of(c) := data.coral.images[c.key].mirror

# Computed once per decision: whether any copy is known at all (in most clusters, none).
mirroring if count(data.coral.mirrors) > 0

# Containers to run from the mirror.
from_mirror contains i if {
	inject_mirror
	input.kind.kind == "Pod"
	some i in usable
	not data.coral.images[input.containers[i].key].private
	mirror_of(input.containers[i]).ready
}

# A mirror reference whose copy is not ready: back to the source, whatever the injections
# (a pod made from a template rewritten earlier), unless the object opts out.
to_source contains i if {
	mirroring
	not opted_out
	some i in selected
	source := data.coral.mirrors[input.containers[i].normalized]
	not data.coral.images[source].mirror.ready
}

patch contains {
	"op": "replace",
	"path": concat("", [input.containers[i].path, "/image"]),
	"value": data.coral.mirrors[input.containers[i].normalized],
} if {
	some i in to_source
}

# Which containers pin.rego pins, decided here: in this policy set a rule refers only to rules
# defined before it (files load in name order), as regorus evaluates a rule defined later
# wrongly inside another rule under `with`; and without negating a lookup that may be
# undefined, which its compiled VM gets wrong here.
pin_candidates contains i if {
	inject_pin
	some i in usable
	not contains(input.containers[i].normalized, "@")
	is_string(data.coral.images[input.containers[i].key].digest)
}

# Not a mirror reference...
pinnable contains i if {
	some i in pin_candidates
	object.get(data.coral.mirrors, input.containers[i].normalized, null) == null
}

# ...or one whose copy is ready (a copy that is not goes back to its source, unpinned).
pinnable contains i if {
	mirroring
	some i in pin_candidates
	source := data.coral.mirrors[input.containers[i].normalized]
	data.coral.images[source].mirror.ready
}

# Containers that run the mirror's copy: rewritten to it here, or on a mirror reference whose
# copy is ready.
runs_copy contains i if some i in from_mirror

runs_copy contains i if {
	mirroring
	some i in selected
	source := data.coral.mirrors[input.containers[i].normalized]
	data.coral.images[source].mirror.ready
}

# With pin requested and one agreed digest, they run the mirror reference by the digest the
# mirror serves. (Separate rules rather than one function with `else`, which the compiled VM
# of regorus gets wrong here.)
mirror_pinned contains i if {
	inject_pin
	some i in runs_copy
	i in pinnable
	is_string(mirror_of(input.containers[i]).digest)
}

patch contains {
	"op": "replace",
	"path": concat("", [input.containers[i].path, "/image"]),
	"value": mirror_of(input.containers[i]).reference,
} if {
	some i in from_mirror
	not i in mirror_pinned
	# A source by tag (a mirror reference, or a pinned one, stays as it is).
	input.containers[i].normalized == input.containers[i].key
}

patch contains {
	"op": "replace",
	"path": concat("", [input.containers[i].path, "/image"]),
	"value": concat("", [mirror_of(input.containers[i]).reference, "@", mirror_of(input.containers[i]).digest]),
} if {
	some i in mirror_pinned
}

warn contains msg if {
	mirroring
	not opted_out
	some i in selected
	c := input.containers[i]
	source := data.coral.mirrors[c.normalized]
	not data.coral.images[source].mirror.ready
	msg := sprintf("container %q: the mirror's copy of %q is not ready; it pulls from the source", [c.name, source])
}

warn contains msg if {
	inject_mirror
	input.kind.kind == "Pod"
	some i in usable
	c := input.containers[i]
	info := data.coral.images[c.key]
	not info.private
	is_object(info.mirror)
	not info.mirror.ready
	not data.coral.mirrors[c.normalized]
	msg := sprintf(
		"container %q: image %q is not ready in mirror Registry %s; left unchanged",
		[c.name, c.image, info.mirror.registry],
	)
}

warn contains msg if {
	inject_mirror
	input.kind.kind == "Pod"
	some i in usable
	c := input.containers[i]
	info := data.coral.images[c.key]
	info.private
	is_object(info.mirror)
	msg := sprintf(
		"container %q: image %q is private; it pulls from its source with the pod's pull secrets, not from the mirror",
		[c.name, c.image],
	)
}

warn contains msg if {
	inject_mirror
	input.kind.kind != "Pod"
	some i in usable
	is_object(data.coral.images[input.containers[i].key].mirror)
	msg := "mirror: the injection rewrites Pods, each when it is created, and leaves this template's images alone; put coral.dev/inject on the pod template, or list mirror in defaultInject"
}
