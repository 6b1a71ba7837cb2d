//! `coral policy test`: OPA-style unit tests for policies. Every `test_*` rule of every
//! `*_test.rego` file is evaluated; true passes, false or undefined fails, an evaluation error
//! is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Serialize;
use serde_json::json;

use super::source::read;
use super::{PolicyError, SETTINGS_FILE, Settings, coral_data, is_test_file};
use crate::index::ClusterIndex;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    /// Only tests whose full name (`data.pkg.test_name`) matches.
    pub run: Option<Regex>,
    /// Record per-file line coverage of the policies (test files excluded).
    pub coverage: bool,
}

/// One discovered test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestCase {
    pub file: String,
    /// `data.<package>`.
    pub package: String,
    pub name: String,
    pub row: usize,
}

impl TestCase {
    /// `data.<package>.<name>`, the name `--run` matches.
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.package, self.name)
    }
}

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Error(String),
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub case: TestCase,
    pub outcome: Outcome,
    pub duration: Duration,
}

/// Line coverage of one policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileCoverage {
    pub path: String,
    pub covered: BTreeSet<u32>,
    pub not_covered: BTreeSet<u32>,
}

impl FileCoverage {
    /// Covered lines as a percentage of the lines that can be covered.
    pub fn percent(&self) -> f64 {
        percent(self.covered.len(), self.not_covered.len())
    }
}

fn percent(covered: usize, not_covered: usize) -> f64 {
    let total = covered + not_covered;
    if total == 0 {
        100.0
    } else {
        covered as f64 * 100.0 / total as f64
    }
}

/// Results of a run.
#[derive(Debug, Clone)]
pub struct TestReport {
    pub results: Vec<TestResult>,
    pub coverage: Option<Vec<FileCoverage>>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.count(|o| *o == Outcome::Pass)
    }

    pub fn failed(&self) -> usize {
        self.count(|o| *o == Outcome::Fail)
    }

    pub fn errored(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Error(_)))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Whether every test passed.
    pub fn success(&self) -> bool {
        self.passed() == self.results.len()
    }

    /// Coverage over all policy files.
    pub fn total_coverage(&self) -> Option<f64> {
        self.coverage.as_ref().map(|files| {
            let covered = files.iter().map(|f| f.covered.len()).sum();
            let not_covered = files.iter().map(|f| f.not_covered.len()).sum();
            percent(covered, not_covered)
        })
    }

    /// The report as `opa test` prints it: failing tests (all tests with `verbose`) grouped by
    /// file, then the counts.
    pub fn render_text(&self, verbose: bool) -> String {
        let mut out = String::new();
        let mut by_file: BTreeMap<&str, Vec<&TestResult>> = BTreeMap::new();
        for result in &self.results {
            if verbose || result.outcome != Outcome::Pass {
                by_file.entry(&result.case.file).or_default().push(result);
            }
        }
        for (file, results) in &by_file {
            out.push_str(&format!("{file}:\n"));
            for result in results {
                let status = match &result.outcome {
                    Outcome::Pass => "PASS",
                    Outcome::Fail => "FAIL",
                    Outcome::Error(_) => "ERROR",
                };
                out.push_str(&format!(
                    "{}: {status} ({})\n",
                    result.case.full_name(),
                    format_duration(result.duration)
                ));
                if let Outcome::Error(message) = &result.outcome {
                    out.push_str(&format!("  {message}\n"));
                }
            }
            out.push('\n');
        }
        if let Some(files) = &self.coverage {
            out.push_str("COVERAGE\n");
            for file in files {
                out.push_str(&format!(
                    "{}: {:.1}% ({}/{} lines)",
                    file.path,
                    file.percent(),
                    file.covered.len(),
                    file.covered.len() + file.not_covered.len()
                ));
                if !file.not_covered.is_empty() {
                    let rows: Vec<String> = file.not_covered.iter().map(u32::to_string).collect();
                    out.push_str(&format!(", not covered: {}", rows.join(",")));
                }
                out.push('\n');
            }
            if let Some(total) = self.total_coverage() {
                out.push_str(&format!("total: {total:.1}%\n"));
            }
        }
        let total = self.results.len();
        out.push_str(&"-".repeat(80));
        out.push('\n');
        for (label, count) in [
            ("PASS", self.passed()),
            ("FAIL", self.failed()),
            ("ERROR", self.errored()),
        ] {
            if count > 0 || (label == "PASS" && total > 0) {
                out.push_str(&format!("{label}: {count}/{total}\n"));
            }
        }
        out
    }

    /// One JSON object per test, in the shape of `opa test --format json`; with coverage, the
    /// coverage report instead, as OPA does.
    pub fn render_json(&self) -> serde_json::Value {
        if let Some(files) = &self.coverage {
            let files: serde_json::Map<String, serde_json::Value> = files
                .iter()
                .map(|f| {
                    (
                        f.path.clone(),
                        json!({
                            "covered": f.covered,
                            "not_covered": f.not_covered,
                            "coverage": f.percent(),
                        }),
                    )
                })
                .collect();
            return json!({"files": files, "coverage": self.total_coverage()});
        }
        self.results
            .iter()
            .map(|r| {
                let mut value = json!({
                    "location": {"file": r.case.file, "row": r.case.row, "col": 1},
                    "package": r.case.package,
                    "name": r.case.name,
                    "duration": u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
                });
                match &r.outcome {
                    Outcome::Pass => {}
                    Outcome::Fail => value["fail"] = true.into(),
                    Outcome::Error(message) => value["error"] = json!({"message": message}),
                }
                value
            })
            .collect()
    }
}

