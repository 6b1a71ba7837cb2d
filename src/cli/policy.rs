//! `coral policy test` and `coral policy eval`, and the evaluation flags `coral webhook`
//! shares.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use coral::index::StateFile;
use coral::policy::testing::{TestOptions, run_tests};
use coral::policy::{AllowedPaths, Decision, EvaluatorOptions, PolicyRequest, PolicySet, Snapshot};
use serde_json::Value;

use super::ListFormat;

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Run the test_* rules of every *_test.rego file under the paths, like `opa test`.
    Test(PolicyTestArgs),
    /// Show what the policies do to one object against a cluster-state file.
    Eval(PolicyEvalArgs),
}

#[derive(Debug, Args)]
pub(super) struct PolicyTestArgs {
    /// Files or directories holding policies and tests (searched recursively).
    #[arg(value_name = "PATH", default_value = ".")]
    paths: Vec<PathBuf>,
    /// Print every test, not only failures.
    #[arg(short, long, env = "CORAL_VERBOSE")]
    verbose: bool,
    /// Run only tests whose full name (data.<package>.<test>) matches this regular expression.
    #[arg(long, value_name = "REGEX", env = "CORAL_RUN")]
    run: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text", env = "CORAL_FORMAT")]
    format: ListFormat,
    /// Report per-file line coverage of the policies.
    #[arg(long, env = "CORAL_COVERAGE")]
    coverage: bool,
    /// With --coverage, fail when total coverage is below this percentage.
    #[arg(long, value_name = "PERCENT", env = "CORAL_THRESHOLD")]
    threshold: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum EvalFormat {
    Json,
    Yaml,
    Diff,
}

#[derive(Debug, Args)]
pub(super) struct PolicyEvalArgs {
    /// The object (YAML or JSON; a bare workload or an AdmissionReview), or - for stdin.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        env = "CORAL_FILENAME"
    )]
    file: String,
    /// Cluster-state file: imageSets, nodes (with the images they hold), namespaces, settings.
    #[arg(long, value_name = "STATE.yaml", env = "CORAL_STATE")]
    state: PathBuf,
    /// Policies: a directory of *.rego (and settings.json), or a ConfigMap manifest.
    /// Default: the embedded policies.
    #[arg(long, value_name = "DIR|FILE", env = "CORAL_POLICIES")]
    policies: Option<PathBuf>,
    /// Output: json, yaml, or a readable diff (the default on a terminal).
    #[arg(short, long, value_enum, env = "CORAL_OUTPUT")]
    output: Option<EvalFormat>,
    /// Namespace of an object that names none.
    #[arg(short, long, default_value = "default", env = "CORAL_NAMESPACE")]
    namespace: String,
    #[command(flatten)]
    evaluation: EvaluationArgs,
}

/// How decisions are evaluated; shared by `policy eval` and `webhook`.
#[derive(Debug, Args)]
pub(super) struct EvaluationArgs {
    /// Paths policies may change ({podSpec} is the kind's pod spec). Repeat to allow several;
    /// replaces the default list.
    #[arg(
        long = "allowed-path",
        value_name = "POINTER",
        env = "CORAL_ALLOWED_PATHS",
        value_delimiter = ','
    )]
    allowed_paths: Vec<String>,
    /// Bound on one policy evaluation.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "250",
        env = "CORAL_EVAL_TIMEOUT_MS"
    )]
    eval_timeout_ms: u64,
    /// Bound on the memory one policy evaluation allocates; past it the decision fails (the
    /// webhook answers per --failure-mode). 0 turns the bound off.
    #[arg(
        long,
        value_name = "MIB",
        default_value = "64",
        env = "CORAL_EVAL_MEMORY_MIB"
    )]
    eval_memory_mib: u64,
}

impl EvaluationArgs {
    pub(super) fn options(self) -> Result<EvaluatorOptions> {
        let Self {
            allowed_paths,
            eval_timeout_ms,
            eval_memory_mib,
        } = self;
        Ok(EvaluatorOptions {
            allowed_paths: if allowed_paths.is_empty() {
                AllowedPaths::default()
            } else {
                AllowedPaths::new(allowed_paths)?
            },
            timeout: Duration::from_millis(eval_timeout_ms),
            memory_budget: eval_memory_mib.saturating_mul(1 << 20),
            decision_cache_bytes: 0,
        })
    }
}

