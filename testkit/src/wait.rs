//! Waiting on conditions with a deadline, and picking free ports.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, Result};

/// Polls `condition` until it returns `true`; fails with [`Error::Timeout`] naming `what` if it
/// has not after `deadline`.
///
/// Guarantees: `condition` is evaluated at least once, and once more close to the deadline
/// before giving up; between evaluations it waits 5 ms, doubling up to 100 ms. Uses tokio time,
/// so it also works (in virtual time) under `tokio::time::pause()`. This is the way tests
/// synchronise with background work: never a bare sleep.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        if condition().await {
            return Ok(());
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: deadline,
            });
        }
        tokio::time::sleep(delay.min(deadline - elapsed)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, released).
///
/// Another process can take it before you bind it; the server starters in this crate retry
/// with a new port when that happens.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(Error::io("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("reading the address of a 127.0.0.1:0 listener"))?
        .port();
    Ok(port)
}
