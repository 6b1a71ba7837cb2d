//! The controller's aggregation at 5,000 nodes and 1,000 images (100 ImageSets of 10 images,
//! every node holding its pool's images): a full recompute, from the objects to every
//! ImageSet's status, and the incremental update after one node's labels change; and the
//! controller's check of stranded workloads, once per reconcile pass, over 1,000 Deployments
//! that each require three image labels.
//!
//! `cargo bench --bench aggregate` (or `just bench`) prints the median and slowest of the runs.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark stops on setup failures

use std::time::{Duration, Instant};

use coral::controller::aggregate::{Aggregator, Problems, image_set_status};
use coral::controller::scale;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

const NODES: usize = 5_000;
const SETS: usize = 100;
const IMAGES_PER_SET: usize = 10;

fn statuses(aggregator: &Aggregator, sets: &[coral::api::ImageSet]) -> usize {
    let now = Time(Timestamp::now());
    sets.iter()
        .filter_map(|set| {
            let summary = aggregator.summary("shop", set.metadata.name.as_deref()?)?;
            Some(image_set_status(
                Some(1),
                &summary,
                &Problems::default(),
                None,
                &now,
            ))
        })
        .filter(|status| status.images_complete == IMAGES_PER_SET as i32)
        .count()
}

fn report(what: &str, mut samples: Vec<Duration>, target: &str) {
    samples.sort();
    println!(
        "{what}: median {:.3} ms, slowest {:.3} ms over {} runs   {target}",
        samples[samples.len() / 2].as_secs_f64() * 1000.0,
        samples[samples.len() - 1].as_secs_f64() * 1000.0,
        samples.len()
    );
}

fn main() {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let runs = if benchmarking { 15 } else { 1 };
    if !benchmarking {
        println!("check run (no --bench): one run, unoptimized; not benchmark figures");
    }
    let sets = scale::image_sets(SETS, IMAGES_PER_SET);
    let labels: Vec<_> = (0..NODES)
        .map(|n| scale::node_labels(n, SETS, IMAGES_PER_SET))
        .collect();

    let mut full = Vec::new();
    let mut aggregator = Aggregator::new();
    for _ in 0..runs {
        let started = Instant::now();
        aggregator = Aggregator::new();
        for set in &sets {
            aggregator.apply_image_set(set);
        }
        for (n, labels) in labels.iter().enumerate() {
            aggregator.apply_node_labels(&format!("node-{n}"), labels.clone());
        }
        let complete = statuses(&aggregator, &sets);
        full.push(started.elapsed());
        assert_eq!(complete, SETS, "every set complete");
    }
    report(
        &format!(
            "full recompute, {NODES} nodes x {} images, {SETS} statuses",
            SETS * IMAGES_PER_SET
        ),
        full,
        "target: < 200 ms",
    );

    let mut incremental = Vec::new();
    for run in 0..runs.max(5) * 20 {
        let node = run % NODES;
        let mut changed = labels[node].clone();
        if run % 2 == 0 {
            changed.retain(|key, _| key == "pool");
        }
        let started = Instant::now();
        aggregator.apply_node_labels(&format!("node-{node}"), changed);
        incremental.push(started.elapsed());
    }
    report(
        "one node's labels changed, incremental update",
        incremental,
        "",
    );

    // The stranded-workload check: the node index from every Node, then every workload judged.
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = labels
        .iter()
        .enumerate()
        .map(|(n, labels)| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("node-{n}"), "labels": labels},
            }))
            .unwrap()
        })
        .collect();
    let node_refs: Vec<&k8s_openapi::api::core::v1::Node> = nodes.iter().collect();
    let set_refs: Vec<&coral::api::ImageSet> = sets.iter().collect();
    let workloads: Vec<serde_json::Value> = (0..1_000)
        .map(|w| {
            let set = &sets[w % SETS];
            let selector: serde_json::Map<String, serde_json::Value> = set.spec.images[..3]
                .iter()
                .map(|image| {
                    let reference = coral::image::ImageReference::parse(image).unwrap();
                    (coral::image::label_key(&reference), "available".into())
                })
                .collect();
            serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": format!("w{w}"), "namespace": "shop"},
                "spec": {"template": {"spec": {"nodeSelector": selector, "containers": []}}},
            })
        })
        .collect();
    let mut passes = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let index = coral::index::ClusterIndex::from_objects(coral::index::ClusterObjects {
            image_sets: &set_refs,
            nodes: &node_refs,
            ..coral::index::ClusterObjects::default()
        });
        let stranded = coral::controller::find_stranded(&workloads, &index, 1);
        passes.push(started.elapsed());
        assert!(
            stranded.is_empty(),
            "every workload's images are on its pool's nodes"
        );
    }
    report(
        &format!("stranded-workload check per pass, {NODES} nodes, 1,000 Deployments"),
        passes,
        "",
    );
}
