//! `ImageSet`: images to keep on the nodes a selector picks.

use k8s_openapi::api::core::v1::LocalObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation on an ImageSet that removes its retiring images at once, stranding the
/// workloads that still require their labels (`"true"`).
pub const FORCE_REMOVE_ANNOTATION: &str = "coral.dev/force-remove";

/// Images to prefetch onto every node that the node selector picks.
// kube-derive repeats `type_` once per printer column, which clippy takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "coral.dev",
    version = "v1alpha1",
    kind = "ImageSet",
    plural = "imagesets",
    shortname = "imgset",
    category = "coral",
    namespaced,
    status = "ImageSetStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "ImageSet lists container images that Coral keeps present on the nodes its node selector picks.",
    printcolumn(
        name = "Images",
        type_ = "integer",
        json_path = ".status.imageCount",
        description = "Images in the set"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodesTargeted",
        description = "Nodes the selector picks"
    ),
    printcolumn(
        name = "Complete",
        type_ = "integer",
        json_path = ".status.imagesComplete",
        description = "Images present on every targeted node"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Every image is present on every targeted node"
    ),
    printcolumn(
        name = "Mirrored",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Mirrored\")].status",
        description = "Every image is in the mirror registry",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetSpec {
    /// Image references to keep on the selected nodes, by tag or digest, for example
    /// `nginx:1.27`, `ghcr.io/org/app@sha256:…`. References are normalized the way container
    /// runtimes do (`nginx` is `docker.io/library/nginx:latest`).
    #[schemars(length(min = 1, max = 512), inner(length(min = 1, max = 512)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub images: Vec<String>,

    /// Nodes that should hold the images. An empty or missing selector selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Secrets in the ImageSet's namespace, of type `kubernetes.io/dockerconfigjson` or
    /// `kubernetes.io/dockercfg`, holding credentials for private registries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Copy the images into an internal registry (a cluster-scoped `Registry`). The node
    /// selector stays optional: without one an ImageSet that mirrors prefetches onto every
    /// node too; with `nodeSelector: {matchLabels: {coral.dev/none: ""}}`-style selectors
    /// that match nothing it mirrors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<ImageSetMirror>,

    /// How often tags are resolved again (`30m`, `1h`, `1h30m`; at least `5s`): agents ask
    /// their runtime to pull each tag again and count it moved when the digest changed (an
    /// unchanged tag transfers its manifest only), and the mirror compares the source tag with
    /// its copy. Missing: tags are resolved when first pulled, and the mirror checks them every
    /// `--mirror-recheck` of the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub refresh: Option<String>,
}

/// Where and what an ImageSet mirrors.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetMirror {
    /// Name of the `Registry` to copy the images into.
    #[schemars(length(min = 1, max = 253))]
    pub registry: String,

    /// Platforms of multi-platform images to copy, `OS/ARCH[/VARIANT]` (for example
    /// `linux/amd64`, `linux/arm64/v8`). The mirror then serves an index of only these, under
    /// a digest of its own. Empty: every platform, and the index as the source serves it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub platforms: Vec<String>,
}

/// Observed state of an ImageSet, aggregated over the targeted nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (every image on every targeted node), `Progressing` (pulls under way),
    /// `Degraded` (pulls failing, or a referenced secret missing), `DigestDrift` (a reference
    /// held under different digests across nodes, or by the nodes and the mirror) and, for an
    /// ImageSet that mirrors, `Mirrored` (every image held by the mirror registry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of images in the set.
    #[serde(default)]
    pub image_count: i32,

    /// Number of nodes the node selector picks.
    #[serde(default)]
    pub nodes_targeted: i32,

    /// Number of images present on every targeted node.
    #[serde(default)]
    pub images_complete: i32,

    /// Per-image availability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageSetImageStatus>,

    /// Images removed from the set (or the whole set, being deleted) whose node label live
    /// workloads still require. Agents keep them on the selected nodes, labelled, until no
    /// workload requires the label; the annotation `coral.dev/force-remove: "true"` removes
    /// them at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringImage>,
}

/// An image leaving an ImageSet while workloads still require its node label.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringImage {
    /// The normalized reference.
    pub image: String,
    /// The node label the workloads require.
    pub label: String,
    /// Up to 10 of the workloads, as `Kind namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    /// How many workloads require the label.
    #[serde(default)]
    pub workload_count: i32,
}

/// Availability of one image of an ImageSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetImageStatus {
    /// The reference as written in the spec.
    pub image: String,
    /// The normalized reference.
    pub normalized: String,
    /// The node label that marks nodes holding the image.
    pub label: String,
    /// The digest most targeted nodes holding the image hold, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Targeted nodes holding the image under another digest than `digest`.
    #[serde(default)]
    pub nodes_differing: i32,
    /// Every digest the targeted nodes hold the image under, when they hold it under more
    /// than one (at most 10, the most held first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub digests: Vec<String>,
    /// Nodes the selector picks.
    #[serde(default)]
    pub nodes_targeted: i32,
    /// Targeted nodes holding the image.
    #[serde(default)]
    pub nodes_available: i32,
    /// Targeted nodes pulling the image.
    #[serde(default)]
    pub nodes_pulling: i32,
    /// Targeted nodes where pulling the image failed.
    #[serde(default)]
    pub nodes_failed: i32,
    /// The image's copy in the ImageSet's mirror registry, when it mirrors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<ImageMirrorStatus>,
}

/// The state of one image's copy in the mirror.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageMirrorStatus {
    /// The reference pods pull the copy by.
    pub reference: String,
    /// `copying`, `mirrored` (the mirror holds the image) or `failed` (it does not; see
    /// `lastError`).
    pub state: MirrorState,
    /// The digest the source reference resolved to when last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// The digest the mirror serves under `reference`: the source's, unless only some
    /// platforms of an index were copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When the source was last compared with the mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Size of the copy, as its manifests give it (config and layers of every platform
    /// copied), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// The last failure, kept while a mirrored copy stays usable (a source that is down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Where one image's copy in the mirror stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MirrorState {
    #[default]
    Copying,
    Mirrored,
    Failed,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::Mirrored => "mirrored",
            Self::Failed => "failed",
        }
    }
}
