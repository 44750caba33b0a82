//! One server child process: spawned into its own process group (so terminal signals such as
//! ctrl-c do not reach it) with its output appended to a log file; paused, stopped and killed
//! together with its descendants, which it finds through `/proc`; killed on drop.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::sys;
use crate::{Error, Result};

/// How long SIGKILLed processes may take to disappear.
const KILL_DEADLINE: Duration = Duration::from_secs(10);
/// How long a SIGSTOPped process may take to be reported stopped.
const FREEZE_DEADLINE: Duration = Duration::from_secs(5);
/// How long the graceful signal sent on drop gets before everything is SIGKILLed.
const DROP_GRACE: Duration = Duration::from_secs(5);
/// How many lines of the server log go into error messages.
const LOG_TAIL_LINES: usize = 30;

/// An unprivileged user to run a server as (PostgreSQL refuses to run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl RunAs {
    /// `None` unless we are root; then the `postgres` user if it exists, else `nobody`.
    pub(crate) fn unprivileged() -> Option<RunAs> {
        if sys::euid() != 0 {
            return None;
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        Some(
            lookup_user(&passwd, "postgres")
                .or_else(|| lookup_user(&passwd, "nobody"))
                .unwrap_or(RunAs {
                    uid: 65534,
                    gid: 65534,
                }),
        )
    }

    /// Gives `path` to this user.
    pub(crate) fn chown(self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(Error::io(format!("chown {}", path.display())))
    }
}

/// Finds `name` in the text of an `/etc/passwd` file.
fn lookup_user(passwd: &str, name: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(RunAs { uid, gid })
    })
}

/// How to (re)start a server process.
pub(crate) struct Spec {
    /// Name used in errors: `"postgres"` or `"nats-server"`.
    pub(crate) server: &'static str,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) cwd: PathBuf,
    /// stdout and stderr are appended here, across restarts.
    pub(crate) log: PathBuf,
    pub(crate) run_as: Option<RunAs>,
    /// Extra environment variables.
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Sent to the leader on drop before the tree is SIGKILLed; `SIGKILL` means no grace.
    /// PostgreSQL gets SIGQUIT so the postmaster reaps its own backends.
    pub(crate) drop_signal: i32,
}

/// A running (or killed/stopped) server process, the leader of its own process group.
pub(crate) struct ServerProcess {
    spec: Spec,
    child: Option<Child>,
}

impl ServerProcess {
    /// Spawns the process described by `spec`.
    pub(crate) fn spawn(spec: Spec) -> Result<Self> {
        let mut process = ServerProcess { spec, child: None };
        process.respawn()?;
        Ok(process)
    }

