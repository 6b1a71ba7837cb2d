//! The aggregation of node records into ImageSet status. Pure and incremental: a node's labels
//! or NodeImage changing updates the counts of the ImageSets that target it (the node's old
//! contribution taken out, its new one added), without a recompute over every node.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ImageSet, ImageSetImageStatus, ImageSetStatus, ImageState, NodeImage};
use crate::image::{ImageReference, LABEL_AVAILABLE, label_key};
use crate::index::{Selector, validate_image_set};

/// `(namespace, name)` of an ImageSet.
pub type SetKey = (String, String);

/// What one node says of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeEntry {
    state: ImageState,
    digest: Option<String>,
    error: Option<String>,
}

/// What the aggregation knows of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeRecord {
    labels: BTreeMap<String, String>,
    /// From its NodeImage, by normalized reference.
    images: HashMap<String, NodeEntry>,
}

/// One image of an ImageSet.
#[derive(Debug, Clone)]
struct SetImage {
    raw: String,
    normalized: String,
    label: String,
}

/// Counts of one image of one ImageSet over the nodes it targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageCounts {
    pub available: usize,
    pub pulling: usize,
    pub failed: usize,
    /// Digests the nodes holding the image reported, with the nodes that reported each.
    pub digests: BTreeMap<String, BTreeSet<String>>,
    /// Last error per node where the image failed.
    pub failures: BTreeMap<String, String>,
}

impl ImageCounts {
    /// The digest most nodes holding the image hold (the smallest such digest on a tie, so the
    /// answer is stable).
    pub fn majority(&self) -> Option<&str> {
        let most = self.digests.values().map(BTreeSet::len).max()?;
        self.digests
            .iter()
            .find(|(_, nodes)| nodes.len() == most)
            .map(|(digest, _)| digest.as_str())
    }

    /// Every digest held, the most held first (at most 10), when there is more than one.
    pub fn distinct(&self) -> Vec<String> {
        if self.digests.len() < 2 {
            return Vec::new();
        }
        let mut digests: Vec<(&String, usize)> = self
            .digests
            .iter()
            .map(|(d, nodes)| (d, nodes.len()))
            .collect();
        digests.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        digests
            .into_iter()
            .take(10)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Nodes holding the image under another digest than the majority's.
    pub fn differing(&self) -> usize {
        let majority = self.majority();
        self.digests
            .iter()
            .filter(|(digest, _)| Some(digest.as_str()) != majority)
            .map(|(_, nodes)| nodes.len())
            .sum()
    }
}

#[derive(Debug, Clone)]
struct SetRecord {
    images: Vec<SetImage>,
    /// `None` when the spec is invalid: the set targets no node.
    selector: Option<Selector>,
    invalid: Option<String>,
    targeted: usize,
    counts: Vec<ImageCounts>,
}

/// The counts of every ImageSet, kept up to date as nodes and ImageSets change.
#[derive(Debug, Clone, Default)]
pub struct Aggregator {
    sets: BTreeMap<SetKey, SetRecord>,
    nodes: HashMap<String, NodeRecord>,
}

/// The aggregated view of one ImageSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSummary<'a> {
    pub targeted: usize,
    /// Why the spec cannot be used, when it cannot.
    pub invalid: Option<&'a str>,
    /// `(as written, normalized, label, counts)` per image, in spec order.
    pub images: Vec<(&'a str, &'a str, &'a str, &'a ImageCounts)>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an ImageSet, counting it over every node.
    pub fn apply_image_set(&mut self, set: &ImageSet) {
        let key = (
            set.metadata.namespace.clone().unwrap_or_default(),
            set.metadata.name.clone().unwrap_or_default(),
        );
        let (images, selector, invalid) = match validate_image_set(&set.spec) {
            Ok(valid) => (
                set.spec
                    .images
                    .iter()
                    .zip(&valid.images)
                    .map(|(raw, reference)| image(raw, reference))
                    .collect(),
                Some(valid.selector),
                None,
            ),
            Err(error) => (Vec::new(), None, Some(error.to_string())),
        };
        let mut record = SetRecord {
            counts: vec![ImageCounts::default(); images.len()],
            images,
            selector,
            invalid,
            targeted: 0,
        };
        for (name, node) in &self.nodes {
            if record.targets(node) {
                record.add(name, node, 1);
            }
        }
        self.sets.insert(key, record);
    }

    pub fn delete_image_set(&mut self, namespace: &str, name: &str) {
        self.sets.remove(&(namespace.to_string(), name.to_string()));
    }

