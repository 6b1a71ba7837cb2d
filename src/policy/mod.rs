//! The policy engine: Rego policies (regorus) fed with one admission request and the cluster's
//! image availability decide JSON patches, warnings and denials. See the README, "Policies".

mod cache;
mod data;
mod engine;
mod guard;
mod input;
mod rails;
mod settings;
mod snapshot;
mod source;
pub mod testing;

use std::time::Duration;

use thiserror::Error;

pub use cache::{CacheKeying, DecisionCache};
pub use data::coral_data;
pub use engine::{
    CompiledPolicies, DECISION_PACKAGE, DEFAULT_EVAL_MEMORY, DEFAULT_EVAL_TIMEOUT, Decision,
    Evaluator, EvaluatorOptions, Pass, RuleOutput,
};
pub use input::{
    CONTAINER_LISTS, GroupVersionKind, GroupVersionResource, PolicyRequest, WorkloadKind,
    build_input, containers, containers_after, pod_placement, with_keys,
};
pub use rails::{AllowedPaths, DEFAULT_ALLOWED_PATHS, checked_patch};
pub use settings::{INJECTIONS, PullPolicy, Scheduling, Settings, SettingsError};
pub use snapshot::Snapshot;
pub use source::{PolicyFile, PolicySet, SETTINGS_FILE, embedded_file_names, is_test_file};

/// A policy set that cannot be loaded, or a decision that cannot be made.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin} holds no *.rego policies")]
    NoPolicies { origin: String },
    #[error("ConfigMap {origin}: {message}")]
    ConfigMap { origin: String, message: String },
    #[error("{origin}: {source}")]
    Settings {
        origin: String,
        source: SettingsError,
    },
    #[error("policies from {origin} do not compile:\n{}", message.trim())]
    Compile { origin: String, message: String },
    #[error("cluster data rejected by the policy engine: {0}")]
    Data(String),
    #[error("policy evaluation failed: {0}")]
    Evaluation(String),
    #[error("policy evaluation took longer than {0:?}")]
    Timeout(Duration),
    #[error("policy evaluation took more than its memory budget of {} MiB", .0 >> 20)]
    Memory(u64),
    #[error(
        "policies from {origin} break the evaluation bounds on a probe evaluation (a Pod with one container): {message}"
    )]
    Probe { origin: String, message: String },
    #[error("policy decision rejected ({rule}): {message}")]
    Rail { rule: &'static str, message: String },
    #[error(
        "unsupported object {api_version}/{kind}: Coral handles Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job and CronJob"
    )]
    UnsupportedKind { api_version: String, kind: String },
    #[error(
        "invalid allowed path {0:?}: use a JSON pointer such as /metadata/annotations or {{podSpec}}/nodeSelector"
    )]
    AllowedPath(String),
}

impl PolicyError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Read { .. } | Self::NoPolicies { .. } | Self::ConfigMap { .. } => "load",
            Self::Settings { .. } => "settings",
            Self::Compile { .. } => "compile",
            Self::Data(_) => "data",
            Self::Evaluation(_) => "evaluation",
            Self::Timeout(_) => "timeout",
            Self::Memory(_) => "memory",
            Self::Probe { .. } => "probe",
            Self::Rail { .. } => "rail",
            Self::UnsupportedKind { .. } => "unsupported_kind",
            Self::AllowedPath(_) => "config",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