    /// Starts the process again with the same program, arguments and log file.
    pub(crate) fn respawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            // Callers stop the server first; never lose track of a running one.
            let _ = self.kill();
        }
        let spec = &self.spec;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(Error::io(format!("opening {}", spec.log.display())))?;
        let stdout = log
            .try_clone()
            .map_err(Error::io(format!("opening {}", spec.log.display())))?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .process_group(0);
        if let Some(RunAs { uid, gid }) = spec.run_as {
            cmd.uid(uid).gid(gid);
        }
        let child = sys::spawn_tied(cmd)
            .map_err(Error::io(format!("starting {}", spec.program.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// The leader's pid, or `NotRunning` after kill/stop.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child.as_ref().map(Child::id).ok_or(Error::NotRunning {
            server: self.spec.server,
        })
    }

    /// The exit status if the leader has exited (it is reaped); `None` while it runs or when
    /// there is no leader.
    ///
    /// An exited leader is forgotten at once: holding a `Child` therefore means its pid has not
    /// been reaped and cannot have been reused, so signalling it is safe.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// True while the leader runs (also when paused).
    pub(crate) fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exit_status().is_none()
    }

    /// Freezes the server: SIGSTOP to the leader, then (once it is stopped and so cannot fork)
    /// to all its descendants. PostgreSQL backends call `setsid()`, so a process-group signal
    /// would miss them; the tree is found through `/proc`.
    pub(crate) fn pause(&self) -> Result<()> {
        let pid = self.pid()?;
        self.freeze(pid)?;
        for process in descendants(pid) {
            let _ = sys::signal(process.pid, sys::SIGSTOP, false);
        }
        Ok(())
    }

    /// Continues a frozen server: SIGCONT to the descendants, then the leader.
    pub(crate) fn resume(&self) -> Result<()> {
        let pid = self.pid()?;
        for process in descendants(pid) {
            let _ = sys::signal(process.pid, sys::SIGCONT, false);
        }
        sys::signal(pid, sys::SIGCONT, false).map_err(Error::io(format!(
            "sending SIGCONT to {} {pid}",
            self.spec.server
        )))
    }

    /// SIGKILLs the leader and all its descendants, reaps the leader and waits until every
    /// one of them is gone (re-parented descendants are reaped, see [`sys::spawn_tied`]).
    pub(crate) fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().ok_or(Error::NotRunning {
            server: self.spec.server,
        })?;
        let pid = child.id();
        // A frozen leader cannot fork while we list and kill its descendants.
        let _ = self.freeze(pid);
        let tree = descendants(pid);
        let _ = sys::signal(pid, sys::SIGKILL, false);
        let _ = sys::signal(pid, sys::SIGKILL, true);
        for process in &tree {
            let _ = sys::signal(process.pid, sys::SIGKILL, false);
        }
        let _ = child.wait();
        let deadline = Instant::now() + KILL_DEADLINE;
        while tree.iter().any(ProcEntry::is_alive) {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("{} processes to exit after SIGKILL", self.spec.server),
                    waited: KILL_DEADLINE,
                    last_error: None,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Sends `sig` to the leader (after resuming a paused server, which could not react
    /// otherwise) and waits until it has exited; both servers exit only after their own
    /// children (PostgreSQL's postmaster waits for its backends). SIGKILLs everything after
    /// `deadline`.
    pub(crate) async fn stop(&mut self, sig: i32, deadline: Duration) -> Result<()> {
        let pid = self.pid()?;
        let _ = self.resume();
        let _ = sys::signal(pid, sig, false);
        let start = tokio::time::Instant::now();
        loop {
            if self.exit_status().is_some() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                self.kill()?;
                return Err(Error::Timeout {
                    what: format!("{} to exit after signal {sig}", self.spec.server),
                    waited: deadline,
                    last_error: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGSTOPs `pid` and waits (bounded) until the kernel reports it stopped.
    fn freeze(&self, pid: u32) -> Result<()> {
        sys::signal(pid, sys::SIGSTOP, false).map_err(Error::io(format!(
            "sending SIGSTOP to {} {pid}",
            self.spec.server
        )))?;
        let deadline = Instant::now() + FREEZE_DEADLINE;
        while Instant::now() < deadline {
            match ProcEntry::read(pid) {
                Some(entry) if entry.state == 'T' || entry.state == 'Z' => return Ok(()),
                None => return Ok(()),
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        Err(Error::Timeout {
            what: format!("{} {pid} to stop after SIGSTOP", self.spec.server),
            waited: FREEZE_DEADLINE,
            last_error: None,
        })
    }

    /// The error for a leader that exited while we waited for readiness.
    pub(crate) fn exited_error(&mut self) -> Option<Error> {
        let status = self.exit_status()?;
        Some(Error::Exited {
            server: self.spec.server,
            status: status.to_string(),
            log_tail: self.log_tail(),
        })
    }

    /// The error for a server that did not get ready within `waited`.
    pub(crate) fn not_ready_error(&self, waited: Duration) -> Error {
        Error::NotReady {
            server: self.spec.server,
            waited,
            log_tail: self.log_tail(),
        }
    }

    /// The last lines of the server log.
    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read(&self.spec.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let Ok(pid) = self.pid() else { return };
        if self.spec.drop_signal != sys::SIGKILL && self.is_running() {
            let _ = self.resume();
            let _ = sys::signal(pid, self.spec.drop_signal, false);
            let deadline = Instant::now() + DROP_GRACE;
            while Instant::now() < deadline && self.is_running() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let _ = self.kill();
    }
}

/// One line of `/proc/<pid>/stat`, enough to follow a process tree and tell a pid's
/// incarnations apart.
#[derive(Debug, Clone, Copy)]
struct ProcEntry {
    pid: u32,
    ppid: u32,
    state: char,
    /// Start time in clock ticks since boot: a reused pid has a different one.
    start: u64,
}

impl ProcEntry {
    fn read(pid: u32) -> Option<ProcEntry> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name: state(3) ppid(4) ... starttime(22).
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let start = fields.nth(17)?.parse().ok()?;
        Some(ProcEntry {
            pid,
            ppid,
            state,
            start,
        })
    }

    /// True while this incarnation exists and is not a zombie; reaps it if it is a zombie
    /// child of ours (an orphan re-parented to this subreaper process).
    fn is_alive(&self) -> bool {
        match ProcEntry::read(self.pid) {
            Some(now) if now.start == self.start => {
                if now.state != 'Z' && now.state != 'X' {
                    return true;
                }
                if now.ppid == std::process::id() {
                    sys::reap(self.pid);
                }
                false
            }
            _ => false,
        }
    }
}

/// All live descendants of `root`, found by following parent pids through `/proc`.
fn descendants(root: u32) -> Vec<ProcEntry> {
    let table: Vec<ProcEntry> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter_map(ProcEntry::read)
        .collect();
    let mut found: Vec<ProcEntry> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for entry in table.iter().filter(|e| e.ppid == parent && e.state != 'Z') {
            found.push(*entry);
            parents.push(entry.pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            lookup_user(passwd, "postgres"),
            Some(RunAs { uid: 101, gid: 104 })
        );
        assert_eq!(lookup_user(passwd, "root"), Some(RunAs { uid: 0, gid: 0 }));
        assert_eq!(lookup_user(passwd, "nobody"), None);
    }
}
