//! Where a pod can run: per node its labels, its taints and whether it is cordoned, kept as
//! node sets so that "how many schedulable nodes satisfy these requirements" is a few bitwise
//! operations, not a walk over every node.
//!
//! The rules are the scheduler's: a pod's `nodeSelector`, its required node affinity (terms
//! ORed, expressions ANDed, every operator, `matchFields` on `metadata.name`), `spec.nodeName`,
//! and taints with effect `NoSchedule` or `NoExecute` its tolerations do not cover. A cordoned
//! node (`spec.unschedulable`) counts as tainted `node.kubernetes.io/unschedulable:NoSchedule`,
//! as the scheduler's NodeUnschedulable plugin treats it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Labels, Sym};
use crate::image::{ImageReference, LABEL_AVAILABLE, LABEL_PREFIX, label_key};

/// The taint a cordoned node is judged by.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Pods with more distinct images than this are grouped on the first ones only.
const MAX_GROUPED_LABELS: usize = 64;

/// A node taint, in the Node's own shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTaint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: String,
}

impl NodeTaint {
    /// Whether the taint keeps pods that do not tolerate it off the node.
    fn repels(&self) -> bool {
        self.effect == "NoSchedule" || self.effect == "NoExecute"
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct PlacementNode<'a> {
    pub name: &'a str,
    pub labels: &'a Labels,
    pub taints: &'a [NodeTaint],
    pub unschedulable: bool,
}

/// A set of nodes as a bitset over the nodes' indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn empty(nodes: usize) -> Self {
        Self(vec![0; nodes.div_ceil(64)])
    }

    fn full(nodes: usize) -> Self {
        let mut bits = Self(vec![u64::MAX; nodes.div_ceil(64)]);
        if nodes % 64 != 0
            && let Some(last) = bits.0.last_mut()
        {
            *last = (1u64 << (nodes % 64)) - 1;
        }
        bits
    }

    fn insert(&mut self, node: u32) {
        let node = node as usize;
        self.0[node / 64] |= 1 << (node % 64);
    }

    fn contains(&self, node: usize) -> bool {
        self.0[node / 64] & (1 << (node % 64)) != 0
    }

    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn and(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a &= b);
    }

    fn and_not(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a &= !b);
    }

    fn or(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a |= b);
    }

    /// Nodes in both, counted without building the intersection.
    fn count_and(&self, other: &Bits) -> usize {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a & b).count_ones() as usize)
            .sum()
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(word_index, &word)| {
            let mut word = word;
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let bit = word.trailing_zeros() as usize;
                    word &= word - 1;
                    word_index * 64 + bit
                })
            })
        })
    }
}

/// The nodes that carry one label value or one taint: a sorted list while it is small, a
/// bitset once that is smaller (a node's host name is on one node, a pool label on many).
#[derive(Debug, Clone, PartialEq, Eq)]
enum NodeSet {
    Sparse(Box<[u32]>),
    Dense(Bits),
}

impl NodeSet {
    fn new(members: Vec<u32>, nodes: usize) -> Self {
        if members.len() * 32 > nodes {
            let mut bits = Bits::empty(nodes);
            members.into_iter().for_each(|node| bits.insert(node));
            Self::Dense(bits)
        } else {
            Self::Sparse(members.into_boxed_slice())
        }
    }

    fn dense(&self, nodes: usize) -> Bits {
        match self {
            Self::Dense(bits) => bits.clone(),
            Self::Sparse(members) => {
                let mut bits = Bits::empty(nodes);
                members.iter().for_each(|&node| bits.insert(node));
                bits
            }
        }
    }

    fn add_to(&self, target: &mut Bits) {
        match self {
            Self::Dense(bits) => target.or(bits),
            Self::Sparse(members) => members.iter().for_each(|&node| target.insert(node)),
        }
    }
}

