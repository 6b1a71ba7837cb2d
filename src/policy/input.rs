//! The `input` document of one decision: the admission request, the namespace's labels, where
//! the pod spec lives, and one entry per container with its normalized image.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, ReplicationController};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::PolicyError;
use crate::image::{ImageReference, label_key};
use crate::index::Placement;

/// The kinds Coral mutates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    ReplicationController,
    Job,
    CronJob,
}

/// Container lists of a pod spec, in the order `input.containers` lists them.
pub const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 8] = [
        Self::Pod,
        Self::Deployment,
        Self::StatefulSet,
        Self::DaemonSet,
        Self::ReplicaSet,
        Self::ReplicationController,
        Self::Job,
        Self::CronJob,
    ];

    /// The kind for an API group and kind name (`""`/`Pod`, `apps`/`Deployment`, …).
    pub fn from_group_kind(group: &str, kind: &str) -> Option<Self> {
        Some(match (group, kind) {
            ("", "Pod") => Self::Pod,
            ("", "ReplicationController") => Self::ReplicationController,
            ("apps", "Deployment") => Self::Deployment,
            ("apps", "StatefulSet") => Self::StatefulSet,
            ("apps", "DaemonSet") => Self::DaemonSet,
            ("apps", "ReplicaSet") => Self::ReplicaSet,
            ("batch", "Job") => Self::Job,
            ("batch", "CronJob") => Self::CronJob,
            _ => return None,
        })
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of_object(object: &Value) -> Option<Self> {
        let api_version = object.get("apiVersion")?.as_str()?;
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        Self::from_group_kind(group, object.get("kind")?.as_str()?)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::ReplicaSet => "ReplicaSet",
            Self::ReplicationController => "ReplicationController",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }

    /// JSON pointer to the pod spec inside an object of this kind.
    pub fn pod_spec_path(self) -> &'static str {
        match self {
            Self::Pod => "/spec",
            Self::CronJob => "/spec/jobTemplate/spec/template/spec",
            _ => "/spec/template/spec",
        }
    }

    /// Checks that an object still deserializes as this kind's Kubernetes type.
    pub fn check_typed(self, object: &Value) -> Result<(), serde_json::Error> {
        fn check<T: for<'de> Deserialize<'de>>(object: &Value) -> Result<(), serde_json::Error> {
            T::deserialize(object).map(|_| ())
        }
        match self {
            Self::Pod => check::<Pod>(object),
            Self::Deployment => check::<Deployment>(object),
            Self::StatefulSet => check::<StatefulSet>(object),
            Self::DaemonSet => check::<DaemonSet>(object),
            Self::ReplicaSet => check::<ReplicaSet>(object),
            Self::ReplicationController => check::<ReplicationController>(object),
            Self::Job => check::<Job>(object),
            Self::CronJob => check::<CronJob>(object),
        }
    }
}

/// `group`, `version`, `kind` of an admission request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    pub kind: String,
}

/// `group`, `version`, `resource` of an admission request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

/// The fields of an `admission.k8s.io/v1` AdmissionRequest that policies see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRequest {
    #[serde(default)]
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub resource: GroupVersionResource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_resource: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub user_info: Value,
    #[serde(default)]
    pub dry_run: bool,
    pub object: Value,
    #[serde(default)]
    pub old_object: Value,
}

impl PolicyRequest {
    /// A CREATE request for a bare object, as the API server would send it.
    pub fn create(object: Value, default_namespace: &str) -> Result<Self, PolicyError> {
        let kind = WorkloadKind::of_object(&object).ok_or_else(|| unsupported(&object))?;
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"]
            .as_str()
            .unwrap_or(default_namespace)
            .to_string();
        let name = metadata["name"]
            .as_str()
            .or_else(|| metadata["generateName"].as_str())
            .unwrap_or_default()
            .to_string();
        let plural = format!("{}s", kind.name().to_lowercase());
        Ok(Self {
            uid: "00000000-0000-0000-0000-000000000000".to_string(),
            kind: GroupVersionKind {
                group: group.to_string(),
                version: version.to_string(),
                kind: kind.name().to_string(),
            },
            resource: GroupVersionResource {
                group: group.to_string(),
                version: version.to_string(),
                resource: plural,
            },
            sub_resource: None,
            operation: "CREATE".to_string(),
            namespace,
            name,
            user_info: json!({"username": "coral-policy-eval"}),
            dry_run: true,
            object,
            old_object: Value::Null,
        })
    }

