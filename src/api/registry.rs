//! `Registry`: an internal registry Coral mirrors images into, and pods may pull them from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An internal registry images are mirrored into. Cluster-scoped: ImageSets of every namespace
/// name it in `spec.mirror.registry`.
// kube-derive repeats `type_` once per printer column, which clippy takes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "coral.dev",
    version = "v1alpha1",
    kind = "Registry",
    plural = "registries",
    shortname = "creg",
    category = "coral",
    status = "RegistryStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Registry describes an internal registry that Coral mirrors images into and that nodes pull mirrored images from.",
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        description = "The registry as nodes reach it"
    ),
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Reachable\")].status",
        description = "The last probe of the registry answered"
    ),
    printcolumn(
        name = "Images",
        type_ = "integer",
        json_path = ".status.mirroredImages",
        description = "Images mirrored into it"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySpec {
    /// The registry as nodes reach it, `HOST[:PORT][/PREFIX]`: a host port or NodePort on
    /// `localhost`, or a name the nodes resolve (nodes do not resolve cluster DNS). An image
    /// `REGISTRY/PATH[:TAG][@DIGEST]` is mirrored as
    /// `ENDPOINT/REGISTRY/PATH[:TAG][@DIGEST]`, a source port written `_PORT`
    /// (`docker.io/library/nginx:1.27` → `ENDPOINT/docker.io/library/nginx:1.27`).
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[A-Za-z0-9.\-\[\]:]+(/[a-z0-9._/-]+)?$")
    )]
    pub endpoint: String,

    /// Where Coral's controller reaches the registry to copy images into it, `HOST[:PORT]`,
    /// when that differs from the endpoint (a pod does not reach a node's `localhost`: the
    /// registry's Service, `SERVICE.NAMESPACE.svc:PORT`). The endpoint's prefix
    /// applies. Default: the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9.\-\[\]:]+$"))]
    pub push_endpoint: Option<String>,

    /// Also mirror private images (those of ImageSets with `imagePullSecrets`). Only for a
    /// registry that pods cannot read without credentials of their own: no anonymous reads
    /// (Coral checks) and no node-level credentials for it (Coral cannot check), or every pod
    /// could pull a private image by its mirror reference. Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_images: bool,

    /// How Coral speaks to the registry. HTTPS with the system's roots by default.
    #[serde(default, skip_serializing_if = "RegistryTls::is_default")]
    pub tls: RegistryTls,

    /// A Secret in Coral's namespace, of type `kubernetes.io/dockerconfigjson`, with
    /// credentials for the endpoint that may push (Coral's mirror worker) and pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
}

/// TLS towards a Registry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryTls {
    /// Plain HTTP, allowed only for a loopback endpoint (`localhost`, `127.0.0.0/8`, `::1`),
    /// a cluster-local name (`*.svc`, `*.cluster.local`) or a private address (RFC 1918,
    /// `fc00::/7`). Loopback endpoints are plain HTTP, as containerd treats them, unless
    /// `caSecret` is given.
    #[serde(
        default,
        rename = "plainHTTP",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub plain_http: bool,

    /// A Secret in Coral's namespace holding the PEM CA bundle that signed the registry's
    /// certificate, under `key` (default `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKey>,
}

impl RegistryTls {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// A key of a Secret in Coral's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Default `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What the controller last saw of a Registry.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Reachable`: the last probe (`GET /v2/` with the credentials, every 30 s by default) answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Why the last probe failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// Images that ImageSets mirror into this registry and that it holds.
    #[serde(default)]
    pub mirrored_images: i32,

    /// Size of those images, as their manifests give it (config and layers of every platform
    /// copied; a layer several images share counts once per image), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrored_bytes: Option<i64>,

    /// Copies no ImageSet mirrors any more, deleted from the registry once the controller's
    /// `--mirror-retention` has passed since and no Pod runs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringCopy>,
}

/// A copy in a registry that no ImageSet mirrors any more.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringCopy {
    /// The mirror reference.
    pub reference: String,
    /// The digest the registry serves under it, which is deleted.
    pub digest: String,
    /// When the last ImageSet stopped mirroring it.
    pub since: Time,
    /// Why it is still there after its retention period: a Pod runs it, or deleting failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}
