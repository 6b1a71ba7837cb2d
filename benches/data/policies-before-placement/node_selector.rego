# Node-selector injection: pods start only on nodes that already hold their images.
#
# settings.scheduling "required" adds one nodeSelector entry per image,
#   image.coral.dev/<key>: available
# settings.scheduling "preferred" adds a preferred node-affinity term (weight
#   settings.preferredWeight) matching the same labels, so pods may still start elsewhere.
package coral.mutate

# Label keys of the images the pod is steered to.
selector_labels contains data.coral.images[input.containers[i].normalized].label if {
	inject_selectors
	some i in available
}

## Required scheduling: nodeSelector.

current_node_selector := object.get(pod_spec, "nodeSelector", null)

node_selector_entries := current_node_selector if {
	is_object(current_node_selector)
} else := {}

missing_node_selector contains key if {
	settings.scheduling == "required"
	some key in selector_labels
	not node_selector_entries[key] == "available"
}

# No nodeSelector yet: add it whole.
patch contains {
	"op": "add",
	"path": concat("", [input.pod_spec_path, "/nodeSelector"]),
	"value": {key: "available" | some key in missing_node_selector},
} if {
	count(missing_node_selector) > 0
	not is_object(current_node_selector)
}

# A nodeSelector exists: add the missing entries to it.
patch contains {
	"op": "add",
	"path": concat("", [input.pod_spec_path, "/nodeSelector/", pointer_segment(key)]),
	"value": "available",
} if {
	is_object(current_node_selector)
	some key in missing_node_selector
}

## Preferred scheduling: node affinity.

affinity := object.get(pod_spec, "affinity", null)

node_affinity := object.get(pod_spec, ["affinity", "nodeAffinity"], null)

preferred_terms := object.get(pod_spec, ["affinity", "nodeAffinity", "preferredDuringSchedulingIgnoredDuringExecution"], null)

preferred_present(key) if {
	is_array(preferred_terms)
	some term in preferred_terms
	some expression in object.get(term, ["preference", "matchExpressions"], [])
	expression.key == key
	expression.operator == "In"
	expression.values == ["available"]
}

missing_preferred contains key if {
	settings.scheduling == "preferred"
	some key in selector_labels
	not preferred_present(key)
}

adding_preferred if count(missing_preferred) > 0

preferred_term := {
	"weight": settings.preferredWeight,
	"preference": {"matchExpressions": [{"key": key, "operator": "In", "values": ["available"]} |
		some key in missing_preferred
	]},
}

affinity_path := concat("", [input.pod_spec_path, "/affinity"])

patch contains {
	"op": "add",
	"path": affinity_path,
	"value": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [preferred_term]}},
} if {
	adding_preferred
	not is_object(affinity)
}

patch contains {
	"op": "add",
	"path": concat("", [affinity_path, "/nodeAffinity"]),
	"value": {"preferredDuringSchedulingIgnoredDuringExecution": [preferred_term]},
} if {
	adding_preferred
	is_object(affinity)
	not is_object(node_affinity)
}

patch contains {
	"op": "add",
	"path": concat("", [affinity_path, "/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution"]),
	"value": [preferred_term],
} if {
	adding_preferred
	is_object(node_affinity)
	not is_array(preferred_terms)
}

patch contains {
	"op": "add",
	"path": concat("", [affinity_path, "/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution/-"]),
	"value": preferred_term,
} if {
	adding_preferred
	is_array(preferred_terms)
}
