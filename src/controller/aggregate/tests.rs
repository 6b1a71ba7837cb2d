use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::*;

fn set(name: &str, images: &[&str], pool: &str) -> ImageSet {
    serde_json::from_value(json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": name, "namespace": "shop", "generation": 2},
        "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": pool}}},
    }))
    .expect("ImageSet")
}

fn key(image: &str) -> String {
    label_key(&ImageReference::parse(image).expect("valid"))
}

fn labels(pool: &str, available: &[&str]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("pool".to_string(), pool.to_string())]);
    for image in available {
        labels.insert(key(image), "available".to_string());
    }
    labels
}

fn node_image(node: &str, entries: serde_json::Value) -> NodeImage {
    serde_json::from_value(json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
        "metadata": {"name": node}, "spec": {"nodeName": node},
        "status": {"available": 0, "pulling": 0, "failed": 0, "images": entries},
    }))
    .expect("NodeImage")
}

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).expect("time"))
}

fn counts(aggregator: &Aggregator, name: &str) -> Vec<(usize, usize, usize)> {
    aggregator
        .summary("shop", name)
        .expect("known set")
        .images
        .iter()
        .map(|(_, _, _, c)| (c.available, c.pulling, c.failed))
        .collect()
}

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn cluster() -> Aggregator {
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("a", labels("web", &["nginx:1.27"]));
    aggregator.apply_node_labels("b", labels("web", &[]));
    aggregator.apply_node_labels("c", labels("batch", &["nginx:1.27"]));
    aggregator.apply_node_image(&node_image(
        "a",
        json!([{"image": "docker.io/library/nginx:1.27", "label": key("nginx:1.27"), "state": "available", "digest": DIGEST, "attempts": 0}]),
    ));
    aggregator.apply_node_image(&node_image(
        "b",
        json!([{"image": "nginx:1.27", "label": key("nginx:1.27"), "state": "failed", "attempts": 5, "lastError": "401 Unauthorized"}]),
    ));
    aggregator.apply_image_set(&set("web", &["nginx:1.27", "redis:7"], "web"));
    aggregator
}

#[test]
fn controller_counts_images_over_the_targeted_nodes() {
    let aggregator = cluster();
    let summary = aggregator.summary("shop", "web").expect("known");
    assert_eq!(summary.targeted, 2);
    assert_eq!(counts(&aggregator, "web"), [(1, 0, 1), (0, 2, 0)]);
    let status = image_set_status(Some(2), &summary, &Problems::default(), None, &now());
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(
        (
            status.image_count,
            status.nodes_targeted,
            status.images_complete
        ),
        (2, 2, 0)
    );
    assert_eq!(status.images[0].digest.as_deref(), Some(DIGEST));
    assert_eq!(status.images[0].normalized, "docker.io/library/nginx:1.27");
    let conditions: Vec<(&str, &str, &str)> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Ready", "False", "NotAllAvailable"),
            ("Progressing", "True", "Pulling"),
            ("Degraded", "True", "PullFailed"),
        ]
    );
    assert_eq!(
        status.conditions[2].message,
        "nginx:1.27 failed on node b: 401 Unauthorized"
    );
}

#[test]
fn controller_incremental_updates_match_a_full_recompute() {
    let mut incremental = cluster();
    // b gets nginx; c joins the web pool; a leaves; a's NodeImage goes.
    incremental.apply_node_labels("b", labels("web", &["nginx:1.27", "redis:7"]));
    incremental.apply_node_image(&node_image("b", json!([])));
    incremental.apply_node_labels("c", labels("web", &["nginx:1.27"]));
    incremental.apply_node_labels("a", labels("batch", &["nginx:1.27"]));
    incremental.delete_node_image("a");
    incremental.apply_node_labels("d", labels("web", &[]));
    incremental.delete_node("d");

    let mut full = Aggregator::new();
    full.apply_image_set(&set("web", &["nginx:1.27", "redis:7"], "web"));
    full.apply_node_labels("a", labels("batch", &["nginx:1.27"]));
    full.apply_node_labels("b", labels("web", &["nginx:1.27", "redis:7"]));
    full.apply_node_labels("c", labels("web", &["nginx:1.27"]));
    assert_eq!(
        incremental.summary("shop", "web"),
        full.summary("shop", "web")
    );
    assert_eq!(counts(&incremental, "web"), [(2, 0, 0), (1, 1, 0)]);
    let summary = incremental.summary("shop", "web").expect("known");
    assert!(
        summary.images[0].3.digests.is_empty(),
        "a's digest went with it"
    );
    assert!(
        summary.images[0].3.failures.is_empty(),
        "b's failure went with it"
    );
}

