use crate::index::Symbols;

use serde_json::{Value, json};

use super::*;

struct Node {
    name: &'static str,
    labels: Labels,
    taints: Vec<NodeTaint>,
    unschedulable: bool,
}

fn node(name: &'static str, labels: &[(&str, &str)]) -> Node {
    Node {
        name,
        labels: Labels::new(&mut Symbols::default(), labels.iter().copied()),
        taints: Vec::new(),
        unschedulable: false,
    }
}

fn taint(key: &str, value: &str, effect: &str) -> NodeTaint {
    NodeTaint {
        key: key.to_string(),
        value: value.to_string(),
        effect: effect.to_string(),
    }
}

fn placement(nodes: &[Node]) -> Placement {
    Placement::new(nodes.iter().map(|n| PlacementNode {
        name: n.name,
        labels: &n.labels,
        taints: &n.taints,
        unschedulable: n.unschedulable,
    }))
}

/// Four nodes: a and b in pool web, c in pool db (tainted dedicated=db:NoSchedule), d in
/// pool db and cordoned. `image.coral.dev/x` is on a, c and d; `image.coral.dev/y` on b and c.
fn cluster() -> Placement {
    let x = ("image.coral.dev/x", "available");
    let y = ("image.coral.dev/y", "available");
    let mut c = node("c", &[("pool", "db"), ("size", "8"), x, y]);
    c.taints = vec![taint("dedicated", "db", "NoSchedule")];
    let mut d = node("d", &[("pool", "db"), ("size", "16"), x]);
    d.unschedulable = true;
    placement(&[
        node("a", &[("pool", "web"), ("size", "2"), x]),
        node("b", &[("pool", "web"), ("size", "4"), y]),
        c,
        d,
    ])
}

fn eligible(spec: Value) -> usize {
    cluster().eligible_count(&spec)
}

fn required(terms: Value) -> Value {
    json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}})
}

fn expression(key: &str, operator: &str, values: &[&str]) -> Value {
    json!({"key": key, "operator": operator, "values": values})
}

#[test]
fn a_pod_without_constraints_may_use_every_untainted_uncordoned_node() {
    assert_eq!(eligible(json!({})), 2);
}

#[test]
fn node_selector_entries_are_anded_and_coral_entries_are_not_the_pods() {
    assert_eq!(eligible(json!({"nodeSelector": {"pool": "web"}})), 2);
    assert_eq!(
        eligible(json!({"nodeSelector": {"pool": "web", "size": "2"}})),
        1
    );
    assert_eq!(eligible(json!({"nodeSelector": {"pool": "gpu"}})), 0);
    assert_eq!(eligible(json!({"nodeSelector": {"missing": "x"}})), 0);
    // Coral's own entries are what the policies decide, not a constraint of the pod.
    assert_eq!(
        eligible(json!({"nodeSelector": {"image.coral.dev/y": "available"}})),
        2
    );
}

#[test]
fn required_node_affinity_knows_every_operator() {
    let tolerate_all = json!([{"operator": "Exists"}]);
    let with = |terms: Value| {
        let mut spec = required(terms);
        spec["tolerations"] = tolerate_all.clone();
        cluster().eligible_count(&spec)
    };
    assert_eq!(
        with(json!([{"matchExpressions": [expression("pool", "In", &["db"])]}])),
        2
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("pool", "NotIn", &["db"])]}])),
        2
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("gpu", "NotIn", &["yes"])]}])),
        4
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("size", "Exists", &[])]}])),
        4
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("size", "DoesNotExist", &[])]}])),
        0
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("size", "Gt", &["4"])]}])),
        2
    );
    assert_eq!(
        with(json!([{"matchExpressions": [expression("size", "Lt", &["4"])]}])),
        1
    );
    // Gt with a value that is not one integer matches nothing.
    assert_eq!(
        with(json!([{"matchExpressions": [expression("size", "Gt", &["x"])]}])),
        0
    );
    // Terms are ORed, expressions within a term ANDed.
    let web_small = json!({"matchExpressions": [expression("pool", "In", &["web"]), expression("size", "Lt", &["3"])]});
    let big = json!({"matchExpressions": [expression("size", "Gt", &["10"])]});
    assert_eq!(with(json!([web_small, big])), 2);
    // matchFields on metadata.name.
    assert_eq!(
        with(json!([{"matchFields": [expression("metadata.name", "In", &["b", "z"])]}])),
        1
    );
    assert_eq!(
        with(json!([{"matchFields": [expression("metadata.name", "NotIn", &["b"])]}])),
        3
    );
    // An empty term, and an unknown operator, match no node.
    assert_eq!(with(json!([{}])), 0);
    assert_eq!(
        with(json!([{"matchExpressions": [expression("pool", "Like", &["w"])]}])),
        0
    );
}