    /// Sets a node's labels.
    pub fn apply_node_labels(&mut self, name: &str, labels: BTreeMap<String, String>) {
        self.update_node(name, |node| node.labels = labels);
    }

    /// Sets what a node's NodeImage reports.
    pub fn apply_node_image(&mut self, node_image: &NodeImage) {
        let images: HashMap<String, NodeEntry> = node_image
            .status
            .iter()
            .flat_map(|status| &status.images)
            .filter_map(|entry| {
                let normalized = ImageReference::parse(&entry.image).ok()?.to_string();
                Some((
                    normalized,
                    NodeEntry {
                        state: entry.state,
                        digest: entry.digest.clone(),
                        error: entry.last_error.clone(),
                    },
                ))
            })
            .collect();
        self.update_node(&node_image.spec.node_name, |node| node.images = images);
    }

    /// Forgets what a node's NodeImage reported (it was deleted).
    pub fn delete_node_image(&mut self, node: &str) {
        if self.nodes.contains_key(node) {
            self.update_node(node, |node| node.images.clear());
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        if let Some(old) = self.nodes.remove(name) {
            for set in self.sets.values_mut() {
                if set.targets(&old) {
                    set.add(name, &old, -1);
                }
            }
        }
    }

    /// Replaces one node's record: its old contribution is taken out of the sets that
    /// targeted it, its new one added to the sets that target it.
    fn update_node(&mut self, name: &str, change: impl FnOnce(&mut NodeRecord)) {
        let old = self.nodes.remove(name);
        let mut node = old.clone().unwrap_or_default();
        change(&mut node);
        for set in self.sets.values_mut() {
            if let Some(old) = &old
                && set.targets(old)
            {
                set.add(name, old, -1);
            }
            if set.targets(&node) {
                set.add(name, &node, 1);
            }
        }
        self.nodes.insert(name.to_string(), node);
    }

    pub fn summary(&self, namespace: &str, name: &str) -> Option<SetSummary<'_>> {
        let set = self.sets.get(&(namespace.to_string(), name.to_string()))?;
        Some(SetSummary {
            targeted: set.targeted,
            invalid: set.invalid.as_deref(),
            images: set
                .images
                .iter()
                .zip(&set.counts)
                .map(|(image, counts)| {
                    (
                        image.raw.as_str(),
                        image.normalized.as_str(),
                        image.label.as_str(),
                        counts,
                    )
                })
                .collect(),
        })
    }

    /// Nodes that carry a label, by name.
    pub fn nodes_with_label(&self, label: &str) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.labels.contains_key(label))
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

fn image(raw: &str, reference: &ImageReference) -> SetImage {
    SetImage {
        raw: raw.to_string(),
        normalized: reference.to_string(),
        label: label_key(reference),
    }
}

impl SetRecord {
    fn targets(&self, node: &NodeRecord) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| s.matches(&node.labels))
    }

    /// Adds (`sign` 1) or takes out (`sign` -1) one targeted node's contribution.
    fn add(&mut self, name: &str, node: &NodeRecord, sign: isize) {
        let step = |count: &mut usize| *count = count.saturating_add_signed(sign);
        step(&mut self.targeted);
        for (image, counts) in self.images.iter().zip(self.counts.iter_mut()) {
            let entry = node.images.get(&image.normalized);
            if node.labels.get(&image.label).map(String::as_str) == Some(LABEL_AVAILABLE) {
                step(&mut counts.available);
                if let Some(digest) = entry.and_then(|e| e.digest.as_ref()) {
                    let nodes = counts.digests.entry(digest.clone()).or_default();
                    if sign > 0 {
                        nodes.insert(name.to_string());
                    } else {
                        nodes.remove(name);
                    }
                    if nodes.is_empty() {
                        counts.digests.remove(digest);
                    }
                }
            } else if let Some(entry) = entry.filter(|e| e.state == ImageState::Failed) {
                step(&mut counts.failed);
                if sign > 0 {
                    counts.failures.insert(
                        name.to_string(),
                        entry.error.clone().unwrap_or_else(|| "pull failed".into()),
                    );
                } else {
                    counts.failures.remove(name);
                }
            } else {
                step(&mut counts.pulling);
            }
        }
    }
}

/// Problems found outside the aggregation, such as missing pull secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems {
    /// `namespace/name` of referenced pull secrets that do not exist or cannot be used.
    pub secrets: Vec<String>,
}

