//! Safety rails applied to every decision: operations only on allow-listed paths and never two
//! on one path. The typed round trip and convergence checks live with the evaluator.

use json_patch::{Patch, PatchOperation};
use serde_json::Value;

use super::{PolicyError, WorkloadKind};

/// Paths policies may change by default. `{podSpec}` is the pod spec of the object's kind, `*`
/// one path segment; a pattern also allows everything below it.
pub const DEFAULT_ALLOWED_PATHS: [&str; 7] = [
    "{podSpec}/nodeSelector",
    "{podSpec}/affinity",
    "{podSpec}/containers/*/imagePullPolicy",
    "{podSpec}/initContainers/*/imagePullPolicy",
    "{podSpec}/containers/*/image",
    "{podSpec}/initContainers/*/image",
    "/metadata/annotations",
];

/// The set of paths policies may change, fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPaths {
    patterns: Vec<String>,
}

impl Default for AllowedPaths {
    fn default() -> Self {
        Self {
            patterns: DEFAULT_ALLOWED_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect(),
        }
    }
}

impl AllowedPaths {
    /// Patterns as given on the command line; each must be a JSON pointer, optionally
    /// starting with `{podSpec}`.
    pub fn new(patterns: Vec<String>) -> Result<Self, PolicyError> {
        for pattern in &patterns {
            let rest = pattern.strip_prefix("{podSpec}").unwrap_or(pattern);
            if !rest.starts_with('/') || rest.contains("//") {
                return Err(PolicyError::AllowedPath(pattern.clone()));
            }
        }
        Ok(Self { patterns })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether an operation path (a JSON pointer) is allowed for an object of `kind`.
    pub fn allows(&self, kind: WorkloadKind, path: &str) -> bool {
        let path: Vec<&str> = path.split('/').skip(1).collect();
        self.patterns.iter().any(|pattern| {
            let expanded = pattern.replace("{podSpec}", kind.pod_spec_path());
            let wanted: Vec<&str> = expanded.split('/').skip(1).collect();
            wanted.len() <= path.len()
                && wanted
                    .iter()
                    .zip(&path)
                    .all(|(want, have)| *want == "*" || want == have)
        })
    }
}

/// Parses the `patch` set of a decision and checks every operation against the rails.
pub fn checked_patch(
    operations: Vec<Value>,
    kind: WorkloadKind,
    allowed: &AllowedPaths,
) -> Result<Patch, PolicyError> {
    let mut patch = Vec::with_capacity(operations.len());
    for operation in operations {
        let parsed: PatchOperation =
            serde_json::from_value(operation.clone()).map_err(|e| PolicyError::Rail {
                rule: "malformed operation",
                message: format!("{operation}: {e}"),
            })?;
        let paths = match &parsed {
            PatchOperation::Move(op) => vec![op.from.to_string(), op.path.to_string()],
            PatchOperation::Copy(op) => vec![op.from.to_string(), op.path.to_string()],
            other => vec![other.path().to_string()],
        };
        for path in paths {
            if !allowed.allows(kind, &path) {
                return Err(PolicyError::Rail {
                    rule: "path not allowed",
                    message: format!(
                        "{operation} touches {path}, which is not in the allowed paths ({})",
                        allowed.patterns().join(", ")
                    ),
                });
            }
        }
        patch.push(parsed);
    }
    check_conflicts(&patch)?;
    Ok(Patch(patch))
}

/// No two operations may touch one path, or a path and a path below it: their result would
/// depend on the order in which the policies happened to produce them.
fn check_conflicts(patch: &[PatchOperation]) -> Result<(), PolicyError> {
    let paths: Vec<String> = patch.iter().map(|op| op.path().to_string()).collect();
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            let nested = |outer: &str, inner: &str| {
                inner
                    .strip_prefix(outer)
                    .is_some_and(|rest| rest.starts_with('/'))
            };
            if a == b || nested(a, b) || nested(b, a) {
                return Err(PolicyError::Rail {
                    rule: "conflicting operations",
                    message: format!("two operations touch {a} and {b}"),
                });
            }
        }
    }
    Ok(())
}
