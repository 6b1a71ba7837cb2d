//! Workloads stranded by image labels: a pod template that requires image labels (Coral's
//! nodeSelector entries, or `image.coral.dev/` keys in its required node affinity) which fewer
//! than `minAvailableNodes` schedulable nodes satisfy together with its other constraints. Such
//! a workload cannot start a new pod where it could before. `coral audit` and the controller
//! report them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::Placement;
use crate::policy::WorkloadKind;

/// A workload whose pod template too few nodes satisfy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stranded {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Schedulable nodes that satisfy its pod template.
    pub nodes: usize,
    /// Nodes it needs (`minAvailableNodes`).
    pub needed: usize,
    /// The image labels its template requires.
    pub images: Vec<StrandedImage>,
}

/// One image label a stranded workload requires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrandedImage {
    pub label: String,
    /// The managed image of the label; `None` when no ImageSet manages it (any more).
    pub image: Option<String>,
    /// Nodes holding it.
    pub held: usize,
    /// Of those, the nodes the template's other constraints allow.
    pub usable: usize,
}

impl Stranded {
    /// Why the workload is stranded, in one sentence.
    pub fn reason(&self) -> String {
        let images: Vec<String> = self
            .images
            .iter()
            .map(|image| {
                let name = match &image.image {
                    Some(reference) => reference.clone(),
                    None => format!("{} (no ImageSet manages it)", image.label),
                };
                format!("{name} on {} node(s), {} usable", image.held, image.usable)
            })
            .collect();
        format!(
            "its pod template requires {}; {} schedulable node(s) satisfy it, {} needed (minAvailableNodes)",
            images.join(", "),
            self.nodes,
            self.needed
        )
    }
}

/// The kind and pod spec of a workload that schedules pods of its own. Objects a controller
/// owns (a Deployment's ReplicaSets and Pods, a CronJob's Jobs) are left to their owner, and
/// Pods already bound to a node are running where they are: both give `None`.
pub fn scheduling_pod_spec(object: &Value) -> Option<(WorkloadKind, &Value)> {
    let kind = WorkloadKind::of_object(object)?;
    let controlled = object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|owner| owner.get("controller") == Some(&Value::Bool(true)));
    if controlled {
        return None;
    }
    let pod_spec = object.pointer(kind.pod_spec_path())?;
    let bound = pod_spec
        .get("nodeName")
        .and_then(Value::as_str)
        .is_some_and(|name| !name.is_empty());
    if kind == WorkloadKind::Pod && bound {
        return None;
    }
    Some((kind, pod_spec))
}

/// `Kind namespace/name` of an object, as Coral names workloads in messages.
pub fn workload_name(kind: WorkloadKind, object: &Value) -> String {
    let field = |name: &str| {
        object
            .pointer(&format!("/metadata/{name}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    format!("{} {}/{}", kind.name(), field("namespace"), field("name"))
}

/// Judges one workload object (see [`scheduling_pod_spec`] for which are judged): `None`
/// unless its pod template requires image labels too few nodes satisfy.
pub fn stranded_workload(
    object: &Value,
    placement: &Placement,
    images_by_label: &BTreeMap<String, String>,
    min_nodes: usize,
) -> Option<Stranded> {
    let (kind, pod_spec) = scheduling_pod_spec(object)?;
    let metadata = object.get("metadata")?;
    let required = placement.required_images(pod_spec)?;
    let needed = min_nodes.max(1);
    if required.nodes >= needed {
        return None;
    }
    let text = |field: &str| {
        metadata
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some(Stranded {
        kind: kind.name(),
        namespace: text("namespace"),
        name: text("name"),
        nodes: required.nodes,
        needed,
        images: required
            .labels
            .into_iter()
            .map(|label| StrandedImage {
                image: images_by_label.get(&label.label).cloned(),
                label: label.label,
                held: label.held,
                usable: label.usable,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests;
