//! What a mirror copy does, apart from the registry I/O: where an image goes (the mapping
//! rule), which platforms of an image index are kept, and which blobs and manifests a copy
//! moves.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::image::ImageReference;

/// Media types of the manifests a copy accepts and moves.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Why an image cannot be planned for the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error(
        "mirror {0:?}: the first part must be a registry host as runtimes read one: with a '.' or a port, or localhost (mirror.example.com, registry:5000)"
    )]
    NotAHost(String),
    #[error("mirror {target:?}: {reason}")]
    InvalidTarget { target: String, reason: String },
    #[error("{source_reference} cannot be mirrored: {reason}")]
    Unmappable {
        source_reference: String,
        reason: String,
    },
    #[error("platform {0:?}: write OS/ARCHITECTURE[/VARIANT], e.g. linux/amd64 or linux/arm64/v8")]
    Platform(String),
    #[error("{reference}: not a manifest Coral can copy ({reason})")]
    Manifest { reference: String, reason: String },
    #[error("{reference}: the image index has no manifest for {platform}")]
    MissingPlatform { reference: String, platform: String },
}

/// Where images are mirrored to: a registry host (with its port) and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorTarget {
    endpoint: String,
    prefix: Option<String>,
}

impl MirrorTarget {
    /// The registry host, with its port (`registry.example.com`, `127.0.0.1:5000`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether the registry is on this machine, where runtimes speak plain HTTP to it.
    pub fn is_loopback(&self) -> bool {
        is_loopback(&self.endpoint)
    }

    /// The same registry reached at another host (with its port), the prefix kept.
    pub fn at(&self, host: &str) -> Result<Self, PlanError> {
        if host.contains('/') {
            return Err(PlanError::InvalidTarget {
                target: host.to_string(),
                reason: "a host with its port, without a path, is expected".to_string(),
            });
        }
        let mut target: Self = host.parse()?;
        target.prefix = self.prefix.clone();
        Ok(target)
    }
}

impl FromStr for MirrorTarget {
    type Err = PlanError;

    /// `HOST[:PORT][/PREFIX]`.
    fn from_str(target: &str) -> Result<Self, PlanError> {
        let (endpoint, prefix) = match target.split_once('/') {
            Some((endpoint, prefix)) => (endpoint, Some(prefix.trim_end_matches('/'))),
            None => (target, None),
        };
        let prefix = prefix.filter(|p| !p.is_empty());
        let invalid = |reason: String| PlanError::InvalidTarget {
            target: target.to_string(),
            reason,
        };
        // A reference under the target shows whether runtimes read its first part as a host.
        let probe = format!("{endpoint}/{}/probe", prefix.unwrap_or("x"));
        let parsed = ImageReference::parse(&probe).map_err(|e| invalid(e.to_string()))?;
        if parsed.registry() != endpoint.to_ascii_lowercase() && parsed.registry() != endpoint {
            return Err(PlanError::NotAHost(target.to_string()));
        }
        let prefix = prefix.map(str::to_string);
        Ok(Self {
            endpoint: endpoint.to_string(),
            prefix,
        })
    }
}

impl fmt::Display for MirrorTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.prefix {
            Some(prefix) => write!(f, "{}/{prefix}", self.endpoint),
            None => f.write_str(&self.endpoint),
        }
    }
}

