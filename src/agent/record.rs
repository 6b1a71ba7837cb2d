//! What the agent writes about its node, computed from the tracker: the Node label patch and
//! the NodeImage status. Pure; the agent writes only when these differ from what is there.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::tracker::Tracker;
use crate::api::{ImageState, NodeImageEntry, NodeImageStatus};
use crate::image::{LABEL_AVAILABLE, is_image_label, label_key};

/// Longest error message kept per image in the NodeImage status.
const MAX_ERROR_CHARS: usize = 1024;

/// The Coral labels the node should carry: one per wanted image that is present (`Some`).
/// An image the agent has not looked for in the runtime yet (it was just wanted, or the agent
/// just started) keeps the label it has (`None`): a restarted agent must not take away, even
/// for a moment, the labels of what the node holds.
pub fn desired_labels(tracker: &Tracker) -> BTreeMap<String, Option<String>> {
    tracker
        .records()
        .filter(|r| r.state == ImageState::Available || !r.looked)
        .map(|r| {
            let value = r.looked.then(|| LABEL_AVAILABLE.to_string());
            (label_key(&r.reference), value)
        })
        .collect()
}

/// The JSON merge patch that brings the node's Coral labels to `desired`, or `None` when they
/// are already there. Labels that are not Coral's are never touched.
pub fn label_patch(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, Option<String>>,
) -> Option<Value> {
    let mut labels = Map::new();
    for (key, value) in desired {
        if let Some(value) = value
            && current.get(key) != Some(value)
        {
            labels.insert(key.clone(), Value::String(value.clone()));
        }
    }
    for key in current.keys() {
        if is_image_label(key) && !desired.contains_key(key) {
            labels.insert(key.clone(), Value::Null);
        }
    }
    (!labels.is_empty()).then(|| json!({"metadata": {"labels": labels}}))
}

/// Why the node asks for no new pulls: a DiskPressure or PIDPressure condition that is True.
pub fn node_pressure(node: &Node) -> Option<String> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    let pressing: Vec<&str> = conditions
        .iter()
        .filter(|c| {
            matches!(c.type_.as_str(), "DiskPressure" | "PIDPressure") && c.status == "True"
        })
        .map(|c| c.type_.as_str())
        .collect();
    (!pressing.is_empty()).then(|| format!("the node has {}", pressing.join(" and ")))
}

fn time(at: SystemTime) -> Option<Time> {
    Timestamp::try_from(at).ok().map(Time)
}

