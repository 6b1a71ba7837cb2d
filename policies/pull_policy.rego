# Pull-policy injection: containers and init containers whose image is managed and available
# get IfNotPresent, so they use the copy already on the node. settings.pullPolicy Never is
# given only where every node the pod may run on holds the image: its label is in the
# nodeSelector after this decision, or the pod's own constraints require it. Elsewhere Never
# could leave the pod on a node without its image, so such containers get IfNotPresent.
package coral.mutate

# Labels every node the pod may run on holds after this decision.
held_where_it_runs contains label if some label in selector_required

held_where_it_runs contains label if some label in required_by_pod

pull_policy_for(c) := "Never" if {
	settings.pullPolicy == "Never"
	data.coral.images[c.key].label in held_where_it_runs
} else := "IfNotPresent"

patch contains {
	"op": "add",
	"path": concat("", [c.path, "/imagePullPolicy"]),
	"value": policy,
} if {
	inject_pull_policy
	some i in available
	c := input.containers[i]
	policy := pull_policy_for(c)
	object.get(c, "imagePullPolicy", "") != policy
}

warn contains msg if {
	inject_pull_policy
	settings.pullPolicy == "Never"
	some i in available
	c := input.containers[i]
	pull_policy_for(c) != "Never"
	msg := sprintf(
		"container %q: imagePullPolicy IfNotPresent, not Never: not every node the pod may run on holds %q",
		[c.name, c.image],
	)
}