#[test]
fn controller_status_is_stable_and_conditions_keep_their_transition_times() {
    let aggregator = cluster();
    let summary = aggregator.summary("shop", "web").expect("known");
    let first = image_set_status(Some(2), &summary, &Problems::default(), None, &now());
    let later = Time(Timestamp::from_second(1_800_000_600).expect("time"));
    let again = image_set_status(
        Some(2),
        &summary,
        &Problems::default(),
        Some(&first),
        &later,
    );
    assert_eq!(again, first, "same picture, same status: nothing to patch");

    let problems = Problems {
        secrets: vec!["shop/pull".to_string()],
    };
    let degraded = image_set_status(Some(2), &summary, &problems, Some(&first), &later);
    let condition = &degraded.conditions[2];
    assert_eq!(
        (
            condition.reason.as_str(),
            condition.last_transition_time.clone()
        ),
        (
            "SecretMissing",
            first.conditions[2].last_transition_time.clone()
        )
    );
    assert_eq!(
        condition.message,
        "pull secret(s) not found or not usable: shop/pull"
    );
}

#[test]
fn controller_reports_invalid_specs_and_empty_selections() {
    let mut aggregator = cluster();
    aggregator.apply_image_set(&set(
        "bad",
        &["nginx:1.27", "docker.io/library/nginx:1.27"],
        "web",
    ));
    aggregator.apply_image_set(&set("none", &["nginx:1.27"], "gpu"));
    let bad = aggregator.summary("shop", "bad").expect("known");
    let status = image_set_status(None, &bad, &Problems::default(), None, &now());
    assert_eq!(status.conditions[0].reason, "InvalidSpec");
    assert_eq!(status.conditions[2].status, "True");
    assert!(
        status.conditions[2].message.starts_with("spec.images[1]"),
        "{}",
        status.conditions[2].message
    );
    let none = aggregator.summary("shop", "none").expect("known");
    let status = image_set_status(None, &none, &Problems::default(), None, &now());
    assert_eq!(
        (
            status.conditions[0].status.as_str(),
            status.conditions[0].reason.as_str()
        ),
        ("True", "NoNodesSelected")
    );
}

#[test]
fn controller_events_mark_first_availability_failures_and_readiness() {
    let mut aggregator = Aggregator::new();
    aggregator.apply_image_set(&set("web", &["nginx:1.27"], "web"));
    aggregator.apply_node_labels("a", labels("web", &[]));
    aggregator.apply_node_labels("b", labels("web", &[]));
    let summary = aggregator.summary("shop", "web").expect("known");
    let pulling = image_set_status(Some(1), &summary, &Problems::default(), None, &now());
    assert!(transitions(None, &pulling, &summary).is_empty());

    aggregator.apply_node_labels("a", labels("web", &["nginx:1.27"]));
    aggregator.apply_node_image(&node_image(
        "b",
        json!([{"image": "nginx:1.27", "label": key("nginx:1.27"), "state": "failed", "attempts": 5, "lastError": "not found"}]),
    ));
    let summary = aggregator.summary("shop", "web").expect("known");
    let partial = image_set_status(
        Some(1),
        &summary,
        &Problems::default(),
        Some(&pulling),
        &now(),
    );
    let notices = transitions(Some(&pulling), &partial, &summary);
    assert_eq!(
        notices,
        [
            Notice {
                warning: false,
                reason: "ImageAvailable",
                message: "nginx:1.27 is available on its first node (1 of 2 targeted)".into()
            },
            Notice {
                warning: true,
                reason: "PullFailed",
                message: "nginx:1.27 failed on 1 node(s), node b: not found".into()
            },
        ]
    );
    assert!(
        transitions(Some(&partial), &partial, &summary).is_empty(),
        "no transition, no Event"
    );

    aggregator.apply_node_labels("b", labels("web", &["nginx:1.27"]));
    let summary = aggregator.summary("shop", "web").expect("known");
    let ready = image_set_status(
        Some(1),
        &summary,
        &Problems::default(),
        Some(&partial),
        &now(),
    );
    assert_eq!(
        transitions(Some(&partial), &ready, &summary),
        [Notice {
            warning: false,
            reason: "AllAvailable",
            message: "all 1 image(s) are available on all 2 targeted node(s)".into()
        }]
    );
}

/// 5,000 nodes in 100 pools, 100 ImageSets of 10 images each (1,000 images), every node
/// holding its pool's images; then one node's NodeImage changes.
#[test]
fn controller_aggregation_at_5000_nodes_and_1000_images() {
    let aggregator = super::super::scale::cluster(5_000, 100, 10);
    assert_eq!(aggregator.node_count(), 5_000);
    let summary = aggregator.summary("shop", "set-7").expect("known");
    assert_eq!(summary.targeted, 50);
    assert!(
        summary
            .images
            .iter()
            .all(|(_, _, _, c)| c.available == 50 && c.failed == 0)
    );

    let mut aggregator = aggregator;
    let image = super::super::scale::image(7, 3);
    aggregator.apply_node_labels("node-7", {
        let mut labels = labels("p7", &[]);
        for i in (0..10).filter(|&i| i != 3) {
            labels.insert(key(&super::super::scale::image(7, i)), "available".into());
        }
        labels
    });
    aggregator.apply_node_image(&node_image(
        "node-7",
        json!([{"image": image, "label": key(&image), "state": "failed", "attempts": 5, "lastError": "not found"}]),
    ));
    let summary = aggregator.summary("shop", "set-7").expect("known");
    assert_eq!(
        (summary.images[3].3.available, summary.images[3].3.failed),
        (49, 1)
    );
    assert_eq!(
        aggregator.summary("shop", "set-8").expect("known").images[3]
            .3
            .available,
        50
    );
}

