//! AdmissionReview in, AdmissionReview out: the part of the webhook that needs no network.
//!
//! A body that is not an `admission.k8s.io/v1` AdmissionReview is a [`BadReview`] (HTTP 400).
//! Everything else gets an AdmissionResponse: a patch, warnings, a denial, or, when the object
//! cannot be read or the policies fail, the answer the failure mode asks for.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};
use thiserror::Error;

use crate::api::ImageSet;
use crate::index::validate_image_set;
use crate::policy::{Decision, PolicyError, PolicyRequest, WorkloadKind};

/// What to answer when a decision cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Admit the object unchanged, with a warning naming the failure.
    Allow,
    /// Refuse the object, naming the failure.
    Deny,
}

/// A body that is not an AdmissionReview: answered with HTTP 400 and this message.
#[derive(Debug, Error)]
pub enum BadReview {
    #[error("request body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("request body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    NotReview(String),
}

impl BadReview {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NotReview(_) => "not_review",
        }
    }
}

/// The parts of a review the webhook routes on.
#[derive(Debug, Clone)]
pub struct Review {
    pub uid: String,
    pub request: Value,
}

impl Review {
    /// Parses a request body.
    pub fn parse(body: &[u8]) -> Result<Self, BadReview> {
        Self::from_value(serde_json::from_slice(body).map_err(BadReview::NotJson)?)
    }

    /// Checks an already parsed document.
    pub fn from_value(mut value: Value) -> Result<Self, BadReview> {
        if value["apiVersion"] != "admission.k8s.io/v1" || value["kind"] != "AdmissionReview" {
            return Err(BadReview::NotReview(format!(
                "apiVersion {} and kind {}",
                value["apiVersion"], value["kind"]
            )));
        }
        let request = value
            .get_mut("request")
            .map(Value::take)
            .unwrap_or_default();
        if !request.is_object() {
            return Err(BadReview::NotReview("it has no request".into()));
        }
        let Some(uid) = request["uid"].as_str().filter(|uid| !uid.is_empty()) else {
            return Err(BadReview::NotReview("request.uid is missing".into()));
        };
        Ok(Self {
            uid: uid.to_string(),
            request,
        })
    }

    /// `kind.kind` and `operation`, for logs and metrics (bounded: unknown kinds are "other").
    pub fn kind_and_operation(&self) -> (&'static str, &'static str) {
        let kind = WorkloadKind::from_group_kind(
            self.request["kind"]["group"].as_str().unwrap_or_default(),
            self.request["kind"]["kind"].as_str().unwrap_or_default(),
        )
        .map_or(
            if self.request["kind"]["kind"] == "ImageSet" {
                "ImageSet"
            } else {
                "other"
            },
            WorkloadKind::name,
        );
        let operation = match self.request["operation"].as_str() {
            Some("CREATE") => "CREATE",
            Some("UPDATE") => "UPDATE",
            Some("DELETE") => "DELETE",
            Some("CONNECT") => "CONNECT",
            _ => "other",
        };
        (kind, operation)
    }
}

/// How a review was answered, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Patched,
    Unchanged,
    Denied,
    Skipped,
    FailedOpen,
    FailedClosed,
}

impl Answer {
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Patched => "patched",
            Self::Unchanged => "unchanged",
            Self::Denied => "denied",
            Self::Skipped => "skipped",
            Self::FailedOpen => "failed_open",
            Self::FailedClosed => "failed_closed",
        }
    }
}

/// The AdmissionReview answering `uid`.
fn review_response(response: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn allow(uid: &str, warnings: &[String]) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    review_response(response)
}

fn deny(uid: &str, message: &str, warnings: &[String]) -> Value {
    let mut response = json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 403, "reason": "Forbidden", "message": message},
    });
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    review_response(response)
}

/// What a decision becomes: the patch (base64 JSONPatch), the warnings, or the denial.
pub fn decision_response(uid: &str, decision: &Decision) -> (Value, Answer) {
    if !decision.allowed {
        let message = format!("denied by Coral policy: {}", decision.denials.join("; "));
        return (deny(uid, &message, &decision.warnings), Answer::Denied);
    }
    if decision.patch.0.is_empty() {
        return (allow(uid, &decision.warnings), Answer::Unchanged);
    }
    let patch = serde_json::to_vec(&decision.patch).unwrap_or_default();
    let mut response = json!({
        "uid": uid,
        "allowed": true,
        "patchType": "JSONPatch",
        "patch": base64::engine::general_purpose::STANDARD.encode(patch),
    });
    if !decision.warnings.is_empty() {
        response["warnings"] = json!(decision.warnings);
    }
    (review_response(response), Answer::Patched)
}

