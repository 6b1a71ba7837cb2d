//! `coral policy test`: OPA-style unit tests for policies. Every `test_*` rule of every
//! `*_test.rego` file is evaluated; true passes, false or undefined fails, an evaluation error
//! is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::source::read;
use super::{PolicyError, is_test_file};

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

/// Names of the data files loaded beside the policies, as `opa test` loads them.
const DATA_FILES: [&str; 3] = ["data.json", "data.yaml", "data.yml"];

/// A data file and the data path its value goes to.
type DataFile = (PathBuf, Vec<String>);

/// What the paths hold: every `.rego` file (files or directories, walked recursively),
/// sorted, and every data file with the data path of its directory below the path it was
/// found under (`policy-tests/data.json` is the root of `data`, `policy-tests/x/data.json`
/// is `data.x`), as `opa test` loads them.
fn collect(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<DataFile>), PolicyError> {
    let mut files = Vec::new();
    let mut data = Vec::new();
    let mut pending: Vec<(PathBuf, Vec<String>)> = paths
        .iter()
        .map(|path| (path.clone(), Vec::new()))
        .collect();
    while let Some((path, prefix)) = pending.pop() {
        let read_error = |source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        };
        let metadata = std::fs::metadata(&path).map_err(read_error)?;
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(read_error)? {
                let entry = entry.map_err(read_error)?;
                let mut below = prefix.clone();
                if entry.file_type().map_err(read_error)?.is_dir() {
                    below.push(entry.file_name().to_string_lossy().into_owned());
                }
                pending.push((entry.path(), below));
            }
        } else if path.extension().is_some_and(|e| e == "rego") {
            files.push(path);
        } else if path
            .file_name()
            .is_some_and(|n| DATA_FILES.iter().any(|d| n == *d))
        {
            data.push((path, prefix));
        }
    }
    files.sort();
    files.dedup();
    data.sort();
    data.dedup();
    Ok((files, data))
}

/// The `data` document of the data files: each file's value at its path, merged.
fn load_data(files: &[DataFile]) -> Result<Value, PolicyError> {
    let mut data = Value::Object(Map::new());
    for (path, prefix) in files {
        let origin = path.display().to_string();
        let invalid = |message: String| PolicyError::Data(format!("{origin}: {message}"));
        let text = read(path)?;
        let mut value: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
        } else {
            serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?
        };
        if !value.is_object() {
            return Err(invalid("a data file must hold an object".to_string()));
        }
        for key in prefix.iter().rev() {
            value = Value::Object(Map::from_iter([(key.clone(), value)]));
        }
        merge(&mut data, value, &mut Vec::new()).map_err(|at| {
            invalid(format!(
                "data.{} is already defined by another data file",
                at.join(".")
            ))
        })?;
    }
    Ok(data)
}

/// Merges objects key by key; anything else defined twice is a conflict, reported by path.
fn merge(into: &mut Value, value: Value, at: &mut Vec<String>) -> Result<(), Vec<String>> {
    match (into, value) {
        (Value::Object(into), Value::Object(value)) => {
            for (key, value) in value {
                at.push(key.clone());
                match into.get_mut(&key) {
                    Some(existing) => merge(existing, value, at)?,
                    None => {
                        into.insert(key, value);
                    }
                }
                at.pop();
            }
            Ok(())
        }
        _ => Err(at.clone()),
    }
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
/// `data` is what the data files under the paths hold (see [`collect`]) and nothing else, as
/// under `opa test`: defaults the tests rely on, such as `data.coral.settings`, come from such
/// a file or from the tests themselves.
pub fn run_tests(paths: &[PathBuf], options: &TestOptions) -> Result<TestReport, PolicyError> {
    let (files, data_files) = collect(paths)?;
    let data = load_data(&data_files)?;
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
    engine
        .add_data(super::engine::rego(&data).map_err(|e| PolicyError::Data(e.to_string()))?)
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
