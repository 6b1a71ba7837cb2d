//! The `coral` command line. Every flag has a long name and a `CORAL_…` environment variable.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

mod agent;
mod audit;
mod controller;
mod demo;

use coral::image::{ImageReference, label_key};
use coral::index::StateFile;
use coral::policy::testing::{TestOptions, run_tests};
use coral::policy::{AllowedPaths, Decision, EvaluatorOptions, PolicyRequest, PolicySet, Snapshot};

/// Keeps container images on the nodes that need them, and steers workloads to those nodes.
#[derive(Debug, Parser)]
#[command(name = "coral", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Image references and their node label keys.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print the CustomResourceDefinitions (all of them, as one YAML stream).
    Crd(CrdArgs),
    /// Test and try out policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the admission webhook (HTTPS).
    Webhook(Box<WebhookArgs>),
    /// Run the controller: ImageSet status, cleanup, pull-secret copies, webhook certificates.
    Controller(Box<controller::ControllerArgs>),
    /// Run the node agent: keep the images ImageSets want on this node, and record them.
    Agent(Box<agent::AgentArgs>),
    /// Pull what ImageSets want on a node, once, through the container runtime (no cluster):
    /// for baking node images and for CI.
    Prefetch(Box<agent::PrefetchArgs>),
    /// List workloads whose pod template requires image labels that too few schedulable nodes
    /// satisfy (against a state file and manifests, or the cluster of the kubeconfig); exits 1
    /// when it finds any.
    Audit(Box<audit::AuditArgs>),
    /// Start the webhook on localhost over HTTPS with the embedded policies and an example
    /// cluster state, send it the example workloads, and show what Coral changes and why.
    Demo,
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Print the normalized form and the node label key of each reference.
    Key(ImageKeyArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ImageKeyArgs {
    /// Image references, such as nginx:1.27 or ghcr.io/org/app@sha256:….
    #[arg(required = true, value_name = "REF")]
    references: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text", env = "CORAL_OUTPUT")]
    output: ListFormat,
}

#[derive(Debug, Args)]
struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, value_name = "DIR", env = "CORAL_CRD_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run the test_* rules of every *_test.rego file under the paths, like `opa test`.
    Test(PolicyTestArgs),
    /// Show what the policies do to one object against a cluster-state file.
    Eval(PolicyEvalArgs),
}

#[derive(Debug, Args)]
struct PolicyTestArgs {
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
enum EvalFormat {
    Json,
    Yaml,
    Diff,
}

#[derive(Debug, Args)]
struct PolicyEvalArgs {
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
struct EvaluationArgs {
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
    fn options(self) -> Result<EvaluatorOptions> {
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

#[derive(Debug, Args)]
struct WebhookArgs {
    /// HTTPS address of /mutate and /validate/imagesets.
    #[arg(long, default_value = "0.0.0.0:8443", env = "CORAL_LISTEN")]
    listen: std::net::SocketAddr,
    /// PEM certificate chain; reloaded when the file changes.
    #[arg(long, value_name = "FILE", env = "CORAL_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key (ECDSA, Ed25519 or RSA); reloaded when the file changes.
    #[arg(long, value_name = "FILE", env = "CORAL_TLS_KEY")]
    tls_key: PathBuf,
    /// Plain-HTTP address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CORAL_PROBE_LISTEN")]
    probe_listen: std::net::SocketAddr,
    /// What to answer when no decision can be made: allow (unchanged, with a warning) or deny.
    #[arg(long, value_enum, default_value = "allow", env = "CORAL_FAILURE_MODE")]
    failure_mode: coral::webhook::FailureMode,
    /// Serve from a cluster-state file instead of a cluster (for local policy work and demos).
    #[arg(long, env = "CORAL_STANDALONE")]
    standalone: bool,
    /// With --standalone: the cluster-state file (the format of `coral policy eval --state`);
    /// reloaded when it changes.
    #[arg(long, value_name = "STATE.yaml", env = "CORAL_STATE")]
    state: Option<PathBuf>,
    /// With --standalone: a policy directory or ConfigMap manifest, reloaded when it changes.
    /// Default: the embedded policies.
    #[arg(long, value_name = "DIR|FILE", env = "CORAL_POLICIES")]
    policies: Option<PathBuf>,
    /// In a cluster: the ConfigMap whose policies replace the embedded ones, watched and
    /// reloaded; a version that does not compile is rejected and the last good one serves.
    #[arg(long, value_name = "NAMESPACE/NAME", env = "CORAL_POLICIES_CONFIGMAP")]
    policies_configmap: Option<coral::webhook::ObjectName>,
    /// In a cluster: quiet period after a change before the policy data is rebuilt.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "500",
        env = "CORAL_DEBOUNCE_MS"
    )]
    debounce_ms: u64,
    /// In a cluster: this replica's name in the Events it records. Default: the host name.
    #[arg(long, env = "CORAL_POD_NAME")]
    pod_name: Option<String>,
    #[command(flatten)]
    evaluation: EvaluationArgs,
    /// Largest request body accepted (larger ones get HTTP 413).
    #[arg(
        long,
        value_name = "BYTES",
        default_value = "3145728",
        env = "CORAL_MAX_BODY_BYTES"
    )]
    max_body_bytes: usize,
    /// Time a client has to send its request headers and body.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "5000",
        env = "CORAL_REQUEST_TIMEOUT_MS"
    )]
    request_timeout_ms: u64,
    /// Decisions evaluated at once. Default: the number of CPUs.
    #[arg(long, env = "CORAL_WORKERS")]
    workers: Option<usize>,
    /// Memory for decisions already made: a request that differs from a decided one only in
    /// its uid (a ReplicaSet's Pods, a reinvocation) is answered from it until the cluster
    /// state or the policies change. 0 turns the cache off.
    #[arg(
        long,
        value_name = "MIB",
        default_value = "8",
        env = "CORAL_DECISION_CACHE_MIB"
    )]
    decision_cache_mib: usize,
    /// How often certificate, state and policy files are checked for changes.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "2000",
        env = "CORAL_POLL_INTERVAL_MS"
    )]
    poll_interval_ms: u64,
    /// After SIGTERM, how long in-flight requests may take to finish.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "30",
        env = "CORAL_SHUTDOWN_GRACE_SECONDS"
    )]
    shutdown_grace_seconds: u64,
}

