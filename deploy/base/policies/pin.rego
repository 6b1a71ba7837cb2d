# Pin injection: a container runs the exact bytes every node holding its image holds. Its
# image `repo:tag` becomes `repo:tag@sha256:…` when the image is managed and every holder
# agrees on one digest (data.coral.images[...].digest: the nodes holding it, and the source
# digest of its mirrored copy). Replicas of a pinned template then run the same image even
# after the tag moves; the pinned reference is the same image as the tag for every other rule
# (its `key`), so placement and pull policies hold for it too.
#
# With drift (digests held differ) nothing is pinned, and a warning names the digests. A
# reference with a digest already is left as it is. A container the mirror injection runs
# from the mirror is pinned to the mirror reference and the digest the mirror serves.
package coral.mutate

# The containers to pin are mirror.rego's `pinnable`: selected, managed, usable, by tag only,
# with one agreed digest, and not going back from a mirror that is not ready to their source.
# One that runs the mirror's copy gets its patch in mirror.rego (the mirror reference by the
# digest the mirror serves); any other, its image as written by the agreed digest.
patch contains {
	"op": "replace",
	"path": concat("", [input.containers[i].path, "/image"]),
	"value": concat("", [input.containers[i].image, "@", data.coral.images[input.containers[i].key].digest]),
} if {
	inject_pin
	some i in pinnable
	not i in runs_copy
}

warn contains msg if {
	inject_pin
	some i in usable
	c := input.containers[i]
	not contains(c.normalized, "@")
	info := data.coral.images[c.key]
	count(info.digests) > 1
	msg := sprintf(
		"container %q: image %q is held under different digests (%s); not pinned",
		[c.name, c.image, concat(", ", info.digests)],
	)
}

warn contains msg if {
	inject_pin
	some i in usable
	c := input.containers[i]
	not contains(c.normalized, "@")
	count(data.coral.images[c.key].digests) == 0
	msg := sprintf("container %q: no node reports a digest for image %q yet; not pinned", [c.name, c.image])
}