/// The status of an ImageSet. Conditions keep their `lastTransitionTime` while their status
/// stays the same, so an unchanged picture gives an unchanged status.
pub fn image_set_status(
    generation: Option<i64>,
    summary: &SetSummary<'_>,
    problems: &Problems,
    previous: Option<&ImageSetStatus>,
    now: &Time,
) -> ImageSetStatus {
    let clamp = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let targeted = summary.targeted;
    let images: Vec<ImageSetImageStatus> = summary
        .images
        .iter()
        .map(|(raw, normalized, label, counts)| ImageSetImageStatus {
            image: (*raw).to_string(),
            normalized: (*normalized).to_string(),
            label: (*label).to_string(),
            digest: counts.majority().map(str::to_string),
            nodes_differing: clamp(counts.differing()),
            digests: counts.distinct(),
            nodes_targeted: clamp(targeted),
            nodes_available: clamp(counts.available),
            nodes_pulling: clamp(counts.pulling),
            nodes_failed: clamp(counts.failed),
            // The mirror worker's part; see `mirroring::with_mirror`.
            mirror: None,
        })
        .collect();
    let complete = summary
        .images
        .iter()
        .filter(|(_, _, _, c)| c.available == targeted)
        .count();
    let pulling: usize = summary.images.iter().map(|(_, _, _, c)| c.pulling).sum();
    let failing: Vec<(&str, &str, &str)> = summary
        .images
        .iter()
        .flat_map(|(raw, _, _, c)| {
            c.failures
                .iter()
                .map(move |(node, error)| (*raw, node.as_str(), error.as_str()))
        })
        .collect();
    let total = summary.images.len();

    let ready = if let Some(invalid) = summary.invalid {
        ("False", "InvalidSpec", invalid.to_string())
    } else if targeted == 0 {
        (
            "True",
            "NoNodesSelected",
            "the node selector matches no node".to_string(),
        )
    } else if complete == total {
        (
            "True",
            "AllAvailable",
            format!("all {total} image(s) are on all {targeted} targeted node(s)"),
        )
    } else {
        (
            "False",
            "NotAllAvailable",
            format!("{complete} of {total} image(s) are on all {targeted} targeted node(s)"),
        )
    };
    let progressing = if pulling > 0 {
        (
            "True",
            "Pulling",
            format!("{pulling} pull(s) pending or under way on the targeted nodes"),
        )
    } else {
        ("False", "Idle", "no pulls pending".to_string())
    };
    let degraded = if let Some(invalid) = summary.invalid {
        ("True", "InvalidSpec", invalid.to_string())
    } else if !problems.secrets.is_empty() {
        (
            "True",
            "SecretMissing",
            format!(
                "pull secret(s) not found or not usable: {}",
                problems.secrets.join(", ")
            ),
        )
    } else if let Some((image, node, error)) = failing.first() {
        let more = if failing.len() > 1 {
            format!(" ({} failure(s) in all)", failing.len())
        } else {
            String::new()
        };
        (
            "True",
            "PullFailed",
            format!("{image} failed on node {node}: {error}{more}"),
        )
    } else {
        ("False", "AsExpected", "no failures".to_string())
    };
    let conditions = [
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(kind, (status, reason, message))| {
        condition(
            kind,
            status,
            reason,
            message,
            generation,
            previous_conditions(previous),
            now,
        )
    })
    .collect();
    ImageSetStatus {
        observed_generation: generation,
        conditions,
        image_count: clamp(total),
        nodes_targeted: clamp(targeted),
        images_complete: clamp(complete),
        images,
        // The controller adds what is retiring; see `retiring`.
        retiring: Vec::new(),
    }
}

/// The conditions of a previous status, if there is one.
pub(crate) fn previous_conditions(previous: Option<&ImageSetStatus>) -> &[Condition] {
    previous.map_or(&[], |p| p.conditions.as_slice())
}

/// A condition that keeps its `lastTransitionTime` from `previous` while its status stays.
pub(crate) fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let message: String = message.chars().take(32_000).collect();
    let transition = previous
        .iter()
        .find(|c| c.type_ == kind)
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: transition,
        observed_generation: generation,
    }
}

/// The condition type of a reference held under different digests.
pub const DIGEST_DRIFT_CONDITION: &str = "DigestDrift";

/// Nodes a `DigestDrift` message names, per image.
const DRIFT_NODES_SHOWN: usize = 10;