fn webhook(args: WebhookArgs) -> Result<ExitCode> {
    let WebhookArgs {
        listen,
        tls_cert,
        tls_key,
        probe_listen,
        failure_mode,
        standalone,
        state,
        policies,
        policies_configmap,
        debounce_ms,
        pod_name,
        evaluation,
        max_body_bytes,
        request_timeout_ms,
        workers,
        decision_cache_mib,
        poll_interval_ms,
        shutdown_grace_seconds,
    } = args;
    let source = if standalone {
        let Some(state) = state else {
            bail!("--standalone needs --state FILE (the format of `coral policy eval --state`)");
        };
        if policies_configmap.is_some() {
            bail!(
                "--policies-configmap reads from a cluster; with --standalone use --policies DIR|FILE"
            );
        }
        coral::webhook::Source::Files(coral::webhook::SnapshotSource { state, policies })
    } else {
        if state.is_some() || policies.is_some() {
            bail!(
                "--state and --policies are for --standalone; in a cluster the state comes from \
                 watches and the policies from --policies-configmap"
            );
        }
        coral::webhook::Source::Cluster(coral::webhook::ClusterOptions {
            policies_configmap,
            debounce: Duration::from_millis(debounce_ms),
            instance: pod_name.unwrap_or_else(host_name),
        })
    };
    init_logging();
    let options = coral::webhook::WebhookOptions {
        listen,
        tls_cert,
        tls_key,
        probe_listen,
        failure_mode,
        source,
        evaluator: EvaluatorOptions {
            decision_cache_bytes: decision_cache_mib.saturating_mul(1 << 20),
            ..evaluation.options()?
        },
        max_body_bytes,
        request_timeout: Duration::from_millis(request_timeout_ms),
        workers: workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        }),
        poll_interval: Duration::from_millis(poll_interval_ms.max(100)),
        shutdown_grace: Duration::from_secs(shutdown_grace_seconds),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(coral::webhook::run(options))?;
    Ok(ExitCode::SUCCESS)
}

/// The host name (a pod's name in Kubernetes), or `coral` when it cannot be read.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "coral".to_string())
}

/// Logs to stderr; `CORAL_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr with `default` as the filter unless `CORAL_LOG` (or `RUST_LOG`) sets one.
fn init_logging_with(default: &str) {
    let filter = std::env::var("CORAL_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

impl Cli {
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            Command::Image(ImageCommand::Key(args)) => image_key(args),
            Command::Crd(args) => crd(args),
            Command::Policy(PolicyCommand::Test(args)) => policy_test(args),
            Command::Policy(PolicyCommand::Eval(args)) => policy_eval(args),
            Command::Demo => demo::run(),
            Command::Audit(args) => audit::run(*args),
            Command::Webhook(args) => webhook(*args),
            Command::Prefetch(args) => agent::run_prefetch(*args),
            Command::Agent(args) => agent::run_agent(*args),
            Command::Controller(args) => controller::run_controller(*args),
            Command::Version => {
                println!("coral {}", env!("CARGO_PKG_VERSION"));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn image_key(args: ImageKeyArgs) -> Result<ExitCode> {
    let ImageKeyArgs { references, output } = args;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for reference in &references {
        match ImageReference::parse(reference) {
            Ok(parsed) => rows.push((reference, parsed.to_string(), label_key(&parsed))),
            Err(error) => errors.push(error),
        }
    }
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("error: {error}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let mut out = std::io::stdout().lock();
    match output {
        ListFormat::Text => {
            for (_, normalized, label) in &rows {
                writeln!(out, "{normalized}\t{label}")?;
            }
        }
        ListFormat::Json => {
            let array: Vec<Value> = rows
                .iter()
                .map(|(reference, normalized, label)| {
                    json!({"reference": reference, "normalized": normalized, "label": label})
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn crd(args: CrdArgs) -> Result<ExitCode> {
    let CrdArgs { output_dir } = args;
    match output_dir {
        Some(dir) => {
            for path in coral::api::write_crds(&dir)? {
                eprintln!("wrote {}", path.display());
            }
        }
        None => print!("{}", coral::api::crd_stream()?),
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_test(args: PolicyTestArgs) -> Result<ExitCode> {
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

fn policy_eval(args: PolicyEvalArgs) -> Result<ExitCode> {
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

fn read_input(file: &str) -> Result<String> {
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
pub fn render_diff(request: &PolicyRequest, decision: &Decision) -> Result<String> {
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
