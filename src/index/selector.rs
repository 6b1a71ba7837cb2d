//! Matching Kubernetes label selectors against node labels.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use thiserror::Error;

use super::LabelMap;

/// A label selector that cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}]: unknown operator {operator:?} (use In, NotIn, Exists or DoesNotExist)"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    MissingValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: the key is empty")]
    EmptyKey { index: usize },
}

/// A validated label selector. `None` or an empty selector matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Checks a Kubernetes `LabelSelector` and compiles it.
    pub fn new(selector: Option<&LabelSelector>) -> Result<Self, SelectorError> {
        let Some(selector) = selector else {
            return Ok(Self::default());
        };
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
            .collect();
        for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let key = expression.key.clone();
            if key.is_empty() {
                return Err(SelectorError::EmptyKey { index });
            }
            let values = expression.values.clone().unwrap_or_default();
            let operator = expression.operator.clone();
            let requirement = match operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::MissingValues { index, operator });
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues { index, operator });
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                _ => return Err(SelectorError::UnknownOperator { index, operator }),
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether a node with these labels is selected.
    pub fn matches(&self, labels: &impl LabelMap) -> bool {
        let contains = |values: &[String], v: &str| values.iter().any(|value| value == v);
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(k, v) => labels.label(k) == Some(v.as_str()),
                Requirement::In(k, vs) => labels.label(k).is_some_and(|v| contains(vs, v)),
                Requirement::NotIn(k, vs) => labels.label(k).is_none_or(|v| !contains(vs, v)),
                Requirement::Exists(k) => labels.label(k).is_some(),
                Requirement::DoesNotExist(k) => labels.label(k).is_none(),
            })
    }
}
