//! Cluster-wide settings of the policies (`settings.json` in the policy ConfigMap), exposed to
//! them as `data.coral.settings`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Injections the default policies know.
pub const INJECTIONS: [&str; 2] = ["pull-policy", "selectors"];

/// Settings of the policies. Every field has a default, so `{}` is a complete settings file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Settings {
    /// Injections applied to objects without a `coral.dev/inject` annotation. Empty by
    /// default: nothing changes unless the object asks.
    pub default_inject: Vec<String>,
    /// Nodes that must hold an image before pods are steered to it or told not to pull it.
    pub min_available_nodes: u32,
    /// `required` (a nodeSelector) or `preferred` (a preferred node-affinity term).
    pub scheduling: Scheduling,
    /// Weight of the preferred node-affinity term, 1 to 100.
    pub preferred_weight: u32,
    /// Pull policy set on containers whose image is available: `IfNotPresent` or `Never`.
    pub pull_policy: PullPolicy,
    /// Warn about containers whose image no ImageSet manages.
    pub warn_unmanaged: bool,
    /// Leave Pods owned by a controller alone: their template was mutated already.
    pub skip_controlled_pods: bool,
    /// Namespaces whose pods may use private images (pulled with an ImageSet's pull secrets)
    /// besides the namespaces of those ImageSets; `*` is every namespace.
    pub share_private_images_with: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_inject: Vec::new(),
            min_available_nodes: 1,
            scheduling: Scheduling::Required,
            preferred_weight: 100,
            pull_policy: PullPolicy::IfNotPresent,
            warn_unmanaged: true,
            skip_controlled_pods: true,
            share_private_images_with: Vec::new(),
        }
    }
}

/// How pods are steered to nodes holding their images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Scheduling {
    /// A nodeSelector: pods wait until a node with the images has room.
    Required,
    /// A preferred node-affinity term: pods may start elsewhere and pull.
    Preferred,
}

/// Pull policy given to containers whose images are available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    IfNotPresent,
    Never,
}

/// Invalid settings.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("settings.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("settings.json: preferredWeight must be between 1 and 100, got {0}")]
    Weight(u32),
    #[error(
        "settings.json: defaultInject has unknown injection {0:?} (known: pull-policy, selectors)"
    )]
    Injection(String),
    #[error(
        "settings.json: sharePrivateImagesWith has {0:?}, which is neither a namespace name (a DNS label) nor *"
    )]
    SharedNamespace(String),
}

impl Settings {
    /// Parses `settings.json` text and checks the values.
    pub fn from_json(text: &str) -> Result<Self, SettingsError> {
        let settings: Settings = serde_json::from_str(text)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that the types alone cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=100).contains(&self.preferred_weight) {
            return Err(SettingsError::Weight(self.preferred_weight));
        }
        if let Some(unknown) = self
            .default_inject
            .iter()
            .find(|name| !INJECTIONS.contains(&name.as_str()))
        {
            return Err(SettingsError::Injection(unknown.clone()));
        }
        let namespace = |name: &str| {
            let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            (1..=63).contains(&name.len())
                && name.starts_with(alphanumeric)
                && name.ends_with(alphanumeric)
                && name.chars().all(|c| alphanumeric(c) || c == '-')
        };
        if let Some(bad) = self
            .share_private_images_with
            .iter()
            .find(|name| *name != "*" && !namespace(name))
        {
            return Err(SettingsError::SharedNamespace(bad.clone()));
        }
        Ok(())
    }
}