fn format_duration(d: Duration) -> String {
    if d.as_millis() >= 1 {
        format!("{:.3}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{}µs", d.as_micros())
    }
}

/// Every `.rego` file under the paths (files or directories, walked recursively), sorted,
/// and the first `settings.json` met.
fn collect(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Option<PathBuf>), PolicyError> {
    let mut files = Vec::new();
    let mut settings = None;
    let mut pending: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = pending.pop() {
        let metadata = std::fs::metadata(&path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if metadata.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| PolicyError::Read {
                path: path.display().to_string(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| PolicyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                pending.push(entry.path());
            }
        } else if path.extension().is_some_and(|e| e == "rego") {
            files.push(path);
        } else if path.file_name().is_some_and(|n| n == SETTINGS_FILE) {
            settings.get_or_insert(path);
        }
    }
    files.sort();
    files.dedup();
    Ok((files, settings))
}

/// Rule heads named `test_*` in a test file, with their line numbers, first definition kept.
fn discover(source: &str) -> Vec<(String, usize)> {
    let mut seen = BTreeSet::new();
    let mut tests = Vec::new();
    for (row, line) in source.lines().enumerate() {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.starts_with("test_") && seen.insert(name.clone()) {
            tests.push((name, row + 1));
        }
    }
    tests
}

/// Loads every `.rego` file under `paths` into one engine and runs the tests.
///
/// `data.coral` starts with no images, no nodes and the settings of the first `settings.json`
/// under the paths (or the defaults), so tests override only what they need with
/// `with data.coral.… as …`.
pub fn run_tests(paths: &[PathBuf], options: &TestOptions) -> Result<TestReport, PolicyError> {
    let (files, settings_file) = collect(paths)?;
    let settings = match settings_file {
        Some(path) => {
            Settings::from_json(&read(&path)?).map_err(|source| PolicyError::Settings {
                origin: path.display().to_string(),
                source,
            })?
        }
        None => Settings::default(),
    };
    let mut engine = regorus::Engine::new();
    let mut cases = Vec::new();
    for path in &files {
        let name = path.display().to_string();
        let source = read(path)?;
        let package = engine
            .add_policy(name.clone(), source.clone())
            .map_err(|e| PolicyError::Compile {
                origin: name.clone(),
                message: e.to_string(),
            })?;
        if is_test_file(&name) {
            for (test, row) in discover(&source) {
                cases.push(TestCase {
                    file: name.clone(),
                    package: package.clone(),
                    name: test,
                    row,
                });
            }
        }
    }
    let data = coral_data(&ClusterIndex::new(), &settings);
    engine
        .add_data(regorus::Value::from(data))
        .map_err(|e| PolicyError::Data(e.to_string()))?;
    engine.set_enable_coverage(options.coverage);

    let mut results = Vec::new();
    for case in cases {
        let full_name = case.full_name();
        if options
            .run
            .as_ref()
            .is_some_and(|re| !re.is_match(&full_name))
        {
            continue;
        }
        let started = Instant::now();
        let outcome = match engine.eval_rule(full_name) {
            Ok(regorus::Value::Bool(true)) => Outcome::Pass,
            Ok(_) => Outcome::Fail,
            Err(e) => Outcome::Error(e.to_string()),
        };
        results.push(TestResult {
            case,
            outcome,
            duration: started.elapsed(),
        });
    }

    let coverage = if options.coverage {
        let report = engine
            .get_coverage_report()
            .map_err(|e| PolicyError::Evaluation(e.to_string()))?;
        Some(
            report
                .files
                .into_iter()
                .filter(|f| !is_test_file(&f.path))
                .map(|f| FileCoverage {
                    path: f.path,
                    covered: f.covered,
                    not_covered: f.not_covered,
                })
                .collect(),
        )
    } else {
        None
    };
    Ok(TestReport { results, coverage })
}