/// The nodes of a cluster, indexed for placement questions. Built once per state change.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    nodes: usize,
    names: HashMap<String, u32>,
    /// Label key → value → nodes.
    labels: HashMap<Sym, HashMap<Sym, NodeSet>>,
    /// Every distinct `NoSchedule` or `NoExecute` taint, and the nodes that carry it.
    taints: Vec<(NodeTaint, NodeSet)>,
    /// The image label of a mirror reference → that of its source: a container that runs a
    /// mirror's copy needs the nodes holding the source image.
    aliases: HashMap<String, String>,
    /// A mirror reference → its source image, both normalized.
    sources: HashMap<String, String>,
    /// The images ImageSets manage, normalized.
    managed: std::collections::HashSet<String>,
}

/// The image labels a pod spec requires, and where it can run with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredImages {
    /// Nodes that satisfy every constraint of the pod spec, its image labels included.
    pub nodes: usize,
    /// The image labels it requires, sorted.
    pub labels: Vec<RequiredLabel>,
}

/// One image label a pod spec requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredLabel {
    pub label: String,
    /// Nodes holding the image.
    pub held: usize,
    /// Of those, the nodes the pod spec's other constraints allow.
    pub usable: usize,
}

/// The nodes a pod's own constraints rule out, by reason.
struct Judgement {
    /// Nodes the pod's constraints and tolerations allow.
    eligible: Bits,
    /// Cordoned nodes the pod does not tolerate.
    cordoned: Bits,
    /// Other nodes with a taint the pod does not tolerate.
    tainted: Bits,
    /// Nodes outside the pod's nodeSelector, required node affinity or nodeName.
    unselected: Bits,
}

impl Placement {
    /// The same placement, where each mirror reference (`sources`: mirror reference → source
    /// image, both normalized) stands for its source image, and its label for the source's.
    pub fn with_mirrors(mut self, sources: BTreeMap<String, String>) -> Self {
        self.aliases = sources
            .iter()
            .filter_map(|(mirror, source)| {
                let mirror = ImageReference::parse(mirror).ok()?;
                let source = ImageReference::parse(source).ok()?;
                Some((label_key(&mirror), label_key(&source)))
            })
            .collect();
        self.sources = sources.into_iter().collect();
        self
    }

    /// The same placement, knowing which images ImageSets manage (normalized).
    pub fn with_managed(mut self, managed: impl IntoIterator<Item = String>) -> Self {
        self.managed = managed.into_iter().collect();
        self
    }

    /// The managed image a normalized reference stands for: the source of a mirror
    /// reference; for a pinned reference (`repo:tag@digest`) that no ImageSet manages as
    /// such, the image it pins (`repo:tag`, or its source when that is a mirror reference);
    /// else the reference itself.
    pub fn image_key<'a>(&'a self, normalized: &'a str) -> std::borrow::Cow<'a, str> {
        if let Some(source) = self.sources.get(normalized) {
            return source.as_str().into();
        }
        if !self.managed.contains(normalized)
            && normalized.contains('@')
            && let Some(tagged) = ImageReference::parse(normalized)
                .ok()
                .as_ref()
                .and_then(crate::image::unpinned)
        {
            let tagged = tagged.to_string();
            return match self.sources.get(&tagged) {
                Some(source) => source.clone().into(),
                None => tagged.into(),
            };
        }
        normalized.into()
    }

