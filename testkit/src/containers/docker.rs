//! The `docker` CLI: one command with its stderr as the error, and the names the kit gives
//! its containers, with which it removes what a killed test process left behind.

use std::process::{Command, Output};
use std::sync::Once;

use crate::{Error, Result};

/// Runs `docker <args>` and waits (blocking: for the sync controls and `spawn_blocking`);
/// its stdout, or [`Error::Container`] with its stderr.
pub(super) fn docker(args: &[&str]) -> Result<String> {
    outcome(args, Command::new("docker").args(args).output())
}

/// [`docker`] without blocking the runtime's thread: for the async paths.
pub(super) async fn docker_async(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("docker")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await;
    outcome(args, output)
}

fn outcome(args: &[&str], output: std::io::Result<Output>) -> Result<String> {
    let what = format!("docker {}", args.join(" "));
    let output = output.map_err(|e| Error::Container {
        what: what.clone(),
        detail: format!("{e} (is the docker CLI installed? `make test-containers` installs it)"),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Container {
            what,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `<prefix>.<owner>.<pid>.<uuid>`: unique, and telling which test process owns it.
pub(super) fn container_name(prefix: &str) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        owner(),
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )
}

/// Who can tell whether a pid is alive: this machine's name, the pid namespace and the user,
/// as container names allow them (`[a-zA-Z0-9_-]`). Sandboxes sharing a daemon and a
/// hostname, or other users (whose pids `/proc` may hide), get another owner.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let namespace = std::fs::read_link("/proc/self/ns/pid")
        .map(|link| link.display().to_string())
        .unwrap_or_default();
    let raw = format!("{}_{namespace}_{}", host.trim(), crate::sys::euid());
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Once per test process: removes the kit's containers whose test process on this machine is
/// gone (killed before it could drop them), as the process backend's servers die with theirs
/// (`PR_SET_PDEATHSIG`). Containers of other machines sharing the daemon are left alone.
pub(super) fn remove_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(names) = docker(&[
            "ps",
            "-a",
            "--filter",
            "name=testkit-",
            "--format",
            "{{.Names}}",
        ]) else {
            return;
        };
        let owner = owner();
        for name in names.lines() {
            if let Some(pid) = orphan_pid(name, &owner)
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = docker(&["rm", "-f", "-v", name]);
            }
        }
    });
}

/// The pid in a name made by [`container_name`] for `owner`.
fn orphan_pid(name: &str, owner: &str) -> Option<u32> {
    let mut parts = name.rsplitn(4, '.');
    let (_uuid, pid, name_owner, prefix) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (prefix.starts_with("testkit-") && name_owner == owner)
        .then(|| pid.parse().ok())
        .flatten()
        .filter(|pid| *pid != std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tell_the_owner_and_only_this_hosts_are_claimed() {
        let name = container_name("testkit-postgres");
        assert!(name.starts_with("testkit-postgres."), "{name}");
        assert_eq!(
            orphan_pid(&name, &owner()),
            None,
            "our own container is no orphan"
        );
        let other = format!("testkit-nats.{}.1.0190", owner());
        assert_eq!(orphan_pid(&other, &owner()), Some(1));
        assert_eq!(orphan_pid(&other, "elsewhere"), None);
        assert_eq!(orphan_pid("someone-elses.box.1.x", "box"), None);
    }
}
