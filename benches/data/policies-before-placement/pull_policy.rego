# Pull-policy injection: containers and init containers whose image is managed and available
# get settings.pullPolicy (IfNotPresent, or Never), so they use the copy already on the node.
package coral.mutate

patch contains {
	"op": "add",
	"path": concat("", [c.path, "/imagePullPolicy"]),
	"value": settings.pullPolicy,
} if {
	inject_pull_policy
	some i in available
	c := input.containers[i]
	object.get(c, "imagePullPolicy", "") != settings.pullPolicy
}

warn contains msg if {
	inject_pull_policy
	not inject_selectors
	settings.pullPolicy == "Never"
	some i in available
	c := input.containers[i]
	msg := sprintf(
		"container %q: imagePullPolicy Never without selectors injection; the pod may land on a node without %q and fail to start",
		[c.name, c.image],
	)
}