#[test]
fn tolerations_follow_kubernetes_rules() {
    let with = |tolerations: Value| eligible(json!({"tolerations": tolerations}));
    assert_eq!(
        with(json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])),
        3
    );
    assert_eq!(
        with(json!([{"key": "dedicated", "operator": "Equal", "value": "db"}])),
        3
    );
    assert_eq!(with(json!([{"key": "dedicated", "value": "web"}])), 2);
    assert_eq!(with(json!([{"key": "dedicated", "operator": "Exists"}])), 3);
    assert_eq!(
        with(json!([{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}])),
        2
    );
    // An empty key with Exists tolerates every taint, the cordon included.
    assert_eq!(with(json!([{"operator": "Exists"}])), 4);
    // A cordoned node is tolerated as its taint is.
    assert_eq!(
        with(json!([{"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}])),
        3
    );
}

#[test]
fn prefer_no_schedule_taints_do_not_rule_a_node_out() {
    let mut soft = node("s", &[]);
    soft.taints = vec![taint("spot", "", "PreferNoSchedule")];
    assert_eq!(placement(&[soft]).eligible_count(&json!({})), 1);
}

#[test]
fn node_name_pins_the_pod_to_one_node() {
    assert_eq!(eligible(json!({"nodeName": "b"})), 1);
    assert_eq!(eligible(json!({"nodeName": "c"})), 0);
    assert_eq!(eligible(json!({"nodeName": "gone"})), 0);
}

#[test]
fn images_report_how_many_nodes_hold_them_and_why_the_others_are_out() {
    let answer = cluster().for_pod(
        &json!({"nodeSelector": {"pool": "web", "image.coral.dev/x": "available"}}),
        &[
            "image.coral.dev/x",
            "image.coral.dev/y",
            "image.coral.dev/x",
            "image.coral.dev/none",
        ],
    );
    assert_eq!(
        answer,
        json!({
            "nodes": 2,
            "images": {
                "image.coral.dev/none": {"held": 0, "nodes": 0, "cordoned": 0, "tainted": 0, "unselected": 0},
                "image.coral.dev/x": {"held": 3, "nodes": 1, "cordoned": 1, "tainted": 1, "unselected": 0},
                "image.coral.dev/y": {"held": 2, "nodes": 1, "cordoned": 0, "tainted": 1, "unselected": 0},
            },
            "groups": [
                {"labels": ["image.coral.dev/x"], "nodes": 1},
                {"labels": ["image.coral.dev/y"], "nodes": 1},
            ],
        })
    );
}

#[test]
fn groups_count_the_nodes_holding_each_combination() {
    let mut nodes = Vec::new();
    let names = ["n0", "n1", "n2", "n3", "n4", "n5"];
    for (i, name) in names.iter().enumerate() {
        let mut labels = vec![("image.coral.dev/x", "available")];
        if i % 2 == 0 {
            labels.push(("image.coral.dev/y", "available"));
        }
        if i == 5 {
            labels.clear();
        }
        nodes.push(node(name, &labels));
    }
    let answer = placement(&nodes).for_pod(&json!({}), &["image.coral.dev/y", "image.coral.dev/x"]);
    assert_eq!(answer["nodes"], 6);
    assert_eq!(
        answer["groups"],
        json!([
            {"labels": ["image.coral.dev/x"], "nodes": 2},
            {"labels": ["image.coral.dev/x", "image.coral.dev/y"], "nodes": 3},
        ])
    );
}

#[test]
fn unselected_nodes_are_told_apart_from_tainted_and_cordoned_ones() {
    let answer = cluster().for_pod(
        &json!({"nodeSelector": {"pool": "web"}}),
        &["image.coral.dev/x"],
    );
    assert_eq!(answer["images"]["image.coral.dev/x"]["unselected"], 0);
    let tolerant =
        json!({"nodeSelector": {"pool": "web"}, "tolerations": [{"operator": "Exists"}]});
    let answer = cluster().for_pod(&tolerant, &["image.coral.dev/x"]);
    assert_eq!(
        answer["images"]["image.coral.dev/x"],
        json!({"held": 3, "nodes": 1, "cordoned": 0, "tainted": 0, "unselected": 2})
    );
}

#[test]
fn large_and_small_label_sets_give_the_same_answers() {
    // 200 nodes: pool labels land in bitsets, host names in lists.
    let names: Vec<&'static str> = (0..200)
        .map(|i| &*Box::leak(format!("node-{i}").into_boxed_str()))
        .collect();
    let nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pool = format!("p{}", i % 4);
            let mut n = node(name, &[("pool", &pool), ("kubernetes.io/hostname", name)]);
            if i % 10 == 0 {
                n.taints = vec![taint("t", "", "NoExecute")];
            }
            n
        })
        .collect();
    let index = placement(&nodes);
    assert_eq!(
        index.eligible_count(&json!({"nodeSelector": {"pool": "p1"}})),
        50
    );
    // p0 nodes are multiples of 4; the tainted ones among them, multiples of 20.
    assert_eq!(
        index.eligible_count(&json!({"nodeSelector": {"pool": "p0"}})),
        40
    );
    assert_eq!(
        index.eligible_count(&json!({"nodeSelector": {"kubernetes.io/hostname": "node-7"}})),
        1
    );
    let not_one = required(
        json!([{"matchExpressions": [expression("kubernetes.io/hostname", "NotIn", &["node-1", "node-2"])]}]),
    );
    assert_eq!(index.eligible_count(&not_one), 178);
}
