//! One decision of the default policies for a Deployment with three containers, against a
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark stops on setup failures
//! cluster of 1,000 managed images and 5,000 nodes, the state prepared once.
//!
//! Run with `cargo bench --bench decision` (or `just bench`). Prints the median and tail
//! latency of `Evaluator::decide`, which includes building the input, both evaluations
//! (decision and convergence check), the rails and the final diff.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The allocator of the `coral` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use coral::api::{ImageSet, ImageSetSpec};
use coral::image::{ImageReference, LABEL_AVAILABLE, label_key};
use coral::index::ClusterIndex;
use coral::policy::{
    CompiledPolicies, Evaluator, EvaluatorOptions, PolicyRequest, PolicySet, Settings, coral_data,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::json;

const IMAGE_SETS: usize = 100;
const IMAGES_PER_SET: usize = 10;
const NODES: usize = 5_000;
const POOLS: usize = 10;
const WARMUP: usize = 200;
/// Samples measured; `CORAL_BENCH_SAMPLES` overrides (a profiler wants more).
const SAMPLES: usize = 5_000;

fn image(set: usize, i: usize) -> String {
    format!("registry.example.com/team-{set}/service-{i}:1.{i}")
}

fn state() -> ClusterIndex {
    let mut index = ClusterIndex::new();
    for set in 0..IMAGE_SETS {
        let pool = format!("pool-{}", set % POOLS);
        let mut image_set = ImageSet::new(
            &format!("set-{set}"),
            ImageSetSpec {
                images: (0..IMAGES_PER_SET).map(|i| image(set, i)).collect(),
                node_selector: Some(LabelSelector {
                    match_labels: Some([("pool".to_string(), pool)].into()),
                    match_expressions: None,
                }),
                image_pull_secrets: Vec::new(),
            },
        );
        image_set.metadata.namespace = Some(format!("ns-{}", set % 20));
        index.apply_image_set(&image_set);
    }
    for node in 0..NODES {
        let pool = node % POOLS;
        let mut labels = BTreeMap::from([
            ("pool".to_string(), format!("pool-{pool}")),
            ("kubernetes.io/hostname".to_string(), format!("node-{node}")),
        ]);
        // Every node holds the images of its pool's ImageSets.
        for set in (pool..IMAGE_SETS).step_by(POOLS) {
            for i in 0..IMAGES_PER_SET {
                let reference = ImageReference::parse(&image(set, i)).expect("valid image");
                labels.insert(label_key(&reference), LABEL_AVAILABLE.to_string());
            }
        }
        index.apply_node(&format!("node-{node}"), labels);
    }
    index
}

fn main() {
    let started = Instant::now();
    let index = state();
    let policies = CompiledPolicies::compile(&PolicySet::embedded()).expect("policies compile");
    let data = coral_data(&index, &Settings::default());
    let evaluator =
        Evaluator::new(&policies, data, EvaluatorOptions::default()).expect("evaluator");
    let placement = index.placement();
    let prepare = started.elapsed();

    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "shop",
            "namespace": "ns-3",
            "annotations": {"coral.dev/inject": "selectors,pull-policy"},
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [
                    {"name": "web", "image": image(3, 0)},
                    {"name": "api", "image": image(3, 1)},
                    {"name": "cache", "image": image(13, 2)},
                ]},
            },
        },
    });
    let request = PolicyRequest::create(deployment, "ns-3").expect("request");
    let namespace_labels = BTreeMap::new();

    let decision = evaluator
        .decide(&request, &namespace_labels, &placement)
        .expect("decision");
    assert_eq!(
        decision.patch.0.len(),
        4,
        "selector and three pull policies"
    );

    // `cargo test --all-targets` runs this file too, unoptimized and without `--bench`: then a
    // few samples only check that it works.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let samples_wanted = std::env::var("CORAL_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benchmarking { SAMPLES } else { 20 });
    for _ in 0..if benchmarking { WARMUP } else { 0 } {
        evaluator
            .decide(&request, &namespace_labels, &placement)
            .expect("decision");
    }

    let mut samples: Vec<Duration> = (0..samples_wanted)
        .map(|_| {
            let start = Instant::now();
            let decision = evaluator.decide(&request, &namespace_labels, &placement);
            let elapsed = start.elapsed();
            assert!(decision.is_ok());
            elapsed
        })
        .collect();
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;

    println!(
        "state: {} managed images, {NODES} nodes ({} ImageSets); prepared in {:.1} ms",
        IMAGE_SETS * IMAGES_PER_SET,
        IMAGE_SETS,
        prepare.as_secs_f64() * 1000.0
    );
    println!(
        "decision (Deployment, 3 containers, selectors + pull-policy), {samples_wanted} samples:"
    );
    println!(
        "  median {:.1} µs   p90 {:.1} µs   p99 {:.1} µs   mean {:.1} µs   target: median < 100 µs",
        micros(at(0.5)),
        micros(at(0.9)),
        micros(at(0.99)),
        micros(mean)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
