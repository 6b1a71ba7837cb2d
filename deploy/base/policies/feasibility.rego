# Placement safety: which image labels a pod is steered to, so that a Coral decision never
# leaves it with nowhere to run.
#
# input.placement is computed by Coral for every request (see the README, "Placement"):
#   nodes:   how many nodes the pod's own constraints allow: schedulable, matching its
#            nodeSelector (Coral's image.coral.dev/ entries aside), required node affinity and
#            nodeName, with every NoSchedule/NoExecute taint tolerated;
#   images:  per image label of its containers: nodes holding the image (held), how many of
#            them the pod may use (nodes), and why it may not use the others (cordoned,
#            tainted, unselected);
#   groups:  the nodes the pod may use that hold some of its images, grouped by which ones
#            (labels) with their number (nodes).
package coral.mutate

placement := object.get(input, "placement", {"nodes": 0, "images": {}, "groups": []})

# Fewer than one node is never enough.
min_nodes := max([1, settings.minAvailableNodes])

# Label keys of the managed images of the selected containers that the pod's namespace may
# use.
wanted_labels contains label if {
	inject_selectors
	some i in usable
	label := data.coral.images[input.containers[i].key].label
}

# How many nodes the pod may use that hold every image of `labels` (a non-empty set).
nodes_holding(labels) := sum([g.nodes |
	some g in placement.groups
	count([l | some l in g.labels; l in labels]) == count(labels)
])

# Combinations worth considering when not all wanted images can be steered to together:
# what each group of nodes holds of them, and each alone.
candidates contains c if {
	some g in placement.groups
	c := {l | some l in g.labels; l in wanted_labels}
}

candidates contains {label} if some label in wanted_labels

# Feasible combinations, as [size, nodes, sorted labels]: held together by at least
# minAvailableNodes nodes the pod may use.
feasible contains [count(c), n, sort(c)] if {
	some c in candidates
	count(c) > 0
	n := nodes_holding(c)
	n >= min_nodes
}

best_score := max({[size, n] | some [size, n, _] in feasible})

# The labels the pod is steered to: every wanted one when enough nodes hold them all;
# otherwise the feasible combination with the most images, then the most nodes, then the
# first in label order. With minAvailableNodes 1 this is the largest feasible subset: any
# feasible subset lies within what one group of nodes holds.
steered := wanted_labels if {
	count(wanted_labels) > 0
	nodes_holding(wanted_labels) >= min_nodes
} else := {label | some label in min({labels | some [size, n, labels] in feasible; [size, n] == best_score})} if {
	count(feasible) > 0
} else := set()

# Labels every node the pod may use holds already: its own constraints require them.
required_by_pod contains label if {
	some label, info in placement.images
	info.nodes > 0
	info.nodes == placement.nodes
}

# Why a wanted image is not steered to.
left_out_reason(label) := "no node holds it yet" if {
	object.get(placement.images, [label, "held"], 0) == 0
} else := sprintf(
	"%d node(s) hold it, %d of them usable by this pod (%d cordoned, %d with taints it does not tolerate, %d outside its nodeSelector, node affinity or nodeName); minAvailableNodes is %d",
	[info.held, info.nodes, info.cordoned, info.tainted, info.unselected, min_nodes],
) if {
	info := object.union({"held": 0, "nodes": 0, "cordoned": 0, "tainted": 0, "unselected": 0}, object.get(placement.images, label, {}))
	info.nodes < min_nodes
} else := sprintf(
	"%d usable node(s) hold it, but fewer than %d hold it together with %s",
	[placement.images[label].nodes, min_nodes, concat(", ", [image_name(l) | some l in sort(steered)])],
)

# The image of a label, as the pod's first container with it names it.
image_name(label) := sprintf("%q", [[c.image |
	some c in input.containers
	data.coral.images[c.key].label == label
][0]])

warn contains msg if {
	some i in selected
	c := input.containers[i]
	label := data.coral.images[c.key].label
	label in wanted_labels
	not label in steered
	msg := sprintf("container %q: image %q not steered to: %s; left unchanged", [c.name, c.image, left_out_reason(label)])
}

# A label Coral may keep on an object: the image of one of its containers, still managed.
still_managed(label) if {
	some c in input.containers
	c.list != "ephemeralContainers"
	data.coral.images[c.key].label == label
}

# Whether a nodeSelector key is Coral's: every image.coral.dev/ key is.
is_coral_key(key) if startswith(key, "image.coral.dev/")
