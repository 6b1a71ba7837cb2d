//! Coral keeps container images on the Kubernetes nodes that need them, and steers workloads to
//! those nodes with Rego policies.
//!
//! The core is pure: [`image`] (reference parsing, label keys), [`api`] (the custom resources),
//! [`index`] (cluster state) and [`policy`] (the Rego engine, its input and data documents, the
//! safety rails and the policy test runner) take values and return values.

// The global allocator is regorus' mimalloc with allocation accounting (its
// `allocator-memory-limits` feature declares it): allocation-heavy policy evaluation runs
// about a fifth faster than on the system allocator, and the counts are what bound the memory
// of one evaluation (`policy::EvaluatorOptions::memory_budget`). Every binary and test linking
// the library gets it. The manifests in `deploy/` turn transparent huge pages off
// (`MIMALLOC_ALLOW_THP=0`): they would hold on to far more memory than the webhook uses.

pub mod agent;
pub mod api;
pub mod cluster;
pub mod controller;
pub mod credentials;
/// The tower-test scripted API server of the unit tests that check exact requests; it lives in
/// the test tree.
#[cfg(test)]
#[path = "../tests/support/fake_api.rs"]
mod fake_api;
pub mod image;
pub mod index;
pub mod metrics;
pub mod mirror;
pub mod policy;
pub mod probe;
pub mod report;
pub mod time;
pub mod webhook;
