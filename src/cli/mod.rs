//! The `coral` command line. Every flag has a long name and a `CORAL_…` environment variable.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

mod agent;
mod audit;
mod controller;
mod crd;
mod demo;
mod image;
mod inspect;
mod mirror;
mod policy;
mod webhook;

use image::ImageCommand;
use policy::PolicyCommand;

/// `--policies-configmap` of the commands that read a cluster's policies or settings.
#[derive(Debug, clap::Args)]
pub(super) struct PoliciesConfigMapArg {
    /// In a cluster: the policy ConfigMap the webhook serves (its policies and settings.json;
    /// absent: the embedded policies and the default settings).
    #[arg(
        long = "policies-configmap",
        value_name = "NAMESPACE/NAME",
        default_value = "coral-system/coral-policies",
        env = "CORAL_POLICIES_CONFIGMAP"
    )]
    pub(super) name: coral::webhook::ObjectName,
}

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
    Crd(crd::CrdArgs),
    /// Test and try out policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the admission webhook (HTTPS).
    Webhook(Box<webhook::WebhookArgs>),
    /// Run the controller: ImageSet status, cleanup, pull-secret copies, webhook certificates.
    Controller(Box<controller::ControllerArgs>),
    /// Run the node agent: keep the images ImageSets want on this node, and record them.
    Agent(Box<agent::AgentArgs>),
    /// Pull what ImageSets want on a node, once, through the container runtime (no cluster):
    /// for baking node images and for CI.
    Prefetch(Box<agent::PrefetchArgs>),
    /// Copy the images ImageSets name into a registry, once (no cluster): for air-gapped
    /// preparation and CI. Exits 1 unless every image is mirrored.
    Mirror(Box<mirror::MirrorArgs>),
    /// List workloads whose pod template requires image labels that too few schedulable nodes
    /// satisfy (against a state file and manifests, or the cluster of the kubeconfig); exits 1
    /// when it finds any.
    Audit(Box<audit::AuditArgs>),
    /// ImageSets of the cluster, their readiness and, per image, the nodes holding it.
    Status(inspect::StatusArgs),
    /// What the live policies would change on a live Pod or workload against the live state,
    /// why, and what the cluster knows of each of its images.
    Why(inspect::WhyArgs),
    /// Which nodes hold an image, which pull it, and why pulls failed.
    Nodes(inspect::NodesArgs),
    /// Start the webhook on localhost over HTTPS with the embedded policies and an example
    /// cluster state, send it the example workloads, and show what Coral changes and why.
    Demo,
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ListFormat {
    Text,
    Json,
}

/// The host name (a pod's name in Kubernetes), or `coral` when it cannot be read.
pub(super) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "coral".to_string())
}

/// Logs to stderr; `CORAL_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
pub(super) fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr with `default` as the filter unless `CORAL_LOG` (or `RUST_LOG`) sets one.
pub(super) fn init_logging_with(default: &str) {
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
            Command::Image(ImageCommand::Key(args)) => image::image_key(args),
            Command::Crd(args) => crd::crd(args),
            Command::Policy(PolicyCommand::Test(args)) => policy::policy_test(args),
            Command::Policy(PolicyCommand::Eval(args)) => policy::policy_eval(args),
            Command::Status(args) => inspect::status(args),
            Command::Why(args) => inspect::why(args),
            Command::Nodes(args) => inspect::nodes(args),
            Command::Demo => demo::run(),
            Command::Audit(args) => audit::run(*args),
            Command::Webhook(args) => webhook::webhook(*args),
            Command::Prefetch(args) => agent::run_prefetch(*args),
            Command::Mirror(args) => mirror::run(*args),
            Command::Agent(args) => agent::run_agent(*args),
            Command::Controller(args) => controller::run_controller(*args),
            Command::Version => {
                println!("coral {}", env!("CARGO_PKG_VERSION"));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}
