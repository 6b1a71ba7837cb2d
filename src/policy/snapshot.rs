//! Policies prepared with one cluster state: what every decision reads.

use std::collections::BTreeMap;

use super::{CompiledPolicies, Evaluator, EvaluatorOptions, PolicyError, PolicySet, coral_data};
use crate::index::{ClusterIndex, StateFile};

/// An evaluator and the index it was prepared from, immutable once built.
pub struct Snapshot {
    pub evaluator: Evaluator,
    pub index: ClusterIndex,
    /// `settings.skipControlledPods`, which the webhook applies before any policy runs.
    pub skip_controlled_pods: bool,
}

impl Snapshot {
    /// Prepares a policy set with the state of a state file. The state's settings, when it
    /// has them, replace the policy set's.
    pub fn from_state_file(
        set: &PolicySet,
        state: &StateFile,
        options: EvaluatorOptions,
    ) -> Result<Self, PolicyError> {
        let compiled = CompiledPolicies::compile(set)?;
        let settings = state
            .settings
            .clone()
            .unwrap_or_else(|| compiled.settings().clone());
        let index = state.to_index();
        let evaluator = Evaluator::new(&compiled, coral_data(&index, &settings), options)?;
        Ok(Self {
            evaluator,
            index,
            skip_controlled_pods: settings.skip_controlled_pods,
        })
    }

    /// Labels of a namespace, empty when the state does not know it.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.index
            .namespace_labels(namespace)
            .cloned()
            .unwrap_or_default()
    }
}
