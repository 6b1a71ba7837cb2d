//! Policies prepared with one cluster state: what every decision reads.

use std::collections::BTreeMap;

use super::{
    CompiledPolicies, Decision, DecisionCache, Evaluator, EvaluatorOptions, PolicyError,
    PolicyRequest, PolicySet, Settings, coral_data,
};
use crate::index::{ClusterIndex, Placement, StateFile};

/// An evaluator and the index it was prepared from, immutable once built.
pub struct Snapshot {
    pub evaluator: Evaluator,
    pub index: ClusterIndex,
    /// The index's nodes, for placement questions.
    pub placement: Placement,
    /// `settings.skipControlledPods`, which the webhook applies before any policy runs.
    pub skip_controlled_pods: bool,
    /// `settings.defaultInject` has `mirror`: controlled Pods are decided all the same (the
    /// mirror injection rewrites Pods only).
    pub mirror_by_default: bool,
    /// Where the policies came from (`embedded`, a directory, a ConfigMap).
    pub policy_origin: String,
    /// Decisions made with this snapshot; dropped with it on every change of state or policies.
    pub cache: DecisionCache,
}

impl Snapshot {
    /// Prepares a policy set with the state of a state file. The state's settings, when it
    /// has them, replace the policy set's.
    pub fn from_state_file(
        set: &PolicySet,
        mut state: StateFile,
        options: EvaluatorOptions,
    ) -> Result<Self, PolicyError> {
        let compiled = CompiledPolicies::compile(set)?;
        let settings = state.settings.take();
        Self::new(&compiled, state.into_index(), settings.as_ref(), options)
    }

    /// Prepares compiled policies with an index. `settings` replace the policy set's when given.
    pub fn new(
        compiled: &CompiledPolicies,
        index: ClusterIndex,
        settings: Option<&Settings>,
        options: EvaluatorOptions,
    ) -> Result<Self, PolicyError> {
        let settings = settings.unwrap_or_else(|| compiled.settings());
        let cache = DecisionCache::new(options.decision_cache_bytes, compiled.cache_keying());
        let evaluator = Evaluator::new(compiled, coral_data(&index, settings), options)?;
        Ok(Self {
            cache,
            evaluator,
            placement: index.placement(),
            index,
            skip_controlled_pods: settings.skip_controlled_pods,
            mirror_by_default: settings.default_inject.iter().any(|i| i == "mirror"),
            policy_origin: compiled.origin().to_string(),
        })
    }

    /// Decides one request with this snapshot's namespaces and nodes.
    pub fn decide(&self, request: &PolicyRequest) -> Result<Decision, PolicyError> {
        self.evaluator.decide(
            request,
            &self.namespace_labels(&request.namespace),
            &self.placement,
        )
    }

    /// Decides a Pod with one container, as a check of the evaluation bounds: a policy set
    /// that breaks them here would break them on every request, and is rejected at load
    /// time like one that does not compile. Other errors are a matter for requests.
    pub fn probe(&self) -> Result<(), PolicyError> {
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "coral-probe", "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "registry.example/coral/probe:1"}]}
        });
        let request = PolicyRequest::create(pod, "default")?;
        match self.decide(&request) {
            Err(error @ (PolicyError::Timeout(_) | PolicyError::Memory(_))) => {
                Err(PolicyError::Probe {
                    origin: self.policy_origin.clone(),
                    message: error.to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Labels of a namespace, empty when the state does not know it.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.index
            .namespace_labels(namespace)
            .cloned()
            .unwrap_or_default()
    }
}
