//! `coral demo`: the embedded default policies on the example workloads, against the example
//! cluster state, all compiled into the binary so it runs anywhere.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::Value;

use coral::index::StateFile;
use coral::policy::{EvaluatorOptions, PolicyRequest, PolicySet, Snapshot};

use super::render_diff;

const STATE_FILE: &str = "examples/state.yaml";
const STATE: &str = include_str!("../../examples/state.yaml");

const WORKLOADS: [(&str, &str); 4] = [
    (
        "examples/workloads/shop-deployment.yaml",
        include_str!("../../examples/workloads/shop-deployment.yaml"),
    ),
    (
        "examples/workloads/report-cronjob.yaml",
        include_str!("../../examples/workloads/report-cronjob.yaml"),
    ),
    (
        "examples/workloads/api-pod.yaml",
        include_str!("../../examples/workloads/api-pod.yaml"),
    ),
    (
        "examples/workloads/legacy-deployment.yaml",
        include_str!("../../examples/workloads/legacy-deployment.yaml"),
    ),
];

pub fn run() -> Result<ExitCode> {
    let state = StateFile::parse(STATE, STATE_FILE)?;
    let snapshot =
        Snapshot::from_state_file(&PolicySet::embedded(), &state, EvaluatorOptions::default())?;
    println!(
        "Coral demo: the default policies, {} ImageSet(s) and {} node(s) from {STATE_FILE}.",
        state.image_sets.len(),
        snapshot.index.node_count()
    );
    for node in &state.nodes {
        println!("  node {}: holds {}", node.name, node.images.join(", "));
    }
    for (name, text) in WORKLOADS {
        let object: Value =
            serde_yaml::from_str(text).with_context(|| format!("{name} is not valid YAML"))?;
        let request = PolicyRequest::create(object, "default")?;
        let decision = snapshot
            .evaluator
            .decide(&request, &snapshot.namespace_labels(&request.namespace))?;
        let why = text
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join(" ");
        println!("\n== {name}\n   {why}");
        print!("{}", render_diff(&request, &decision)?);
    }
    println!(
        "\nTry your own: coral policy eval -f WORKLOAD.yaml --state {STATE_FILE} [--policies DIR]"
    );
    Ok(ExitCode::SUCCESS)
}
