# Node-selector injection: pods start only on nodes that already hold their images.
#
# settings.scheduling "required" puts one nodeSelector entry per steered image,
#   image.coral.dev/<key>: available
# settings.scheduling "preferred" puts one preferred node-affinity term (weight
#   settings.preferredWeight) matching the same labels, so pods may still start elsewhere.
# Which images are steered to is decided in feasibility.rego.
#
# Coral's entries and terms are recomputed on every CREATE and UPDATE: an entry or term for an
# image the pod no longer runs, or that no ImageSet manages any more, goes; with selectors
# injected, so does one for an image the pod cannot be steered to. A nodeSelector
# entry is Coral's when its key starts with image.coral.dev/; a preferred term is Coral's when
# every one of its matchExpressions is `image.coral.dev/…  In [available]` and it has no
# matchFields. Nothing else is touched.
package coral.mutate

steering(mode) if {
	inject_selectors
	settings.scheduling == mode
}

## Required scheduling: nodeSelector.

current_node_selector := object.get(pod_spec, "nodeSelector", null)

node_selector_entries := current_node_selector if {
	is_object(current_node_selector)
} else := {}

coral_selector_entries := {key: "available" | some key in steered} if steering("required")

# Steering softly, a hard entry left from required scheduling stays only while the pod can
# still be steered to its image.
coral_selector_entries := {key: value |
	some key, value in node_selector_entries
	is_coral_key(key)
	still_managed(key)
	key in steered
} if steering("preferred")

coral_selector_entries := {key: value |
	some key, value in node_selector_entries
	is_coral_key(key)
	still_managed(key)
} if not inject_selectors

wanted_node_selector := object.union(
	{key: value | some key, value in node_selector_entries; not is_coral_key(key)},
	coral_selector_entries,
)

# Labels the nodeSelector requires after this decision.
selector_required contains key if some key, _ in coral_selector_entries

node_selector_path := concat("", [input.pod_spec_path, "/nodeSelector"])

patch contains {"op": "add", "path": node_selector_path, "value": wanted_node_selector} if {
	wanted_node_selector != node_selector_entries
	count(wanted_node_selector) > 0
}

patch contains {"op": "remove", "path": node_selector_path} if {
	wanted_node_selector != node_selector_entries
	count(wanted_node_selector) == 0
}

## Preferred scheduling: node affinity.

affinity := object.get(pod_spec, "affinity", null)

node_affinity := object.get(pod_spec, ["affinity", "nodeAffinity"], null)

preferred_terms := object.get(pod_spec, ["affinity", "nodeAffinity", "preferredDuringSchedulingIgnoredDuringExecution"], null)

current_terms := preferred_terms if {
	is_array(preferred_terms)
} else := []

is_coral_term(term) if {
	expressions := object.get(term, ["preference", "matchExpressions"], [])
	count(expressions) > 0
	count(object.get(term, ["preference", "matchFields"], [])) == 0
	every expression in expressions {
		is_coral_key(expression.key)
		expression.operator == "In"
		expression.values == ["available"]
	}
}

preferred_term := {
	"weight": settings.preferredWeight,
	"preference": {"matchExpressions": [{"key": key, "operator": "In", "values": ["available"]} |
		some key in sort(steered)
	]},
}

# Coral's terms after this decision: the one term of the steered images when steering
# preferred, otherwise the current ones without what is stale.
coral_terms := [preferred_term] if {
	steering("preferred")
	count(steered) > 0
} else := [] if {
	steering("preferred")
} else := [kept_term(term) |
	some term in current_terms
	is_coral_term(term)
	count(kept_expressions(term)) > 0
]

kept_expressions(term) := [e | some e in term.preference.matchExpressions; still_managed(e.key)]

kept_term(term) := term if {
	count(kept_expressions(term)) == count(term.preference.matchExpressions)
} else := object.union(term, {"preference": {"matchExpressions": kept_expressions(term)}})

wanted_terms := array.concat([term | some term in current_terms; not is_coral_term(term)], coral_terms)

# Preferred terms change only when Coral steers with them or the pod has some already.
preferred_in_play if steering("preferred")

preferred_in_play if count(current_terms) > 0

changing_terms if {
	preferred_in_play
	wanted_terms != current_terms
}

affinity_path := concat("", [input.pod_spec_path, "/affinity"])

preferred_path := concat("", [affinity_path, "/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution"])

patch contains {
	"op": "add",
	"path": affinity_path,
	"value": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": wanted_terms}},
} if {
	changing_terms
	count(wanted_terms) > 0
	not is_object(affinity)
}

patch contains {
	"op": "add",
	"path": concat("", [affinity_path, "/nodeAffinity"]),
	"value": {"preferredDuringSchedulingIgnoredDuringExecution": wanted_terms},
} if {
	changing_terms
	count(wanted_terms) > 0
	is_object(affinity)
	not is_object(node_affinity)
}

patch contains {"op": "add", "path": preferred_path, "value": wanted_terms} if {
	changing_terms
	count(wanted_terms) > 0
	is_object(node_affinity)
}

patch contains {"op": "remove", "path": preferred_path} if {
	changing_terms
	count(wanted_terms) == 0
}
