//! Where a policy set comes from: the defaults embedded in the binary, a directory, or a
//! ConfigMap manifest (keys `*.rego`, optional `settings.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;

use super::{PolicyError, Settings};

/// Name of the settings key or file.
pub const SETTINGS_FILE: &str = "settings.json";

/// The default policies, compiled into the binary from `policies/`.
const EMBEDDED: [(&str, &str); 6] = [
    ("common.rego", include_str!("../../policies/common.rego")),
    (
        "feasibility.rego",
        include_str!("../../policies/feasibility.rego"),
    ),
    ("mirror.rego", include_str!("../../policies/mirror.rego")),
    (
        "node_selector.rego",
        include_str!("../../policies/node_selector.rego"),
    ),
    ("pin.rego", include_str!("../../policies/pin.rego")),
    (
        "pull_policy.rego",
        include_str!("../../policies/pull_policy.rego"),
    ),
];

/// One Rego file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// File name (or ConfigMap key), used in errors and coverage.
    pub name: String,
    pub source: String,
}

/// A set of policies with their settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    pub files: Vec<PolicyFile>,
    pub settings: Settings,
    /// Where the set came from, for messages.
    pub origin: String,
}

/// Whether a file name is a policy test rather than a policy.
pub fn is_test_file(name: &str) -> bool {
    name.ends_with("_test.rego")
}

impl PolicySet {
    /// The default policies with the default settings.
    pub fn embedded() -> Self {
        Self {
            files: EMBEDDED
                .iter()
                .map(|(name, source)| PolicyFile {
                    name: format!("policies/{name}"),
                    source: (*source).to_string(),
                })
                .collect(),
            settings: Settings::default(),
            origin: "embedded default policies".to_string(),
        }
    }

    /// Loads a directory (its `*.rego` files, tests excluded, and `settings.json`) or a
    /// ConfigMap manifest file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        if path.is_dir() {
            Self::from_dir(path)
        } else {
            let text = read(path)?;
            Self::from_configmap_manifest(&text, &path.display().to_string())
        }
    }

    /// Loads the `*.rego` files of a directory (not recursive; `*_test.rego` skipped) and its
    /// optional `settings.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        let mut files = Vec::new();
        let mut settings = Settings::default();
        for path in paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name == SETTINGS_FILE {
                settings = parse_settings(&read(&path)?, &path.display().to_string())?;
            } else if name.ends_with(".rego") && !is_test_file(name) && path.is_file() {
                files.push(PolicyFile {
                    name: path.display().to_string(),
                    source: read(&path)?,
                });
            }
        }
        let origin = format!("directory {}", dir.display());
        if files.is_empty() {
            return Err(PolicyError::NoPolicies { origin });
        }
        Ok(Self {
            files,
            settings,
            origin,
        })
    }

    /// Loads a ConfigMap manifest (YAML or JSON).
    pub fn from_configmap_manifest(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let configmap: ConfigMap =
            serde_yaml::from_str(text).map_err(|source| PolicyError::ConfigMap {
                origin: origin.to_string(),
                message: source.to_string(),
            })?;
        Self::from_configmap(&configmap, origin)
    }

    /// Loads the policies of a ConfigMap: every `*.rego` key (tests skipped) and the optional
    /// `settings.json`. Any other key is an error, so a misnamed file is not silently ignored.
    pub fn from_configmap(configmap: &ConfigMap, origin: &str) -> Result<Self, PolicyError> {
        let invalid = |message: String| PolicyError::ConfigMap {
            origin: origin.to_string(),
            message,
        };
        if configmap
            .binary_data
            .as_ref()
            .is_some_and(|b| !b.is_empty())
        {
            return Err(invalid(
                "binaryData is not supported; put policies in data".into(),
            ));
        }
        let data: BTreeMap<String, String> = configmap.data.clone().unwrap_or_default();
        let mut files = Vec::new();
        let mut settings = Settings::default();
        for (key, value) in data {
            if key == SETTINGS_FILE {
                settings = parse_settings(&value, &format!("{origin}: {SETTINGS_FILE}"))?;
            } else if key.ends_with(".rego") {
                if !is_test_file(&key) {
                    files.push(PolicyFile {
                        name: key,
                        source: value,
                    });
                }
            } else {
                return Err(invalid(format!(
                    "key {key:?} is neither a *.rego policy nor {SETTINGS_FILE}"
                )));
            }
        }
        if files.is_empty() {
            return Err(PolicyError::NoPolicies {
                origin: origin.to_string(),
            });
        }
        Ok(Self {
            files,
            settings,
            origin: origin.to_string(),
        })
    }
}

pub(super) fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn parse_settings(text: &str, origin: &str) -> Result<Settings, PolicyError> {
    Settings::from_json(text).map_err(|source| PolicyError::Settings {
        origin: origin.to_string(),
        source,
    })
}

/// Names of the embedded policy files, for checks that `policies/` and the binary agree.
pub fn embedded_file_names() -> Vec<&'static str> {
    EMBEDDED.iter().map(|(name, _)| *name).collect()
}