    /// The workload kind of the request.
    pub fn workload_kind(&self) -> Result<WorkloadKind, PolicyError> {
        WorkloadKind::from_group_kind(&self.kind.group, &self.kind.kind)
            .ok_or_else(|| unsupported(&self.object))
    }
}

fn unsupported(object: &Value) -> PolicyError {
    PolicyError::UnsupportedKind {
        api_version: object["apiVersion"]
            .as_str()
            .unwrap_or("<none>")
            .to_string(),
        kind: object["kind"].as_str().unwrap_or("<none>").to_string(),
    }
}

/// One `input.containers` entry per container, init container and ephemeral container.
pub fn containers(object: &Value, kind: WorkloadKind) -> Vec<Value> {
    containers_after(object, kind, &[])
}

/// Like [`containers`], reusing the image fields of `previous` entries (of the same object
/// before a patch) whose image is unchanged, so each image is parsed once per decision.
pub fn containers_after(object: &Value, kind: WorkloadKind, previous: &[Value]) -> Vec<Value> {
    let path = kind.pod_spec_path();
    let Some(pod_spec) = object.pointer(path) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for list in CONTAINER_LISTS {
        let Some(items) = pod_spec.get(list).and_then(Value::as_array) else {
            continue;
        };
        for (index, container) in items.iter().enumerate() {
            let mut entry = Map::new();
            entry.insert(
                "name".into(),
                container.get("name").cloned().unwrap_or(Value::Null),
            );
            entry.insert("list".into(), list.into());
            entry.insert("index".into(), index.into());
            entry.insert("path".into(), format!("{path}/{list}/{index}").into());
            if let Some(policy) = container.get("imagePullPolicy") {
                entry.insert("imagePullPolicy".into(), policy.clone());
            }
            let image = container.get("image").and_then(Value::as_str);
            let before = previous.get(entries.len()).filter(|before| {
                image.is_some()
                    && before["path"] == entry["path"]
                    && before["image"].as_str() == image
            });
            match (image, before) {
                (Some(image), Some(before)) => {
                    entry.insert("image".into(), image.into());
                    for field in ["label", "normalized", "error"] {
                        if let Some(value) = before.get(field) {
                            entry.insert(field.into(), value.clone());
                        }
                    }
                }
                (Some(image), None) => {
                    entry.insert("image".into(), image.into());
                    match ImageReference::parse(image) {
                        Ok(reference) => {
                            entry.insert("label".into(), label_key(&reference).into());
                            entry.insert("normalized".into(), reference.to_string().into());
                        }
                        Err(error) => {
                            entry.insert("error".into(), error.to_string().into());
                        }
                    }
                }
                (None, _) => {
                    entry.insert("error".into(), "the container has no image".into());
                }
            }
            entries.push(Value::Object(entry));
        }
    }
    entries
}

/// Gives each container entry with a valid reference its `key`: the managed image it runs,
/// the source image for a mirror reference, the tagged image for a pinned one (as
/// `placement` knows them), else its normalized reference. Policies look images up by it, so
/// a copy, or a pinned reference, is the same image as its source. A container whose key is
/// another image gets that image's `label` too: it needs the nodes holding that image.
pub fn with_keys(entries: &mut [Value], placement: &Placement) {
    for entry in entries {
        let Some(normalized) = entry.get("normalized").and_then(Value::as_str) else {
            continue;
        };
        let key = placement.image_key(normalized);
        let label = (key != normalized)
            .then(|| ImageReference::parse(&key).ok())
            .flatten()
            .map(|reference| label_key(&reference));
        let key = key.into_owned();
        if let Some(fields) = entry.as_object_mut() {
            fields.insert("key".into(), key.into());
            if let Some(label) = label {
                fields.insert("label".into(), label.into());
            }
        }
    }
}

