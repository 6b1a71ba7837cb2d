//! The controller's aggregation at 5,000 nodes and 1,000 images (100 ImageSets of 10 images,
//! every node holding its pool's images): a full recompute, from the objects to every
//! ImageSet's status, and the incremental update after one node's labels change.
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
}