#[test]
fn controller_reports_digest_drift_across_nodes_and_with_the_mirror() {
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let mut aggregator = Aggregator::new();
    let entry = |digest: &str| json!([{"image": "nginx:1.27", "label": key("nginx:1.27"), "state": "available", "digest": digest, "attempts": 0}]);
    for (node, digest) in [("a", DIGEST), ("b", DIGEST), ("c", OTHER)] {
        aggregator.apply_node_labels(node, labels("web", &["nginx:1.27"]));
        aggregator.apply_node_image(&node_image(node, entry(digest)));
    }
    aggregator.apply_image_set(&set("web", &["nginx:1.27"], "web"));
    let status_of = |aggregator: &Aggregator, previous: Option<&ImageSetStatus>| {
        let summary = aggregator.summary("shop", "web").expect("known");
        let status = image_set_status(Some(2), &summary, &Problems::default(), previous, &now());
        let status = with_drift(status, &summary, previous, &now());
        let notices = transitions(previous, &status, &summary);
        (status, notices)
    };
    let drift = |status: &ImageSetStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == DIGEST_DRIFT_CONDITION)
            .cloned()
            .expect("DigestDrift")
    };
    let (status, notices) = status_of(&aggregator, None);
    assert_eq!(status.images[0].digest.as_deref(), Some(DIGEST));
    assert_eq!(status.images[0].nodes_differing, 1);
    let condition = drift(&status);
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "DigestsDiffer")
    );
    assert!(
        condition
            .message
            .contains(&format!("{DIGEST} on 2 node(s)"))
            && condition.message.contains(&format!("{OTHER} on c")),
        "{}",
        condition.message
    );
    assert!(
        notices
            .iter()
            .any(|n| n.warning && n.reason == "DigestDrift"),
        "{notices:?}"
    );

    // Node c pulls the tag again and gets the majority's digest: consistent.
    aggregator.apply_node_image(&node_image("c", entry(DIGEST)));
    let (consistent, notices) = status_of(&aggregator, Some(&status));
    assert_eq!(consistent.images[0].nodes_differing, 0);
    assert_eq!(drift(&consistent).status, "False");
    assert!(!notices.iter().any(|n| n.reason == "DigestDrift"));

    // The mirror copied another digest (the tag moved at the source): drift again.
    let summary = aggregator.summary("shop", "web").expect("known");
    let mut mirrored = consistent.clone();
    mirrored.images[0].mirror = Some(crate::api::ImageMirrorStatus {
        reference: "localhost:5000/docker.io/library/nginx:1.27".into(),
        state: crate::api::MirrorState::Mirrored,
        source_digest: Some(OTHER.into()),
        digest: Some(OTHER.into()),
        ..Default::default()
    });
    let mirrored = with_drift(mirrored, &summary, Some(&consistent), &now());
    let condition = drift(&mirrored);
    assert_eq!(condition.status, "True");
    assert!(
        condition
            .message
            .contains(&format!("the mirror copied {OTHER}"))
            && condition.message.contains(&format!("{DIGEST} on a, b, c")),
        "{}",
        condition.message
    );
}

#[test]
fn controller_drift_messages_name_at_most_ten_nodes_per_digest() {
    let mut aggregator = Aggregator::new();
    for n in 0..15 {
        let node = format!("n{n:02}");
        aggregator.apply_node_labels(&node, labels("web", &["nginx:1.27"]));
        aggregator.apply_node_image(&node_image(
            &node,
            json!([{"image": "nginx:1.27", "label": key("nginx:1.27"), "state": "available", "digest": DIGEST, "attempts": 0}]),
        ));
    }
    aggregator.apply_image_set(&set("web", &["nginx:1.27"], "web"));
    let summary = aggregator.summary("shop", "web").expect("known");
    let mut status = image_set_status(Some(2), &summary, &Problems::default(), None, &now());
    status.images[0].mirror = Some(crate::api::ImageMirrorStatus {
        state: crate::api::MirrorState::Mirrored,
        source_digest: Some("sha256:3333".into()),
        ..Default::default()
    });
    let status = with_drift(status, &summary, None, &now());
    let message = &status.conditions.last().expect("condition").message;
    assert!(
        message.contains(&format!(
            "{DIGEST} on n00, n01, n02, n03, n04, n05, n06, n07, n08, n09 and 5 more; the mirror copied sha256:3333"
        )),
        "{message}"
    );
}
