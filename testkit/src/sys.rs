//! The few Linux calls std does not wrap: effective uid, signals, reaping orphans, and spawning
//! children that die with the test process. All `unsafe` of the crate lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Mutex, PoisonError, mpsc};

pub(crate) use libc::{SIGCONT, SIGINT, SIGKILL, SIGQUIT, SIGSTOP, SIGTERM};

/// The effective user id of the test process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `sig` to one process (`group == false`) or to the process group `id` (`group == true`).
pub(crate) fn signal(id: u32, sig: i32, group: bool) -> io::Result<()> {
    let pid = libc::pid_t::try_from(id)
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let target = if group { -pid } else { pid };
    // SAFETY: kill(2) has no memory-safety preconditions; `target` is a positive pid or the
    // negated id of a process group we created (never 0 or -1, which would hit more).
    if unsafe { libc::kill(target, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reaps `pid` if it is a zombie child of this process; never blocks.
pub(crate) fn reap(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG makes the call non-blocking; a pid
        // that is not our child just yields ECHILD.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Spawns `cmd` so that the child gets SIGKILL when the test process dies, even by SIGKILL.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, so
/// every child is forked by one dedicated thread that lives as long as the process. The first
/// call also makes the test process a child subreaper, so that the backends of a SIGKILLed
/// postmaster are re-parented to us and can be reaped ([`reap`]) instead of piling up as zombies
/// under an init that does not reap.
pub(crate) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the hook runs in the child between fork and exec. It only makes the
    // async-signal-safe syscalls prctl(2) and getppid(2) and builds io::Errors from raw OS codes,
    // which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        if spawner.is_none() {
            // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers and only changes how
            // orphaned descendants are re-parented.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("testkit-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })?;
            *spawner = Some(tx);
        }
        let sender = spawner
            .as_ref()
            .ok_or_else(|| io::Error::other("no spawner thread"))?;
        sender
            .send((cmd, reply_tx))
            .map_err(|_| io::Error::other("testkit spawner thread is gone"))?;
    }
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("testkit spawner thread is gone"))?
}
