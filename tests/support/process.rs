//! Processes the tests and benchmarks start: killed and waited for, and measured.

/// A process killed and waited for when dropped, even when the test fails.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process is running")
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A long-running `coral` process of a test (agent, controller): started with
/// `--probe-listen 127.0.0.1:0`, its probe address read from its log (so no port is chosen
/// ahead and taken meanwhile by another socket), its log kept. Killed and waited for when
/// dropped; when dropped by a failing test, the end of its log is printed.
pub struct Daemon {
    child: std::process::Child,
    /// Where its probes and metrics answer.
    pub probes: std::net::SocketAddr,
    name: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `command` (a `coral` subcommand with its arguments), named `name` in messages.
    pub fn spawn(name: &str, mut command: std::process::Command) -> Self {
        use std::io::BufRead as _;
        let mut child = command
            .args(["--probe-listen", "127.0.0.1:0"])
            .env("CORAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (found, address) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("probe server listening")
                    && let Some(sender) = found.take()
                {
                    let address = line.rsplit("address=").next().unwrap_or_default();
                    let _ = sender.send(address.trim().to_string());
                }
                lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        });
        let mut daemon = Self {
            child,
            probes: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            name: name.to_string(),
            log,
        };
        match address.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(text) => {
                daemon.probes = text
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}: probe address {text:?}: {e}"));
            }
            Err(_) => panic!(
                "{name} never listened for its probes:\n{}",
                daemon.log_tail(80)
            ),
        }
        daemon
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        log[log.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- the end of the log of {} ---\n{}\n---",
                self.name,
                self.log_tail(80)
            );
        }
    }
}
