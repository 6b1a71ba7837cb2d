//! Fuzz targets: each takes arbitrary bytes, feeds them to one of Coral's parsers or decisions
//! the way a hostile client or a broken peer could, and panics only when an invariant breaks.
//!
//! `fuzz_targets/` runs them under libFuzzer (`cargo +nightly fuzz run TARGET`, or
//! `bash scripts/fuzz.sh`); `tests/fuzz_corpora.rs` replays the committed corpora and every
//! input that once broke one on stable, as part of `cargo test`.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a broken invariant is a panic: the finding

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use coral::agent::cri::RuntimeImage;
use coral::agent::record::node_image_status;
use coral::agent::tracker::{Inventory, RetryPolicy, Tracker};
use coral::credentials::Keyring;
use coral::image::{ImageReference, is_image_label, label_key};
use coral::index::{ClusterIndex, StateFile};
use coral::policy::{
    AllowedPaths, CompiledPolicies, EvaluatorOptions, PolicySet, Snapshot, WorkloadKind,
    checked_patch, coral_data,
};
use coral::webhook::FailureMode;
use coral::webhook::admission::{
    MutateStep, Review, decided_response, mutate_step, validate_image_set_review,
};
use serde_json::Value;

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Image references: parsing never panics; a reference that parses prints as one that parses
/// back to itself, and its label key is an image label.
pub fn image_reference(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(reference) = ImageReference::parse(input) else {
        return;
    };
    let printed = reference.to_string();
    let again = ImageReference::parse(&printed)
        .unwrap_or_else(|e| panic!("{input:?} prints as {printed:?}, which does not parse: {e}"));
    assert_eq!(again, reference, "{input:?} prints as {printed:?}");
    assert_eq!(again.to_string(), printed);
    assert!(is_image_label(&label_key(&reference)), "{printed}");
}

/// The cluster the admission target decides against: the embedded policies, two ImageSets
/// (one private), nodes holding their images, an opted-in namespace.
const STATE: &str = r#"{
  "imageSets": [
    {"metadata": {"name": "web", "namespace": "shop"},
     "spec": {"images": ["nginx:1.27", "ghcr.io/example/report:3"], "nodeSelector": {"matchLabels": {"pool": "web"}}}},
    {"metadata": {"name": "private", "namespace": "team-a"},
     "spec": {"images": ["ghcr.io/acme/private:1"], "imagePullSecrets": [{"name": "acme"}]}}
  ],
  "nodes": [
    {"name": "a", "labels": {"pool": "web"}, "images": ["nginx:1.27", "ghcr.io/example/report:3", "ghcr.io/acme/private:1"]},
    {"name": "b", "labels": {"pool": "web"}, "images": ["nginx:1.27"], "taints": [{"key": "gpu", "effect": "NoSchedule"}]},
    {"name": "c", "labels": {"pool": "batch"}, "unschedulable": true}
  ],
  "namespaces": [
    {"name": "shop", "labels": {"coral.dev/inject": "enabled"}},
    {"name": "team-a", "labels": {"coral.dev/inject": "enabled"}}
  ]
}"#;

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let state = StateFile::parse(STATE, "fuzz state").expect("the fuzz state parses");
        Snapshot::from_state_file(&PolicySet::embedded(), state, EvaluatorOptions::default())
            .expect("the embedded policies prepare")
    })
}

/// AdmissionReviews: whatever the body, the webhook's answer echoes the uid, says whether
/// the object is allowed, and carries a patch that applies and only touches allowed paths.
pub fn admission_review(data: &[u8]) {
    let Ok(review) = Review::parse(data) else {
        return;
    };
    let uid = review.uid.clone();
    let (value, _) = validate_image_set_review(review.clone());
    check_answer(&value, &uid, None);
    match mutate_step(review, FailureMode::Allow, true, true) {
        MutateStep::Answer(value, _) => check_answer(&value, &uid, None),
        MutateStep::Decide(request) => {
            let decided = snapshot().decide(&request);
            if let Ok(decision) = &decided {
                let mut patched = request.object.clone();
                json_patch::patch(&mut patched, &decision.patch).expect("the patch applies");
                assert_eq!(
                    patched, decision.object,
                    "the patch makes the decided object"
                );
            }
            // The kind is the request's (the object's own apiVersion and kind may be absent).
            let kind = request.workload_kind().ok();
            let (value, _) = decided_response(&uid, FailureMode::Allow, decided);
            check_answer(&value, &uid, kind.map(|kind| (&request.object, kind)));
        }
    }
}

fn check_answer(value: &Value, uid: &str, decided: Option<(&Value, WorkloadKind)>) {
    assert_eq!(value["apiVersion"], "admission.k8s.io/v1", "{value}");
    let response = &value["response"];
    assert_eq!(response["uid"], uid, "{value}");
    assert!(response["allowed"].is_boolean(), "{value}");
    let Some(encoded) = response["patch"].as_str() else {
        return;
    };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("the patch is JSON");
    let (object, kind) = decided.expect("only a decision of a workload patches");
    check_allowed(&patch, kind, &AllowedPaths::default(), object);
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the answered patch applies");
}