    /// Indexes nodes; their order fixes nothing the answers depend on.
    pub fn new<'a>(nodes: impl IntoIterator<Item = PlacementNode<'a>>) -> Self {
        let mut names = HashMap::new();
        let mut labels: HashMap<Sym, HashMap<Sym, Vec<u32>>> = HashMap::new();
        let mut taints: BTreeMap<NodeTaint, Vec<u32>> = BTreeMap::new();
        let mut count = 0u32;
        for node in nodes {
            let index = count;
            count += 1;
            names.insert(node.name.to_string(), index);
            for (key, value) in node.labels.syms() {
                labels
                    .entry(key.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .push(index);
            }
            let cordon = NodeTaint {
                key: UNSCHEDULABLE_TAINT.to_string(),
                value: String::new(),
                effect: "NoSchedule".to_string(),
            };
            let extra = node
                .unschedulable
                .then_some(&cordon)
                .filter(|cordon| !node.taints.contains(cordon));
            for taint in node.taints.iter().chain(extra) {
                if taint.repels() {
                    let members = taints.entry(taint.clone()).or_default();
                    if members.last() != Some(&index) {
                        members.push(index);
                    }
                }
            }
        }
        let nodes = count as usize;
        Self {
            aliases: HashMap::new(),
            sources: HashMap::new(),
            managed: Default::default(),
            nodes,
            names,
            labels: labels
                .into_iter()
                .map(|(key, values)| {
                    let values = values
                        .into_iter()
                        .map(|(value, members)| (value, NodeSet::new(members, nodes)))
                        .collect();
                    (key, values)
                })
                .collect(),
            taints: taints
                .into_iter()
                .map(|(taint, members)| (taint, NodeSet::new(members, nodes)))
                .collect(),
        }
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Nodes where `key` has `value`.
    fn with_label(&self, key: &str, value: &str) -> Option<&NodeSet> {
        self.labels.get(key)?.get(value)
    }

    /// Nodes where the label `key` has a value for which `keep` holds.
    fn with_label_where(&self, key: &str, keep: impl Fn(&str) -> bool) -> Bits {
        let mut bits = Bits::empty(self.nodes);
        for (value, set) in self.labels.get(key).into_iter().flatten() {
            if keep(value) {
                set.add_to(&mut bits);
            }
        }
        bits
    }

    /// Judges a pod spec's own constraints. Coral's own `image.coral.dev/` nodeSelector entries
    /// are not the pod's: they are what the policies decide.
    fn judge(&self, pod_spec: &Value) -> Judgement {
        let all = Bits::full(self.nodes);
        let mut selected = all.clone();
        if let Some(selector) = pod_spec.get("nodeSelector").and_then(Value::as_object) {
            for (key, value) in selector {
                if key.starts_with(LABEL_PREFIX) {
                    continue;
                }
                match (
                    value.as_str(),
                    self.with_label(key, value.as_str().unwrap_or("")),
                ) {
                    (Some(_), Some(set)) => selected.and(&set.dense(self.nodes)),
                    _ => selected = Bits::empty(self.nodes),
                }
            }
        }
        if let Some(name) = pod_spec.get("nodeName").and_then(Value::as_str)
            && !name.is_empty()
        {
            let mut named = Bits::empty(self.nodes);
            if let Some(&index) = self.names.get(name) {
                named.insert(index);
            }
            selected.and(&named);
        }
        if let Some(required) = pod_spec
            .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution")
            && !required.is_null()
        {
            selected.and(&self.node_selector_terms(required));
        }

        let tolerations = pod_spec
            .get("tolerations")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut cordoned = Bits::empty(self.nodes);
        let mut tainted = Bits::empty(self.nodes);
        for (taint, set) in &self.taints {
            if tolerations.iter().any(|t| tolerates(t, taint)) {
                continue;
            }
            if taint.key == UNSCHEDULABLE_TAINT {
                set.add_to(&mut cordoned);
            } else {
                set.add_to(&mut tainted);
            }
        }
        tainted.and_not(&cordoned);
        let mut eligible = selected.clone();
        eligible.and_not(&cordoned);
        eligible.and_not(&tainted);
        let mut unselected = all;
        unselected.and_not(&selected);
        unselected.and_not(&cordoned);
        unselected.and_not(&tainted);
        Judgement {
            eligible,
            cordoned,
            tainted,
            unselected,
        }
    }

    /// Nodes matching a `NodeSelector` (`nodeSelectorTerms`, ORed). A term without
    /// requirements matches no node, as in the scheduler.
    fn node_selector_terms(&self, selector: &Value) -> Bits {
        let mut matched = Bits::empty(self.nodes);
        let terms = selector
            .get("nodeSelectorTerms")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for term in terms {
            let expressions = array(term, "matchExpressions");
            let fields = array(term, "matchFields");
            if expressions.is_empty() && fields.is_empty() {
                continue;
            }
            let mut nodes = Bits::full(self.nodes);
            for expression in expressions {
                nodes.and(&self.label_requirement(expression));
            }
            for field in fields {
                nodes.and(&self.field_requirement(field));
            }
            matched.or(&nodes);
        }
        matched
    }

    /// Nodes matching one `NodeSelectorRequirement` on labels. An operator the scheduler
    /// does not know matches no node.
    fn label_requirement(&self, requirement: &Value) -> Bits {
        let key = requirement.get("key").and_then(Value::as_str).unwrap_or("");
        let values: Vec<&str> = array(requirement, "values")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let operator = requirement
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or("");
        let bound = || match values.as_slice() {
            [one] => one.parse::<i64>().ok(),
            _ => None,
        };
        match operator {
            "In" => self.with_label_where(key, |v| values.contains(&v)),
            "NotIn" => {
                let mut nodes = Bits::full(self.nodes);
                nodes.and_not(&self.with_label_where(key, |v| values.contains(&v)));
                nodes
            }
            "Exists" => self.with_label_where(key, |_| true),
            "DoesNotExist" => {
                let mut nodes = Bits::full(self.nodes);
                nodes.and_not(&self.with_label_where(key, |_| true));
                nodes
            }
            "Gt" | "Lt" => match bound() {
                Some(bound) => self.with_label_where(key, |v| {
                    v.parse::<i64>().is_ok_and(|v| {
                        if operator == "Gt" {
                            v > bound
                        } else {
                            v < bound
                        }
                    })
                }),
                None => Bits::empty(self.nodes),
            },
            _ => Bits::empty(self.nodes),
        }
    }

    /// Nodes matching one `matchFields` requirement: only `metadata.name` with `In` or
    /// `NotIn` exists.
    fn field_requirement(&self, requirement: &Value) -> Bits {
        let key = requirement.get("key").and_then(Value::as_str).unwrap_or("");
        let operator = requirement
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut named = Bits::empty(self.nodes);
        for name in array(requirement, "values")
            .iter()
            .filter_map(Value::as_str)
        {
            if let Some(&index) = self.names.get(name) {
                named.insert(index);
            }
        }
        match (key, operator) {
            ("metadata.name", "In") => named,
            ("metadata.name", "NotIn") => {
                let mut nodes = Bits::full(self.nodes);
                nodes.and_not(&named);
                nodes
            }
            _ => Bits::empty(self.nodes),
        }
    }

    /// The image labels a pod spec requires (Coral's nodeSelector entries, and `image.coral.dev/`
    /// keys of its required node affinity), judged with the rest of its constraints: `None`
    /// when it requires none.
    pub fn required_images(&self, pod_spec: &Value) -> Option<RequiredImages> {
        let labels = required_image_labels(pod_spec);
        if labels.is_empty() {
            return None;
        }
        let selector = pod_spec.get("nodeSelector").and_then(Value::as_object);
        let judgement = self.judge(pod_spec);
        let mut nodes = judgement.eligible.clone();
        for (key, value) in selector.into_iter().flatten() {
            match (key.starts_with(LABEL_PREFIX), value.as_str()) {
                (false, _) => {}
                (true, Some(value)) => match self.with_label(key, value) {
                    Some(set) => nodes.and(&set.dense(self.nodes)),
                    None => nodes = Bits::empty(self.nodes),
                },
                (true, None) => nodes = Bits::empty(self.nodes),
            }
        }
        let images = labels
            .into_iter()
            .map(|label| {
                let held = self
                    .with_label(label, LABEL_AVAILABLE)
                    .map(|set| set.dense(self.nodes))
                    .unwrap_or_else(|| Bits::empty(self.nodes));
                RequiredLabel {
                    label: label.to_string(),
                    held: held.count(),
                    usable: held.count_and(&judgement.eligible),
                }
            })
            .collect();
        Some(RequiredImages {
            nodes: nodes.count(),
            labels: images,
        })
    }

    /// Number of nodes a pod spec's own constraints allow.
    pub fn eligible_count(&self, pod_spec: &Value) -> usize {
        self.judge(pod_spec).eligible.count()
    }

    /// The `input.placement` document for a pod spec and the image labels of its containers
    /// (see the README, "Placement"):
    ///
    /// - `nodes`: how many nodes the pod's own constraints allow;
    /// - `images[label]`: of the nodes holding the image (`held`), how many the pod may use
    ///   (`nodes`) and why the others are ruled out (`cordoned`, `tainted`, `unselected`);
    /// - `groups`: the nodes the pod may use that hold at least one of its images, grouped by
    ///   which of them they hold (`labels`, sorted) with their number (`nodes`).
    pub fn for_pod(&self, pod_spec: &Value, labels: &[&str]) -> Value {
        let judgement = self.judge(pod_spec);
        let mut distinct: Vec<&str> = labels
            .iter()
            .map(|label| self.aliases.get(*label).map_or(*label, String::as_str))
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        let sets: Vec<Bits> = distinct
            .iter()
            .map(|label| match self.with_label(label, LABEL_AVAILABLE) {
                Some(set) => set.dense(self.nodes),
                None => Bits::empty(self.nodes),
            })
            .collect();

        let mut images = Map::with_capacity(distinct.len());
        for (label, held) in distinct.iter().zip(&sets) {
            images.insert(
                (*label).to_string(),
                json!({
                    "held": held.count(),
                    "nodes": held.count_and(&judgement.eligible),
                    "cordoned": held.count_and(&judgement.cordoned),
                    "tainted": held.count_and(&judgement.tainted),
                    "unselected": held.count_and(&judgement.unselected),
                }),
            );
        }

        let grouped = &sets[..sets.len().min(MAX_GROUPED_LABELS)];
        let mut holding = Bits::empty(self.nodes);
        grouped.iter().for_each(|set| holding.or(set));
        holding.and(&judgement.eligible);
        let mut groups: BTreeMap<u64, usize> = BTreeMap::new();
        for node in holding.iter() {
            let signature = grouped
                .iter()
                .enumerate()
                .filter(|(_, set)| set.contains(node))
                .fold(0u64, |signature, (bit, _)| signature | (1 << bit));
            *groups.entry(signature).or_default() += 1;
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(signature, nodes)| {
                let labels: Vec<&str> = distinct
                    .iter()
                    .enumerate()
                    .filter(|(bit, _)| *bit < MAX_GROUPED_LABELS && signature & (1 << bit) != 0)
                    .map(|(_, label)| *label)
                    .collect();
                json!({"labels": labels, "nodes": nodes})
            })
            .collect();

        json!({
            "nodes": judgement.eligible.count(),
            "images": images,
            "groups": groups,
        })
    }
}

/// The image labels a pod spec requires, sorted: the `image.coral.dev/` keys of its
/// nodeSelector and of its required node affinity.
pub fn required_image_labels(pod_spec: &Value) -> Vec<&str> {
    let mut labels: Vec<&str> = pod_spec
        .get("nodeSelector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(key, _)| key.as_str())
        .filter(|key| key.starts_with(LABEL_PREFIX))
        .collect();
    let terms = pod_spec
        .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution")
        .map(|required| array(required, "nodeSelectorTerms"))
        .unwrap_or_default();
    for term in terms {
        labels.extend(
            array(term, "matchExpressions")
                .iter()
                .filter_map(|e| e.get("key").and_then(Value::as_str))
                .filter(|key| key.starts_with(LABEL_PREFIX)),
        );
    }
    labels.sort_unstable();
    labels.dedup();
    labels
}

fn array<'a>(value: &'a Value, field: &str) -> &'a [Value] {
    value
        .get(field)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Kubernetes' `Toleration.ToleratesTaint`: an empty effect matches every effect, an empty key
/// (with `Exists`) every key; `Equal` (the default operator) compares values.
fn tolerates(toleration: &Value, taint: &NodeTaint) -> bool {
    let field = |name: &str| toleration.get(name).and_then(Value::as_str).unwrap_or("");
    let effect = field("effect");
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = field("key");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match field("operator") {
        "Exists" => true,
        "" | "Equal" => field("value") == taint.value,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
