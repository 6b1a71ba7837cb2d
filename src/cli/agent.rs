//! `coral prefetch` and `coral agent`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use coral::agent::cri::DEFAULT_CRI_SOCKET;
use coral::agent::engine::EngineOptions;
use coral::agent::prefetch::{PrefetchOptions, prefetch};
use coral::agent::retention::RetentionPolicy;
use coral::agent::tracker::RetryPolicy;
use coral::time::parse_duration;

/// How images are pulled: shared by the agent and `coral prefetch`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The container runtime's CRI socket (containerd; CRI-O: unix:///var/run/crio/crio.sock).
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CRI_SOCKET, env = "CORAL_CRI_SOCKET")]
    pub cri_socket: String,
    /// Pulls running at once.
    #[arg(
        long,
        value_name = "N",
        default_value = "2",
        env = "CORAL_MAX_CONCURRENT_PULLS"
    )]
    max_concurrent_pulls: usize,
    /// Delay after a first failed pull; doubled after each further failure (with jitter).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, env = "CORAL_INITIAL_BACKOFF")]
    initial_backoff: Duration,
    /// Longest delay between pulls of one image, and the delay between retries of a failed one.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration, env = "CORAL_MAX_BACKOFF")]
    max_backoff: Duration,
    /// Failed pulls after which an image is `failed` (then retried every --max-backoff).
    #[arg(
        long,
        value_name = "N",
        default_value = "5",
        env = "CORAL_MAX_ATTEMPTS"
    )]
    max_attempts: u32,
    /// No new pulls while the image filesystem uses more than this (bytes, or with a suffix:
    /// 500Mi, 40Gi, 1Ti, 50G).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, env = "CORAL_IMAGE_FS_BUDGET")]
    image_fs_budget: Option<u64>,
}

impl PullArgs {
    pub fn engine_options(&self, resync: Duration) -> EngineOptions {
        EngineOptions {
            max_concurrent_pulls: self.max_concurrent_pulls.max(1),
            retry: RetryPolicy {
                initial: self.initial_backoff,
                max: self.max_backoff.max(self.initial_backoff),
                max_attempts: self.max_attempts.max(1),
            },
            resync,
            image_fs_budget: self.image_fs_budget,
            pin_images: false,
        }
    }
}

/// Parses a byte size: a number, optionally with K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti
/// (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let invalid = || format!("{text:?} is not a size (examples: 1073741824, 500Mi, 40Gi, 50G)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let value: u64 = text[..split].parse().map_err(|_| invalid())?;
    let factor: u64 = match &text[split..] {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(invalid()),
    };
    value.checked_mul(factor).ok_or_else(invalid)
}

/// Parses `k=v,k2=v2`.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{pair:?} has an empty key"));
            }
            Ok((key.to_string(), value.trim().to_string()))
        })
        .collect()
}

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// ImageSet manifests (YAML; several documents per file allowed).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        required = true,
        env = "CORAL_FILENAME",
        value_delimiter = ','
    )]
    files: Vec<PathBuf>,
    /// Labels of the node being prepared (k=v,k2=v2); ImageSets whose selector matches them
    /// are pulled. Without labels, the ImageSets with an empty selector are.
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels, env = "CORAL_NODE_LABELS")]
    node_labels: Option<BTreeMap<String, String>>,
    /// Registry credentials: a Docker `config.json` ({"auths": {...}}).
    #[arg(long, value_name = "FILE", env = "CORAL_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    #[command(flatten)]
    pull: PullArgs,
}