/// `input.placement` of an object: where its pod spec's own constraints let it run, and which
/// of those nodes hold the images of its containers and init containers.
pub fn pod_placement(
    placement: &Placement,
    object: &Value,
    kind: WorkloadKind,
    containers: &[Value],
) -> Value {
    let empty = Value::Object(Map::new());
    let pod_spec = object.pointer(kind.pod_spec_path()).unwrap_or(&empty);
    let labels: Vec<&str> = containers
        .iter()
        .filter(|c| c["list"] != "ephemeralContainers")
        .filter_map(|c| c.get("label").and_then(Value::as_str))
        .collect();
    placement.for_pod(pod_spec, &labels)
}

/// What [`pod_placement`] reads of an object: the pod spec's constraints (Coral's own
/// nodeSelector entries aside) and the image labels of its containers. Equal keys give equal
/// placements.
pub fn placement_key(object: &Value, kind: WorkloadKind, containers: &[Value]) -> Value {
    let pod_spec = object.pointer(kind.pod_spec_path());
    let field = |name: &str| pod_spec.and_then(|spec| spec.get(name)).cloned();
    // No nodeSelector and one with Coral's entries only constrain alike.
    let selector: Map<String, Value> = pod_spec
        .and_then(|spec| spec.get("nodeSelector"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(key, _)| !key.starts_with(crate::image::LABEL_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let required = pod_spec
        .and_then(|spec| {
            spec.pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution")
        })
        .cloned();
    let labels: Vec<Value> = containers
        .iter()
        .filter(|c| c["list"] != "ephemeralContainers")
        .map(|c| c.get("label").cloned().unwrap_or(Value::Null))
        .collect();
    json!([
        selector,
        required,
        field("tolerations"),
        field("nodeName"),
        labels
    ])
}

/// The `input` document for a request of a known kind.
///
/// `containers` are the object's entries from [`containers`], `placement` its
/// [`pod_placement`].
pub fn build_input(
    request: &PolicyRequest,
    kind: WorkloadKind,
    object: &Value,
    containers: Vec<Value>,
    namespace_labels: &BTreeMap<String, String>,
    placement: Value,
) -> Value {
    // Built field by field from clones: `json!` would serialize each borrowed value instead.
    let labels: Map<String, Value> = namespace_labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let gvk = |group: &str, version: &str, name: (&str, &str)| {
        let mut map = Map::new();
        map.insert("group".into(), group.into());
        map.insert("version".into(), version.into());
        map.insert(name.0.into(), name.1.into());
        Value::Object(map)
    };
    let mut input = Map::with_capacity(16);
    input.insert("uid".into(), request.uid.clone().into());
    input.insert(
        "kind".into(),
        gvk(
            &request.kind.group,
            &request.kind.version,
            ("kind", &request.kind.kind),
        ),
    );
    input.insert(
        "resource".into(),
        gvk(
            &request.resource.group,
            &request.resource.version,
            ("resource", &request.resource.resource),
        ),
    );
    input.insert(
        "subResource".into(),
        request
            .sub_resource
            .clone()
            .map_or(Value::Null, Value::String),
    );
    input.insert("operation".into(), request.operation.clone().into());
    input.insert("namespace".into(), request.namespace.clone().into());
    input.insert("name".into(), request.name.clone().into());
    input.insert("userInfo".into(), request.user_info.clone());
    input.insert("dryRun".into(), request.dry_run.into());
    input.insert("object".into(), object.clone());
    input.insert("oldObject".into(), request.old_object.clone());
    input.insert("namespace_labels".into(), Value::Object(labels));
    input.insert("pod_spec_path".into(), kind.pod_spec_path().into());
    input.insert("containers".into(), Value::Array(containers));
    input.insert("placement".into(), placement);
    Value::Object(input)
}
