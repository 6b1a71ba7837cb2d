//! A real BuildKit for the tests: `buildkitd` with its runc worker and `buildctl`, built from
//! their Go modules by `scripts/buildkit.sh` (the directory of the binaries in
//! `CORAL_BUILDKIT_BIN`), run as root on a socket of its own in a temp directory, killed and
//! waited for on drop with what it mounted, only in the tests' own network namespace (as the real
//! nodes: `tests/support/node.rs`). Nothing is pulled from the internet: the
//! Dockerfiles it builds take their bases as build arguments, and the tests give it bases made
//! on the machine, in registries on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/buildkit.sh` put the binaries, when it ran.
pub const BIN_ENV: &str = "CORAL_BUILDKIT_BIN";

pub struct BuildKit {
    child: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl BuildKit {
    /// The directory of the binaries, or `None` when BuildKit was not built.
    pub fn binaries() -> Option<PathBuf> {
        std::env::var_os(BIN_ENV)
            .filter(|bin| !bin.is_empty())
            .map(PathBuf::from)
    }

    /// Starts buildkitd, which speaks plain HTTP to the registries `plain_http` (`host:port`),
    /// and waits until its worker answers.
    pub fn start(bin: &Path, plain_http: &[&str]) -> Self {
        // Like the nodes, only in a network namespace with no route off the machine.
        crate::support::control_plane::assert_isolated();
        let dir = tempfile::Builder::new()
            .prefix("buildkit")
            .tempdir()
            .unwrap();
        let mut config = format!(
            "root = {root:?}\n[grpc]\n  address = [{address:?}]\n[otel]\n  socketPath = {otel:?}\n[worker.oci]\n  enabled = true\n  snapshotter = \"native\"\n  gc = false\n[worker.containerd]\n  enabled = false\n",
            root = dir.path().join("root").display().to_string(),
            address = format!("unix://{}", dir.path().join("buildkitd.sock").display()),
            // Its trace socket too, which would otherwise go to /run/buildkit.
            otel = dir.path().join("otel-grpc.sock").display().to_string(),
        );
        for host in plain_http {
            config.push_str(&format!(
                "[registry.{host:?}]\n  http = true\n  insecure = true\n"
            ));
        }
        std::fs::write(dir.path().join("buildkitd.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("buildkitd.log")).unwrap();
        let child = Command::new(bin.join("buildkitd"))
            .arg("--config")
            .arg(dir.path().join("buildkitd.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("buildkitd starts");
        let mut buildkit = Self {
            child: Some(child),
            bin: bin.to_path_buf(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let workers = buildkit.buildctl(&["debug", "workers"]);
            if workers.status.success()
                && String::from_utf8_lossy(&workers.stdout).lines().count() > 1
            {
                break;
            }
            if let Some(status) = buildkit
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("buildkitd exited ({status}):\n{}", buildkit.log());
            }
            assert!(
                Instant::now() < deadline,
                "buildkitd has no worker:\n{}",
                buildkit.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        buildkit
    }

    /// `buildctl` against this daemon.
    pub fn buildctl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("buildctl"))
            .arg("--addr")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("buildkitd.sock").display()
            ))
            .args(args)
            .output()
            .expect("buildctl runs")
    }

    /// The end of buildkitd's log.
    pub fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("buildkitd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Builds the repository's Dockerfile at `target`, with `build_args` and the named
    /// contexts `contexts` (name, directory), and pushes the image as `reference` (a
    /// registry it speaks plain HTTP to). Panics with buildctl's output when it fails.
    pub fn build_dockerfile(
        &self,
        target: &str,
        build_args: &[(&str, &str)],
        contexts: &[(&str, &Path)],
        reference: &str,
    ) -> String {
        let mut args: Vec<String> = [
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            "context=.",
            "--local",
            "dockerfile=.",
            "--progress",
            "plain",
        ]
        .map(String::from)
        .to_vec();
        args.push("--opt".into());
        args.push(format!("target={target}"));
        for (name, value) in build_args {
            args.push("--opt".into());
            args.push(format!("build-arg:{name}={value}"));
        }
        for (name, dir) in contexts {
            args.push("--local".into());
            args.push(format!("{name}={}", dir.display()));
            args.push("--opt".into());
            args.push(format!("context:{name}=local:{name}"));
        }
        args.push("--output".into());
        args.push(format!(
            "type=image,name={reference},push=true,registry.insecure=true"
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.buildctl(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "buildctl {}:\n{text}\n{}",
            args.join(" "),
            self.log()
        );
        text
    }
}

impl Drop for BuildKit {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its snapshots may still be mounted.
        let dir = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(dir.as_str()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
    }
}