/// Whether a registry host (with its port) is on this machine.
pub fn is_loopback(endpoint: &str) -> bool {
    let host = match endpoint.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => endpoint,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The mapping rule: `SOURCE-REGISTRY/PATH[:TAG][@DIGEST]` is mirrored as
/// `MIRROR[/PREFIX]/SOURCE-REGISTRY/PATH[:TAG][@DIGEST]`, the source registry's host lower-cased
/// and a port written `_PORT` (`localhost:5000` → `localhost_5000`: host names have no `_`,
/// so no two sources meet). `docker.io/library/nginx:1.27` →
/// `mirror:5000/docker.io/library/nginx:1.27`.
pub fn mirror_reference(
    source: &ImageReference,
    target: &MirrorTarget,
) -> Result<ImageReference, PlanError> {
    let unmappable = |reason: String| PlanError::Unmappable {
        source_reference: source.to_string(),
        reason,
    };
    let registry = source.registry().to_ascii_lowercase();
    if registry.starts_with('[') {
        return Err(unmappable(
            "the mapping rule cannot write an IPv6 registry address as a path".to_string(),
        ));
    }
    let host = registry.replace(':', "_");
    let mut name = target.endpoint.clone();
    if let Some(prefix) = &target.prefix {
        name.push('/');
        name.push_str(prefix);
    }
    name.push('/');
    name.push_str(&host);
    name.push('/');
    name.push_str(source.repository());
    if let Some(tag) = source.tag() {
        name.push(':');
        name.push_str(tag);
    }
    if let Some(digest) = source.digest() {
        name.push('@');
        name.push_str(digest);
    }
    ImageReference::parse(&name).map_err(|e| unmappable(e.to_string()))
}

/// A platform of an image index: `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = PlanError;

    fn from_str(text: &str) -> Result<Self, PlanError> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid = |part: &&str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        match parts.as_slice() {
            [os, architecture] if valid(os) && valid(architecture) => Ok(Self {
                os: os.to_string(),
                architecture: architecture.to_string(),
                variant: None,
            }),
            [os, architecture, variant] if [os, architecture, variant].into_iter().all(valid) => {
                Ok(Self {
                    os: os.to_string(),
                    architecture: architecture.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(PlanError::Platform(text.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A content descriptor of a manifest: a blob or a child manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<DescriptorPlatform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DescriptorPlatform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Descriptor {
    /// Whether this child of an index is for `platform` (a missing variant matches any).
    fn is_for(&self, platform: &Platform) -> bool {
        self.platform.as_ref().is_some_and(|p| {
            p.os == platform.os
                && p.architecture == platform.architecture
                && (platform.variant.is_none() || p.variant == platform.variant)
        })
    }
}

/// The children of an index a copy moves, and the index it pushes when that is not the
/// source's own (some platforms left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub children: Vec<Descriptor>,
    pub index: Option<Vec<u8>>,
}

/// A manifest as a copy reads it: the exact bytes (pushed as they are, so its digest stays)
/// and what it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
    pub content: Content,
}

/// What a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// An image index (or Docker manifest list): one manifest per platform.
    Index(Vec<Descriptor>),
    /// One image: its config and layers.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    finished_digest(Sha256::new_with_prefix(bytes))
}

/// `sha256:` and the hex digest of what `hasher` was fed.
pub fn finished_digest(hasher: Sha256) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hasher.finalize() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl Manifest {
    /// Reads a manifest fetched for `reference` with the `Content-Type` the registry gave.
    pub fn parse(
        reference: &str,
        content_type: Option<&str>,
        bytes: Vec<u8>,
    ) -> Result<Self, PlanError> {
        let invalid = |reason: String| PlanError::Manifest {
            reference: reference.to_string(),
            reason,
        };
        let raw: Raw = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        // The OCI formats may leave the media type out; their content says which they are.
        let named = raw
            .media_type
            .clone()
            .or_else(|| content_type.map(|t| t.split(';').next().unwrap_or(t).trim().to_string()));
        let media_type = match named {
            Some(media_type) => media_type,
            None if raw.manifests.is_some() => OCI_INDEX.to_string(),
            None if raw.config.is_some() && raw.layers.is_some() => OCI_MANIFEST.to_string(),
            None => {
                return Err(invalid(
                    "it names no media type and is neither an image index nor an image manifest (a schema 1 manifest?)"
                        .to_string(),
                ));
            }
        };
        let content = match (raw.manifests, raw.config, raw.layers) {
            (Some(manifests), None, _)
                if [OCI_INDEX, DOCKER_LIST].contains(&media_type.as_str()) =>
            {
                Content::Index(manifests)
            }
            (None, Some(config), Some(layers))
                if [OCI_MANIFEST, DOCKER_MANIFEST].contains(&media_type.as_str()) =>
            {
                Content::Image { config, layers }
            }
            _ => {
                return Err(invalid(format!(
                    "media type {media_type}; Coral copies {}",
                    MANIFEST_TYPES.join(", ")
                )));
            }
        };
        let digest = sha256_digest(&bytes);
        Ok(Self {
            media_type,
            bytes,
            digest,
            content,
        })
    }

    /// The children of an index to copy: all of them, or those of `platforms` (each must be
    /// there). With a platform list, the index copied is a new one with only those children,
    /// with its own digest (returned bytes); without, the index's own bytes.
    pub fn select(
        &self,
        reference: &str,
        platforms: &[Platform],
    ) -> Result<Option<Selection>, PlanError> {
        let Content::Index(children) = &self.content else {
            return Ok(None);
        };
        if platforms.is_empty() {
            return Ok(Some(Selection {
                children: children.clone(),
                index: None,
            }));
        }
        let mut kept = Vec::new();
        for platform in platforms {
            let found: Vec<&Descriptor> = children.iter().filter(|c| c.is_for(platform)).collect();
            if found.is_empty() {
                return Err(PlanError::MissingPlatform {
                    reference: reference.to_string(),
                    platform: platform.to_string(),
                });
            }
            for child in found {
                if !kept.contains(child) {
                    kept.push(child.clone());
                }
            }
        }
        // Keep the index's own order and fields; only its manifest list shrinks.
        let mut value: Value =
            serde_json::from_slice(&self.bytes).map_err(|e| PlanError::Manifest {
                reference: reference.to_string(),
                reason: e.to_string(),
            })?;
        if let Some(list) = value.get_mut("manifests").and_then(Value::as_array_mut) {
            list.retain(|entry| {
                entry["digest"]
                    .as_str()
                    .is_some_and(|d| kept.iter().any(|k| k.digest == d))
            });
        }
        let bytes = serde_json::to_vec(&value).map_err(|e| PlanError::Manifest {
            reference: reference.to_string(),
            reason: e.to_string(),
        })?;
        kept.sort_by_key(|k| children.iter().position(|c| c == k));
        Ok(Some(Selection {
            children: kept,
            index: Some(bytes),
        }))
    }

    /// The blobs of an image manifest: its config, then its layers.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        match &self.content {
            Content::Index(_) => Vec::new(),
            Content::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
        }
    }
}
