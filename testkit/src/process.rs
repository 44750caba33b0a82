//! [`Process`]: any program as a controllable child (a service, a relay), for end-to-end and
//! chaos runs that need to SIGKILL, SIGTERM, pause and restart it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::Result;
use crate::server_process::{ServerProcess, Spec};
use crate::sys;

/// How to start a [`Process`].
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Name used in errors and logs, e.g. `"order-service"`.
    pub name: &'static str,
    /// The program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Environment variables added to the inherited environment.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// stdout and stderr are appended here, across restarts.
    pub log: PathBuf,
}

/// A child process in its own process group (ctrl-c in the terminal does not reach it), its
/// output appended to a log file, SIGKILLed with its descendants on drop after a SIGTERM and
/// 5 s of grace, and SIGKILLed by the kernel if this process dies.
pub struct Process {
    inner: ServerProcess,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.inner.pid().ok())
            .finish()
    }
}

impl Process {
    /// Starts `spec`'s program.
    pub fn spawn(spec: ProcessSpec) -> Result<Process> {
        let inner = ServerProcess::spawn(Spec {
            server: spec.name,
            program: spec.program,
            args: spec.args,
            cwd: spec.cwd,
            log: spec.log,
            run_as: None,
            env: spec.env,
            drop_signal: sys::SIGTERM,
        })?;
        Ok(Process { inner })
    }

    /// The pid, or [`crate::Error::NotRunning`] after a kill or stop.
    pub fn pid(&self) -> Result<u32> {
        self.inner.pid()
    }

    /// Whether it holds a socket listening on TCP `port` (from `/proc`): tells a server
    /// that bound its port from one that failed to because another process got the port
    /// first (a [`crate::free_port`] handed out twice) while that other answers on it.
    pub fn listens_on(&self, port: u16) -> bool {
        self.pid()
            .is_ok_and(|pid| crate::listening::listens_on(pid, port))
    }

    /// The exit status once it has exited, `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.inner.exit_status()
    }

    /// True while it runs (also while paused).
    pub fn is_running(&mut self) -> bool {
        self.inner.is_running()
    }

    /// SIGKILLs it and its descendants and waits until they are gone.
    pub fn kill(&mut self) -> Result<()> {
        self.inner.kill()
    }

    /// SIGTERM, then waits until it exits; SIGKILLs it after `deadline` (and says so).
    pub async fn terminate(&mut self, deadline: Duration) -> Result<()> {
        self.inner.stop(sys::SIGTERM, deadline).await
    }

    /// SIGTERM, then waits until it exits, like [`Process::terminate`], and returns how it
    /// exited (for a test of a clean shutdown). SIGKILLs it after `deadline` and says so.
    pub async fn terminate_with_status(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let pid = self.inner.pid()?;
        let _ = self.inner.resume();
        sys::signal(pid, sys::SIGTERM, false)
            .map_err(crate::Error::io(format!("sending SIGTERM to {pid}")))?;
        let mut status = None;
        let waited = crate::wait_until(
            deadline,
            &format!("process {pid} to exit after SIGTERM"),
            || {
                status = status.or_else(|| self.inner.exit_status());
                std::future::ready(status.is_some())
            },
        )
        .await;
        match (status, waited) {
            (Some(status), _) => Ok(status),
            (None, Err(timeout)) => {
                self.inner.kill()?;
                Err(timeout)
            }
            (None, Ok(())) => unreachable!("wait_until returns Ok once the condition holds"),
        }
    }

    /// SIGINT (what ctrl-c sends), then waits like [`Process::terminate`].
    pub async fn interrupt(&mut self, deadline: Duration) -> Result<()> {
        self.inner.stop(sys::SIGINT, deadline).await
    }

    /// Freezes it (SIGSTOP to it and its descendants).
    pub fn pause(&self) -> Result<()> {
        self.inner.pause()
    }

    /// Continues a paused process.
    pub fn resume(&self) -> Result<()> {
        self.inner.resume()
    }

    /// Starts it again with the same program, arguments, environment and log.
    pub fn restart(&mut self) -> Result<()> {
        self.inner.respawn()
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        self.inner.log_tail()
    }
}
