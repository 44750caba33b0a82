//! The relay in a process of its own, as the sidecar runs: so that its memory can be read
//! apart from the scenario's (the raw baseline, the fill, the checks).
//!
//! The bench binary runs itself with the hidden subcommand `relay-process`
//! ([`serve`]), which starts the same relay as [`RunningRelay::start_at`], says `ready` on
//! stdout once it is connected, and runs until its stdin closes: when the scenario stops it
//! ([`RelayProcess::stop`]) or dies. The scenario reads the child's peak resident set
//! (`VmHWM`) from `/proc` before stopping it.

use std::io::Read as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::env::{self, RunningRelay, Source};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "relay-process";

/// What the child prints on stdout once its relay is built (pool and NATS connected) and
/// its task spawned.
const READY: &str = "ready";

/// A relay running in a child process of this binary.
pub struct RelayProcess {
    child: Child,
    /// Held open while the relay should run; closed by [`RelayProcess::stop`].
    stdin: Option<ChildStdin>,
    /// Read to its end by [`RelayProcess::stop`] (the child's final line).
    stdout: Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl RelayProcess {
    /// Starts the child with relay instance `instance` on `source` of the database at
    /// `database_url`, publishing to `nats_url`, and waits up to `deadline` until it says it
    /// is connected. The environment is inherited (`BENCH_*` tuning of
    /// [`env::relay_config`] applies).
    pub async fn start(
        source: Source,
        nats_url: &str,
        database_url: &str,
        instance: &str,
        deadline: Duration,
    ) -> anyhow::Result<RelayProcess> {
        let exe = std::env::current_exe().context("finding the bench binary")?;
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .args(["--source", source.as_str()])
            .args(["--database-url", database_url])
            .args(["--nats-url", nats_url])
            .args(["--instance", instance])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the relay process")?;
        let pid = child.id().context("the relay process has no pid")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the relay process's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(deadline, lines.next_line())
            .await
            .with_context(|| format!("the relay process was not ready within {deadline:?}"))?
            .context("reading the relay process's stdout")?;
        if first.as_deref() != Some(READY) {
            // It may still run (something else printed first): stop it before waiting.
            drop(stdin);
            child.kill().await.ok();
            let status = child
                .wait()
                .await
                .context("waiting for the relay process")?;
            bail!("the relay process did not start ({status}); its error is above");
        }
        Ok(RelayProcess {
            child,
            stdin,
            stdout: lines,
            pid,
        })
    }

    /// Fails if the relay process has exited (it is a zombie until [`RelayProcess::stop`]
    /// reaps it): for the scenario's polls, so that a relay that failed is not waited for.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .context("reading the relay process's state from /proc")?;
        // "<pid> (<comm>) <state> ...": the state follows the last parenthesis.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state == Some('Z') {
            bail!("the relay process exited; its error is above");
        }
        Ok(())
    }

    /// The relay process's resident set now, in MB.
    pub fn rss_mb(&self) -> anyhow::Result<f64> {
        env::rss_mb(self.pid).context("reading the relay process's VmRSS from /proc")
    }

    /// The largest resident set the relay process has had so far, in MB.
    pub fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        env::peak_rss_mb(self.pid).context("reading the relay process's VmHWM from /proc")
    }

    /// Closes its stdin (the signal to stop) and waits up to `deadline` for it to exit
    /// successfully; past the deadline it is killed and this fails.
    pub async fn stop(mut self, deadline: Duration) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let exited = async {
            // Its final line, then EOF.
            while let Ok(Some(_)) = self.stdout.next_line().await {}
            self.child.wait().await
        };
        match tokio::time::timeout(deadline, exited).await {
            Ok(status) => {
                let status = status.context("waiting for the relay process")?;
                if !status.success() {
                    bail!("the relay process failed ({status}); its error is above");
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await.ok();
                bail!("the relay process did not stop within {deadline:?}; killed it")
            }
        }
    }
}

/// The child's side: runs relay `instance` until stdin closes, then stops it (up to a
/// minute). Returns the final line, `relay-process stopped`.
pub async fn serve(
    source: Source,
    nats_url: &str,
    database_url: &str,
    instance: &str,
) -> anyhow::Result<String> {
    let relay =
        RunningRelay::start_at(source, nats_url, database_url, env::relay_config(instance)).await?;
    println!("{READY}");
    // Anything written is ignored; EOF or an error (the parent is gone) stops the relay.
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut stdin = std::io::stdin();
        let mut sink = [0u8; 256];
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    });
    let stdin_closed = async {
        // A panic of the reader thread stops the relay as EOF does.
        stdin_closed.await.ok();
    };
    relay
        .run_until(stdin_closed, Duration::from_secs(60))
        .await?;
    Ok(format!("{SUBCOMMAND} stopped"))
}
