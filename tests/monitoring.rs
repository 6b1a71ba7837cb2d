//! The monitoring overlay (`deploy/overlays/monitoring`): every alert and dashboard query uses
//! only metrics Coral's components register, with their labels, and the dashboard parses.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// Labels Prometheus adds to every series it scrapes through the ServiceMonitor.
const TARGET_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "instance",
    "job",
    "service",
    "container",
];

fn overlay(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/overlays/monitoring")
            .join(file),
    )
    .unwrap()
}

/// What one PromQL expression refers to.
#[derive(Debug, Default)]
struct Uses {
    /// Metric names as written, with the label names of their selectors.
    metrics: Vec<(String, Vec<String>)>,
    /// Label names of `by`, `without`, `on` and `ignoring` clauses.
    grouping: Vec<String>,
}

fn is_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The matchers of a selector, split at the commas outside quoted values.
fn split_matchers(inside: &str) -> Vec<String> {
    let mut matchers = vec![String::new()];
    let mut quoted = false;
    for c in inside.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                matchers.push(String::new());
                continue;
            }
            _ => {}
        }
        matchers.last_mut().unwrap().push(c);
    }
    matchers.retain(|m| !m.trim().is_empty());
    matchers
}

/// A scanner of the PromQL Coral's rules use: names, selectors, grouping clauses; strings
/// and durations are skipped.
fn scan(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && is_name(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("coral_") {
                let mut labels = Vec::new();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == '{' {
                    let end = j + chars[j..].iter().position(|&c| c == '}').unwrap();
                    let inside: String = chars[j + 1..end].iter().collect();
                    for matcher in split_matchers(&inside) {
                        let name: String =
                            matcher.trim().chars().take_while(|&c| is_name(c)).collect();
                        labels.push(name);
                    }
                    i = end + 1;
                }
                uses.metrics.push((word.clone(), labels));
            }
            last_word = word;
        } else if c == '(' && ["by", "without", "on", "ignoring"].contains(&last_word.as_str()) {
            let end = i + chars[i..].iter().position(|&c| c == ')').unwrap();
            let inside: String = chars[i + 1..end].iter().collect();
            uses.grouping.extend(
                inside
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
            last_word.clear();
            i = end + 1;
        } else {
            if !c.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    uses
}

/// Checks an expression against the catalog; returns the labels its result may carry.
fn check(expr: &str, catalog: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    let uses = scan(expr);
    assert!(!uses.metrics.is_empty(), "{expr} uses no Coral metric");
    let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    for (name, selector) in &uses.metrics {
        let (base, histogram) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                catalog.contains_key(base).then_some((base, true))
            })
            .unwrap_or((name.as_str(), false));
        let labels = catalog
            .get(base)
            .unwrap_or_else(|| panic!("{expr}: {name} is not a metric Coral exports"));
        known.extend(labels.iter().cloned());
        if histogram {
            known.insert("le".to_string());
        }
        for label in selector {
            assert!(
                labels.contains(label) || TARGET_LABELS.contains(&label.as_str()),
                "{expr}: {name} has no label {label} (it has {labels:?})"
            );
        }
    }
    for label in &uses.grouping {
        assert!(
            known.contains(label),
            "{expr}: no metric of it has the label {label}"
        );
    }
    uses.grouping.into_iter().collect()
}

/// `{{ $labels.x }}` and `{{x}}` in a template.
fn template_labels(text: &str) -> Vec<String> {
    text.split("{{")
        .skip(1)
        .filter_map(|part| part.split("}}").next())
        .map(|inside| inside.trim().trim_start_matches("$labels.").to_string())
        .filter(|label| label != "$value")
        .collect()
}

#[test]
fn every_alert_uses_only_what_coral_exports() {
    let catalog = coral::metrics::catalog();
    let rule: Value = serde_yaml::from_str(&overlay("prometheusrule.yaml")).unwrap();
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "CoralPullsFailing",
        "CoralPullsPaused",
        "CoralWebhookFailingOpen",
        "CoralPolicyConfigMapRejected",
        "CoralStrandedWorkloads",
        "CoralCertificateExpiresSoon",
        "CoralControllerWithoutLeader",
        "CoralMirrorFailing",
        "CoralRegistryUnreachable",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}");
    }
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        let labels = check(expr, &catalog);
        assert!(rule["for"].is_string(), "{name} fires on one scrape");
        assert!(
            rule["labels"]["severity"].is_string(),
            "{name} has no severity"
        );
        for field in ["summary", "description"] {
            let text = rule["annotations"][field]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no {field}"));
            for label in template_labels(text) {
                assert!(
                    labels.contains(&label),
                    "{name}: {field} uses {label}, which {expr} does not keep"
                );
            }
        }
    }
}

#[test]
fn every_dashboard_query_uses_only_what_coral_exports() {
    let catalog = coral::metrics::catalog();
    let dashboard: Value = serde_json::from_str(&overlay("dashboard.json")).unwrap();
    assert_eq!(dashboard["uid"], "coral");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let labels = check(expr, &catalog);
            for label in template_labels(target["legendFormat"].as_str().unwrap_or("")) {
                assert!(
                    labels.contains(&label),
                    "{title}: the legend uses {label}, which {expr} does not keep"
                );
            }
            used.extend(scan(expr).metrics.into_iter().map(|(name, _)| name));
        }
    }
    // The dashboard shows each component: the agents, the webhook, the controller.
    for metric in [
        "coral_agent_pulls_total",
        "coral_admission_requests_total",
        "coral_controller_available_ratio",
        "coral_reloads_total",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
}

#[test]
fn the_scanner_finds_names_selectors_and_grouping() {
    let uses =
        scan(r#"sum by (kind, le) (rate(coral_x_bucket{route="mutate", a!~"b,c"}[5m])) > 0"#);
    assert_eq!(
        uses.metrics,
        vec![(
            "coral_x_bucket".to_string(),
            vec!["route".to_string(), "a".to_string()]
        )]
    );
    assert_eq!(uses.grouping, vec!["kind", "le"]);
}