/// The answer when no decision could be made.
pub fn failure_response(uid: &str, mode: FailureMode, failure: &str) -> (Value, Answer) {
    match mode {
        FailureMode::Allow => (
            allow(uid, &[format!("coral: {failure}; admitted unchanged")]),
            Answer::FailedOpen,
        ),
        FailureMode::Deny => (
            deny(uid, &format!("coral: {failure}"), &[]),
            Answer::FailedClosed,
        ),
    }
}

/// What the mutating route should do with a review.
pub enum MutateStep {
    /// Answer now.
    Answer(Value, Answer),
    /// Decide this request with the policies.
    Decide(Box<PolicyRequest>),
}

/// Routes a review on `/mutate`: only CREATE and UPDATE of the workload kinds are decided;
/// Pods owned by a controller are skipped when `skip_controlled_pods`, unless they ask for the
/// mirror injection (their own `coral.dev/inject`, or `mirror_by_default` without one), which
/// is decided per Pod.
pub fn mutate_step(
    review: Review,
    mode: FailureMode,
    skip_controlled_pods: bool,
    mirror_by_default: bool,
) -> MutateStep {
    let uid = &review.uid;
    let (kind, operation) = review.kind_and_operation();
    if !matches!(operation, "CREATE" | "UPDATE") || kind == "other" || kind == "ImageSet" {
        return MutateStep::Answer(allow(uid, &[]), Answer::Skipped);
    }
    let object = &review.request["object"];
    if skip_controlled_pods
        && kind == "Pod"
        && is_controlled(object)
        && !asks_for_mirror(object, mirror_by_default)
    {
        return MutateStep::Answer(allow(uid, &[]), Answer::Skipped);
    }
    match serde_json::from_value::<PolicyRequest>(review.request) {
        Ok(request) if request.object.is_object() => MutateStep::Decide(Box::new(request)),
        Ok(_) => {
            let (value, answer) = failure_response(uid, mode, "the review carries no object");
            MutateStep::Answer(value, answer)
        }
        Err(error) => {
            let (value, answer) =
                failure_response(uid, mode, &format!("the review cannot be read: {error}"));
            MutateStep::Answer(value, answer)
        }
    }
}

/// Whether an object asks for the mirror injection: its `coral.dev/inject` names it, or it
/// has no such annotation and `by_default`.
fn asks_for_mirror(object: &Value, by_default: bool) -> bool {
    match object["metadata"]["annotations"]["coral.dev/inject"].as_str() {
        Some(value) => value.split(',').any(|item| item.trim() == "mirror"),
        None => by_default,
    }
}

fn is_controlled(object: &Value) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|owners| owners.iter().any(|o| o["controller"] == true))
}

/// The answer for a decided request, or for the error that stopped it.
pub fn decided_response(
    uid: &str,
    mode: FailureMode,
    result: Result<Decision, PolicyError>,
) -> (Value, Answer) {
    match result {
        Ok(decision) => decision_response(uid, &decision),
        Err(error) => failure_response(uid, mode, &format!("policy decision failed: {error}")),
    }
}

/// Answers a review on `/validate/imagesets`: unparseable references, invalid selectors and
/// duplicate images are refused, naming the entry.
pub fn validate_image_set_review(mut review: Review) -> (Value, Answer) {
    let uid = &review.uid;
    let (_, operation) = review.kind_and_operation();
    if !matches!(operation, "CREATE" | "UPDATE") {
        return (allow(uid, &[]), Answer::Skipped);
    }
    let set: ImageSet = match serde_json::from_value(review.request["object"].take()) {
        Ok(set) => set,
        Err(error) => {
            return (
                deny(
                    uid,
                    &format!("the object is not a valid ImageSet: {error}"),
                    &[],
                ),
                Answer::Denied,
            );
        }
    };
    match validate_image_set(&set.spec) {
        Ok(_) => (allow(uid, &[]), Answer::Unchanged),
        Err(error) => {
            let name = set.metadata.name.as_deref().unwrap_or("<unnamed>");
            (
                deny(uid, &format!("ImageSet {name}: {error}"), &[]),
                Answer::Denied,
            )
        }
    }
}

/// Top-level fields a patch changes (`nodeSelector`, `affinity`, `imagePullPolicy`, …), for
/// the patches metric. Bounded by the allow-listed paths.
pub fn patched_fields(decision: &Decision, kind: WorkloadKind) -> BTreeMap<&'static str, usize> {
    let mut fields = BTreeMap::new();
    for op in &decision.patch.0 {
        let path = op.path().to_string();
        let field = if path.ends_with("/imagePullPolicy") {
            "imagePullPolicy"
        } else if path.ends_with("/image") {
            "image"
        } else if path.starts_with(&format!("{}/nodeSelector", kind.pod_spec_path())) {
            "nodeSelector"
        } else if path.starts_with(&format!("{}/affinity", kind.pod_spec_path())) {
            "affinity"
        } else if path.starts_with("/metadata/annotations") {
            "annotations"
        } else {
            "other"
        };
        *fields.entry(field).or_insert(0) += 1;
    }
    fields
}