pub(super) fn policy_test(args: PolicyTestArgs) -> Result<ExitCode> {
    let PolicyTestArgs {
        paths,
        verbose,
        run,
        format,
        coverage,
        threshold,
    } = args;
    if threshold.is_some() && !coverage {
        bail!("--threshold needs --coverage");
    }
    let run = run
        .map(|re| {
            regex::Regex::new(&re)
                .with_context(|| format!("--run {re:?} is not a valid regular expression"))
        })
        .transpose()?;
    let report = run_tests(&paths, &TestOptions { run, coverage })?;
    if report.results.is_empty() {
        eprintln!("error: no tests found (test_* rules in *_test.rego files)");
        return Ok(ExitCode::FAILURE);
    }
    match format {
        ListFormat::Text => print!("{}", report.render_text(verbose)),
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&report.render_json())?),
    }
    let mut ok = report.success();
    if let (Some(threshold), Some(total)) = (threshold, report.total_coverage()) {
        if total < threshold {
            eprintln!("error: coverage {total:.1}% is below the threshold of {threshold:.1}%");
            ok = false;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) fn policy_eval(args: PolicyEvalArgs) -> Result<ExitCode> {
    let PolicyEvalArgs {
        file,
        state,
        policies,
        output,
        namespace,
        evaluation,
    } = args;
    let text = read_input(&file)?;
    let object: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{file} is not valid YAML or JSON"))?;
    let request = request_from(object, &namespace).with_context(|| format!("reading {file}"))?;

    let set = match &policies {
        Some(path) => PolicySet::load(path)?,
        None => PolicySet::embedded(),
    };
    let state = StateFile::load(&state)?;
    let options = evaluation.options()?;
    let snapshot = Snapshot::from_state_file(&set, state, options)?;
    let decision = snapshot.decide(&request)?;

    let output = output.unwrap_or(if std::io::stdout().is_terminal() {
        EvalFormat::Diff
    } else {
        EvalFormat::Json
    });
    let mut out = std::io::stdout().lock();
    match output {
        EvalFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&decision)?)?,
        EvalFormat::Yaml => write!(out, "{}", serde_yaml::to_string(&decision)?)?,
        EvalFormat::Diff => write!(out, "{}", render_diff(&request, &decision)?)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A bare object becomes a CREATE request; an AdmissionReview is used as the API server sent it.
fn request_from(object: Value, namespace: &str) -> Result<PolicyRequest> {
    if object["kind"] == "AdmissionReview" {
        let review = coral::webhook::admission::Review::from_value(object)?;
        return serde_json::from_value(review.request)
            .context("the AdmissionReview request is not valid");
    }
    Ok(PolicyRequest::create(object, namespace)?)
}

pub(super) fn read_input(file: &str) -> Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the object from stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(Path::new(file)).with_context(|| format!("cannot read {file}"))
    }
}

/// What changed, as a unified diff of the object's YAML, then the warnings and denials.
pub(super) fn render_diff(request: &PolicyRequest, decision: &Decision) -> Result<String> {
    let mut out = String::new();
    let target = format!(
        "{} {}/{}",
        request.kind.kind, request.namespace, request.name
    );
    if !decision.allowed {
        out.push_str(&format!("{target}: denied\n"));
    } else if decision.patch.0.is_empty() {
        out.push_str(&format!("{target}: unchanged\n"));
    } else {
        let before = serde_yaml::to_string(&request.object)?;
        let after = serde_yaml::to_string(&decision.object)?;
        let diff = similar::TextDiff::from_lines(&before, &after);
        out.push_str(&format!("{target}: {} change(s)\n", decision.patch.0.len()));
        out.push_str(
            &diff
                .unified_diff()
                .context_radius(3)
                .header("original", "patched")
                .to_string(),
        );
    }
    for warning in &decision.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    for denial in &decision.denials {
        out.push_str(&format!("denied: {denial}\n"));
    }
    Ok(out)
}