/// The NodeImage status of the tracker. Times come from the records and from `previous`, so
/// the same records give the same status and nothing is written when nothing changed.
pub fn node_image_status(
    tracker: &Tracker,
    paused: Option<&str>,
    previous: Option<&NodeImageStatus>,
    generation: Option<i64>,
) -> NodeImageStatus {
    let counts = tracker.counts();
    let images = tracker
        .records()
        .map(|record| NodeImageEntry {
            image: record.reference.to_string(),
            label: label_key(&record.reference),
            state: record.state,
            digest: record.held.as_ref().and_then(|h| h.digest.clone()),
            size_bytes: record
                .held
                .as_ref()
                .map(|h| i64::try_from(h.size).unwrap_or(i64::MAX)),
            attempts: i32::try_from(record.attempts).unwrap_or(i32::MAX),
            last_error: record
                .last_error
                .as_ref()
                .map(|e| e.chars().take(MAX_ERROR_CHARS).collect()),
            last_transition_time: time(record.transitioned),
        })
        .collect();
    let (status, reason, message) = match paused {
        Some(why) => ("True", "Pressure", format!("no new pulls: {why}")),
        None => ("False", "Pulling", "pulls are allowed".to_string()),
    };
    let previous_paused = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == "Paused"));
    let transition = match previous_paused {
        Some(condition) if condition.status == status => condition.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    NodeImageStatus {
        available: count(counts.available),
        pulling: count(counts.pulling),
        failed: count(counts.failed),
        conditions: vec![Condition {
            type_: "Paused".to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time: transition,
            observed_generation: generation,
        }],
        images,
        unwanted: tracker.retention().unwanted_status(),
        removals: tracker.retention().removals(),
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::agent::cri::RuntimeImage;
    use crate::agent::tracker::{Inventory, RetryPolicy};
    use crate::credentials::Keyring;
    use crate::image::ImageReference;

    fn tracker() -> Tracker {
        let mut tracker = Tracker::new(RetryPolicy::default());
        tracker.set_wanted(["nginx:1.27", "redis:7"].map(|i| {
            (
                ImageReference::parse(i).expect("valid"),
                Arc::new(Keyring::new()),
            )
        }));
        tracker.observe(
            &Inventory::new(vec![RuntimeImage {
                id: "sha256:a".into(),
                repo_tags: vec!["docker.io/library/nginx:1.27".into()],
                repo_digests: vec![],
                size: 10,
            }]),
            Instant::now(),
            false,
        );
        tracker
    }

    fn key(image: &str) -> String {
        label_key(&ImageReference::parse(image).expect("valid"))
    }

    #[test]
    fn the_label_patch_adds_present_images_and_removes_stale_coral_labels_only() {
        let tracker = tracker();
        let desired = desired_labels(&tracker);
        assert_eq!(
            desired,
            BTreeMap::from([(key("nginx:1.27"), Some("available".to_string()))])
        );
        let current = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), "node-a".to_string()),
            (key("busybox"), "available".to_string()),
        ]);
        let patch = label_patch(&current, &desired).expect("a change");
        assert_eq!(
            patch,
            json!({"metadata": {"labels": {key("nginx:1.27"): "available", key("busybox"): null}}})
        );
        let mut applied = current.clone();
        applied.remove(&key("busybox"));
        applied.insert(key("nginx:1.27"), "available".into());
        assert_eq!(label_patch(&applied, &desired), None, "nothing to write");
    }

    #[test]
    fn labels_of_images_not_looked_for_yet_stay() {
        // A restarted agent wants nginx and redis before it has listed the runtime: the
        // node's nginx label stays until the runtime says otherwise.
        let mut tracker = Tracker::new(RetryPolicy::default());
        tracker.set_wanted(["nginx:1.27", "redis:7"].map(|i| {
            (
                ImageReference::parse(i).expect("valid"),
                Arc::new(Keyring::new()),
            )
        }));
        let current = BTreeMap::from([(key("nginx:1.27"), "available".to_string())]);
        assert_eq!(label_patch(&current, &desired_labels(&tracker)), None);
        // Listed without nginx: its label goes.
        tracker.observe(&Inventory::new(Vec::new()), Instant::now(), false);
        assert_eq!(
            label_patch(&current, &desired_labels(&tracker)),
            Some(json!({"metadata": {"labels": {key("nginx:1.27"): null}}}))
        );
    }

    #[test]
    fn node_pressure_reads_disk_and_pid_pressure() {
        let node = |conditions: serde_json::Value| -> Node {
            serde_json::from_value(
                json!({"metadata": {"name": "a"}, "status": {"conditions": conditions}}),
            )
            .expect("node")
        };
        assert_eq!(
            node_pressure(&node(json!([{"type": "Ready", "status": "True"}]))),
            None
        );
        assert_eq!(
            node_pressure(&node(
                json!([{"type": "DiskPressure", "status": "True"}, {"type": "PIDPressure", "status": "False"}])
            )),
            Some("the node has DiskPressure".to_string())
        );
        assert_eq!(
            node_pressure(&node(
                json!([{"type": "DiskPressure", "status": "True"}, {"type": "PIDPressure", "status": "True"}])
            )),
            Some("the node has DiskPressure and PIDPressure".to_string())
        );
    }

    #[test]
    fn the_status_is_stable_for_the_same_records() {
        let tracker = tracker();
        let first = node_image_status(&tracker, None, None, Some(3));
        assert_eq!((first.available, first.pulling, first.failed), (1, 1, 0));
        assert_eq!(first.images.len(), 2);
        assert_eq!(first.images[0].image, "docker.io/library/nginx:1.27");
        assert_eq!(first.images[0].size_bytes, Some(10));
        assert_eq!(first.conditions[0].status, "False");
        let again = node_image_status(&tracker, None, Some(&first), Some(3));
        assert_eq!(again, first, "same records, same status: nothing to write");
        let paused = node_image_status(
            &tracker,
            Some("the node has DiskPressure"),
            Some(&first),
            Some(3),
        );
        assert_eq!(paused.conditions[0].status, "True");
        assert_eq!(
            paused.conditions[0].message,
            "no new pulls: the node has DiskPressure"
        );
    }
}