pub fn run_prefetch(args: PrefetchArgs) -> Result<ExitCode> {
    // Progress goes to stdout; the log only carries what it cannot show.
    super::init_logging_with("error");
    let options = PrefetchOptions {
        files: args.files,
        cri_socket: args.pull.cri_socket.clone(),
        node_labels: args.node_labels.unwrap_or_default(),
        docker_config: args.docker_config,
        engine: args.pull.engine_options(Duration::from_secs(60)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut stdout = std::io::stdout();
    let all = runtime.block_on(prefetch(options, &mut stdout))?;
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, value_name = "NAME", env = "CORAL_NODE_NAME")]
    node_name: String,
    /// Coral's namespace, where the controller keeps copies of the pull secrets.
    #[arg(
        long,
        value_name = "NAMESPACE",
        default_value = "coral-system",
        env = "CORAL_NAMESPACE"
    )]
    coral_namespace: String,
    #[command(flatten)]
    pull: PullArgs,
    /// How long an image that no ImageSet wants any more stays on the node before the agent
    /// removes it (never while a container uses it, or a wanted image shares its content).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration, env = "CORAL_UNWANTED_GRACE")]
    unwanted_grace: Duration,
    /// Never remove unwanted images after their grace period (the watermarks still apply).
    #[arg(long, env = "CORAL_KEEP_UNWANTED")]
    keep_unwanted: bool,
    /// The same as --unwanted-grace=0s.
    #[arg(long, hide = true, conflicts_with_all = ["unwanted_grace", "keep_unwanted"])]
    remove_unwanted: bool,
    /// While the image filesystem uses more than this (bytes: 40Gi, 50G), unwanted images go
    /// before their grace period ends, the least recently wanted first.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, env = "CORAL_IMAGE_FS_HIGH_WATERMARK")]
    image_fs_high_watermark: Option<u64>,
    /// ...until it uses at most this. Default: 80 % of the high watermark.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, requires = "image_fs_high_watermark", env = "CORAL_IMAGE_FS_LOW_WATERMARK")]
    image_fs_low_watermark: Option<u64>,
    /// Pull from the source only. By default a public image that an ImageSet mirrors, once its
    /// copy is `mirrored`, is pulled from the mirror first (with the runtime's own credentials
    /// for it, as pods pull), then from the source, which then only sends its manifest.
    #[arg(long, env = "CORAL_SKIP_MIRROR")]
    skip_mirror: bool,
    /// Leave the images unpinned. By default each wanted image is labelled
    /// `io.cri-containerd.pinned=pinned` through containerd's images service (containerd 1.7
    /// and later then report it pinned, and the kubelet's image garbage collection skips it);
    /// unwanted images lose the label. A runtime without that service (CRI-O) is left alone.
    #[arg(long, env = "CORAL_SKIP_PIN")]
    skip_pin: bool,
    /// Plain-HTTP address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CORAL_PROBE_LISTEN")]
    probe_listen: std::net::SocketAddr,
    /// How often the runtime's images are listed and pull secrets read again when nothing
    /// else happens.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, env = "CORAL_RESYNC")]
    resync: Duration,
    /// Quiet period that coalesces changes into one write.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration, env = "CORAL_DEBOUNCE")]
    debounce: Duration,
}

/// The retention policy the flags describe.
fn retention(args: &AgentArgs) -> Result<RetentionPolicy> {
    let high = args.image_fs_high_watermark;
    let low = match (high, args.image_fs_low_watermark) {
        (Some(high), Some(low)) if low > high => anyhow::bail!(
            "--image-fs-low-watermark ({low} bytes) is above --image-fs-high-watermark ({high} bytes)"
        ),
        (Some(high), None) => Some(high / 5 * 4),
        (_, low) => low,
    };
    let grace = if args.remove_unwanted {
        Some(Duration::ZERO)
    } else if args.keep_unwanted {
        None
    } else {
        Some(args.unwanted_grace)
    };
    Ok(RetentionPolicy {
        grace,
        high_watermark: high,
        low_watermark: low,
    })
}

pub fn run_agent(args: AgentArgs) -> Result<ExitCode> {
    super::init_logging();
    let retention = retention(&args)?;
    let options = coral::agent::node::AgentOptions {
        node_name: args.node_name,
        coral_namespace: args.coral_namespace,
        cri_socket: args.pull.cri_socket.clone(),
        engine: EngineOptions {
            pin_images: !args.skip_pin,
            ..args.pull.engine_options(args.resync)
        },
        retention,
        pull_through_mirror: !args.skip_mirror,
        probe_listen: args.probe_listen,
        debounce: args.debounce,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(coral::agent::node::run(options))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_labels_parse() {
        assert_eq!(parse_bytes("40Gi"), Ok(40 << 30));
        assert_eq!(parse_bytes("50G"), Ok(50_000_000_000));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert!(parse_bytes("1.5Gi").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("99999999999Ti").is_err());
        assert_eq!(
            parse_labels("pool=web, zone=a"),
            Ok(BTreeMap::from([
                ("pool".to_string(), "web".to_string()),
                ("zone".to_string(), "a".to_string())
            ]))
        );
        assert!(parse_labels("pool").is_err());
        assert!(parse_labels("=x").is_err());
    }
}
