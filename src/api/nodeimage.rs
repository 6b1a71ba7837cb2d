//! `NodeImage`: what one node's agent holds, written only by that agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The images one node holds. Named after the node and owned by it.
// kube-derive repeats `type_` once per printer column, which clippy takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "coral.dev",
    version = "v1alpha1",
    kind = "NodeImage",
    plural = "nodeimages",
    shortname = "nimg",
    category = "coral",
    status = "NodeImageStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "NodeImage records which of the wanted images one node holds. It is named after the node and written by that node's agent.",
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.available",
        description = "Wanted images present on the node"
    ),
    printcolumn(
        name = "Pulling",
        type_ = "integer",
        json_path = ".status.pulling",
        description = "Images being pulled"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.failed",
        description = "Images whose pulls failed"
    ),
    printcolumn(
        name = "Paused",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Paused\")].status",
        description = "Pulls paused under node pressure"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageSpec {
    /// Name of the node this object describes (equal to the object's name).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// Per-image state on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageStatus {
    /// Wanted images present on the node.
    #[serde(default)]
    pub available: i32,
    /// Images being pulled.
    #[serde(default)]
    pub pulling: i32,
    /// Images whose last pull attempts failed.
    #[serde(default)]
    pub failed: i32,
    /// `Paused` (pulls stopped under disk or PID pressure or the image-filesystem budget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per wanted image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<NodeImageEntry>,
    /// Images the agent pulled that no ImageSet wants any more, still on the node: removed
    /// once their grace period ends, or sooner when the image filesystem is over its high
    /// watermark.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unwanted: Vec<UnwantedImage>,
    /// The latest removals, newest first (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<ImageRemoval>,
}

/// An image no ImageSet wants any more, kept on the node for now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnwantedImage {
    /// Normalized image reference.
    pub image: String,
    /// When the last ImageSet stopped wanting it.
    pub since: Time,
    /// Digest it is held under, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size in bytes, as the runtime reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Why it is still here after its grace period: a container uses it, or a wanted image
    /// shares its content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

/// One image the agent removed from the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageRemoval {
    /// Normalized image reference.
    pub image: String,
    /// Digest it was held under, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size in bytes, as the runtime reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// `grace` (unwanted for the grace period) or `watermark` (the image filesystem was over
    /// its high watermark).
    pub reason: String,
    /// When it was removed.
    pub time: Time,
}

/// State of one image on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageEntry {
    /// Normalized image reference.
    pub image: String,
    /// Node label key of the image.
    pub label: String,
    /// Where the image stands on this node.
    pub state: ImageState,
    /// Digest of the image as the runtime holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size of the image in bytes, as the runtime reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Pull attempts since the image was last available.
    #[serde(default)]
    pub attempts: i32,
    /// Error of the last failed pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Where an image stands on a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ImageState {
    /// A pull is under way or queued.
    #[default]
    Pulling,
    /// The image is present on the node.
    Available,
    /// Pulls failed; retried with backoff.
    Failed,
    /// Pulls are paused under node pressure.
    Paused,
}