/// How one image's digests disagree: across the nodes holding it, or between them and the
/// digest the mirror copied from the source. `None` when they agree.
pub fn image_drift(image: &ImageSetImageStatus, counts: &ImageCounts) -> Option<String> {
    let mirrored = image
        .mirror
        .as_ref()
        .filter(|m| m.state == crate::api::MirrorState::Mirrored)
        .and_then(|m| m.source_digest.as_deref());
    let mirror_differs = mirrored.is_some_and(|d| counts.digests.keys().any(|n| n != d));
    if counts.digests.len() < 2 && !mirror_differs {
        return None;
    }
    let majority = counts.majority();
    let mut parts: Vec<String> = Vec::new();
    for (digest, nodes) in &counts.digests {
        if Some(digest.as_str()) == majority && !mirror_differs {
            parts.push(format!("{digest} on {} node(s)", nodes.len()));
        } else {
            let shown: Vec<&str> = nodes
                .iter()
                .take(DRIFT_NODES_SHOWN)
                .map(String::as_str)
                .collect();
            let more = nodes.len().saturating_sub(DRIFT_NODES_SHOWN);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            parts.push(format!("{digest} on {}{more}", shown.join(", ")));
        }
    }
    if let Some(digest) = mirrored {
        parts.push(format!("the mirror copied {digest}"));
    }
    Some(format!("{}: {}", image.image, parts.join("; ")))
}

/// Adds the `DigestDrift` condition: true while a reference is held under different digests
/// across the targeted nodes, or by nodes and the mirror (a moved tag that some nodes pulled
/// again and others not; `spec.refresh` brings them together).
pub fn with_drift(
    mut status: ImageSetStatus,
    summary: &SetSummary<'_>,
    previous: Option<&ImageSetStatus>,
    now: &Time,
) -> ImageSetStatus {
    status
        .conditions
        .retain(|c| c.type_ != DIGEST_DRIFT_CONDITION);
    let drifts: Vec<String> = status
        .images
        .iter()
        .zip(&summary.images)
        .filter_map(|(image, (_, _, _, counts))| image_drift(image, counts))
        .collect();
    let (state, reason, message) = if drifts.is_empty() {
        (
            "False",
            "Consistent",
            "every image is held under one digest".to_string(),
        )
    } else {
        (
            "True",
            "DigestsDiffer",
            format!(
                "{} image(s) held under different digests: {}",
                drifts.len(),
                drifts.join(" | ")
            ),
        )
    };
    status.conditions.push(condition(
        DIGEST_DRIFT_CONDITION,
        state,
        reason,
        message,
        status.observed_generation,
        previous_conditions(previous),
        now,
    ));
    status
}

/// An Event to record on an ImageSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

fn is_true(status: &ImageSetStatus, kind: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

/// The transitions between two statuses worth an Event: an image available on its first node,
/// the set becoming Ready, and new failures (with the node and the error).
pub fn transitions(
    previous: Option<&ImageSetStatus>,
    next: &ImageSetStatus,
    summary: &SetSummary<'_>,
) -> Vec<Notice> {
    let mut notices = Vec::new();
    let before = |normalized: &str| {
        previous.and_then(|p| p.images.iter().find(|i| i.normalized == normalized))
    };
    for (image, (_, _, _, counts)) in next.images.iter().zip(&summary.images) {
        let old = before(&image.normalized);
        let (old_available, old_failed) =
            old.map_or((0, 0), |o| (o.nodes_available, o.nodes_failed));
        if old_available == 0 && image.nodes_available > 0 {
            notices.push(Notice {
                warning: false,
                reason: "ImageAvailable",
                message: format!(
                    "{} is available on its first node ({} of {} targeted)",
                    image.image, image.nodes_available, image.nodes_targeted
                ),
            });
        }
        if image.nodes_failed > old_failed
            && let Some((node, error)) = counts.failures.iter().next()
        {
            notices.push(Notice {
                warning: true,
                reason: "PullFailed",
                message: format!(
                    "{} failed on {} node(s), node {node}: {error}",
                    image.image, image.nodes_failed
                ),
            });
        }
    }
    let drifted = previous.is_some_and(|p| is_true(p, DIGEST_DRIFT_CONDITION));
    if !drifted
        && is_true(next, DIGEST_DRIFT_CONDITION)
        && let Some(condition) = next
            .conditions
            .iter()
            .find(|c| c.type_ == DIGEST_DRIFT_CONDITION)
    {
        notices.push(Notice {
            warning: true,
            reason: "DigestDrift",
            message: condition.message.clone(),
        });
    }
    let was_ready = previous.is_some_and(|p| is_true(p, "Ready"));
    if !was_ready && is_true(next, "Ready") && next.nodes_targeted > 0 {
        notices.push(Notice {
            warning: false,
            reason: "AllAvailable",
            message: format!(
                "all {} image(s) are available on all {} targeted node(s)",
                next.image_count, next.nodes_targeted
            ),
        });
    }
    notices
}

#[cfg(test)]
mod tests;