/// Every operation of `patch` reads and writes allowed paths only.
fn check_allowed(
    patch: &json_patch::Patch,
    kind: WorkloadKind,
    allowed: &AllowedPaths,
    on: &Value,
) {
    for operation in &patch.0 {
        let mut paths = vec![operation.path().to_string()];
        match operation {
            json_patch::PatchOperation::Move(op) => paths.push(op.from.to_string()),
            json_patch::PatchOperation::Copy(op) => paths.push(op.from.to_string()),
            _ => {}
        }
        for path in paths {
            assert!(
                allowed.allows(kind, &path),
                "{path} is not allowed, in {} on {on}",
                serde_json::to_string(patch).unwrap_or_default()
            );
        }
    }
}

/// The rails: a patch they accept, applied, differs from the object only at allowed paths,
/// and that difference (what the webhook answers) applies to give the same object.
pub fn rails(data: &[u8]) {
    let Ok(Value::Object(document)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (Some(object), Some(Value::Array(operations))) =
        (document.get("object"), document.get("patch"))
    else {
        return;
    };
    let Some(kind) = WorkloadKind::of_object(object) else {
        return;
    };
    let allowed = AllowedPaths::default();
    let Ok(patch) = checked_patch(operations.clone(), kind, &allowed) else {
        return;
    };
    check_allowed(&patch, kind, &allowed, object);
    let mut patched = object.clone();
    if json_patch::patch(&mut patched, &patch).is_err() {
        return;
    }
    let answered = json_patch::diff(object, &patched);
    check_allowed(&answered, kind, &allowed, object);
    let mut again = object.clone();
    json_patch::patch(&mut again, &answered).expect("the difference applies");
    assert_eq!(again, patched, "the difference makes the patched object");
}

/// State files (JSON and YAML): parsing never panics, and what parses indexes and becomes
/// the policies' data.
pub fn state_file(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(state) = StateFile::parse(input, "fuzz") else {
        return;
    };
    let settings = state.settings.clone().unwrap_or_default();
    let index = state.into_index();
    let _ = index.placement();
    let _ = coral_data(&index, &settings);
}

/// Policy ConfigMaps: parsing and compiling never panic, and what compiles is prepared and
/// probed within its bounds.
pub fn policy_configmap(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(set) = PolicySet::from_configmap_manifest(input, "fuzz") else {
        return;
    };
    let Ok(compiled) = CompiledPolicies::compile(&set) else {
        return;
    };
    let options = EvaluatorOptions {
        timeout: Duration::from_millis(50),
        memory_budget: 16 << 20,
        ..EvaluatorOptions::default()
    };
    let started = Instant::now();
    if let Ok(snapshot) = Snapshot::new(&compiled, ClusterIndex::new(), None, options.clone()) {
        let _ = snapshot.probe();
    }
    // Preparing evaluates once and the probe twice, each within its bound.
    assert!(
        started.elapsed() < options.timeout * 8,
        "{:?}",
        started.elapsed()
    );
}

/// Docker config files and pull secrets: parsing never panics, and every credential found
/// becomes an auth config.
pub fn pull_secrets(data: &[u8]) {
    let mut keyring = Keyring::new();
    let _ = keyring.add_config_json(data, "fuzz");
    let _ = keyring.add_dockercfg(data, "fuzz");
    if let Ok(secret) = serde_json::from_slice::<k8s_openapi::api::core::v1::Secret>(data) {
        let _ = keyring.add_secret(&secret);
    }
    for image in [
        "nginx:1.27",
        "ghcr.io/acme/app:1",
        "localhost:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let reference = ImageReference::parse(image).expect("a valid reference");
        for credential in keyring.lookup(&reference) {
            let _ = credential.to_auth_config();
        }
    }
}

/// CRI responses: what the runtime lists (any protobuf) becomes the inventory, whose every
/// parseable name finds its image, and pull errors of any size and encoding (the runtime
/// passes on the registry's) become a NodeImage status with bounded messages.
pub fn cri_responses(data: &[u8]) {
    use prost::Message as _;
    let Ok(listed) = k8s_cri::v1::ListImagesResponse::decode(data) else {
        return;
    };
    let images: Vec<RuntimeImage> = listed.images.into_iter().map(RuntimeImage::from).collect();
    let inventory = Inventory::new(images.clone());
    let mut wanted = Vec::new();
    for image in &images {
        for name in image.repo_tags.iter().chain(&image.repo_digests) {
            let Ok(reference) = ImageReference::parse(name) else {
                continue;
            };
            if reference.tag().is_none() || reference.digest().is_none() {
                assert!(inventory.find(&reference).is_some(), "{name} is listed");
            }
            wanted.push(reference);
        }
    }
    let mut tracker = Tracker::new(RetryPolicy::default());
    tracker.set_wanted(
        wanted
            .iter()
            .map(|reference| (reference.clone(), std::sync::Arc::new(Keyring::new()))),
    );
    let now = Instant::now();
    tracker.observe(&inventory, now, false);
    let error = String::from_utf8_lossy(data).repeat(3);
    for reference in &wanted {
        tracker.failed(reference, error.clone(), now, 0.5);
    }
    let status = node_image_status(&tracker, None, None, Some(1));
    for entry in &status.images {
        if let Some(message) = &entry.last_error {
            assert!(message.chars().count() <= 1024, "{} chars", message.len());
        }
    }
    serde_json::to_string(&status).expect("the status serializes");
}
