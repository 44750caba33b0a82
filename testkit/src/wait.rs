//! Waiting on conditions with a deadline, and picking free ports.

use std::convert::Infallible;
use std::fmt::Display;
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
    wait_for(deadline, what, || {
        let holds = condition();
        async move { Ok::<_, Infallible>(holds.await.then_some(())) }
    })
    .await
}

/// Polls a fallible `condition` until it returns `Ok(Some(value))`, and returns that value.
///
/// `Ok(None)` means "not yet". `Err(e)` means "not yet" too (the thing awaited may be
/// unreachable for a while), and is remembered: if the deadline passes, the
/// [`Error::Timeout`] naming `what` carries the most recent error in `last_error` (even if
/// later evaluations returned `Ok(None)`), formatted with `{:#}` so that an `anyhow::Error`
/// shows its chain. An error that must end the wait at once is the caller's to return inside
/// `Ok(Some(..))` (e.g. `T = anyhow::Result<..>`).
///
/// Guarantees, as for [`wait_until`] (which is this function with an infallible condition):
/// `condition` is evaluated at least once, and once more close to the deadline before giving
/// up; between evaluations it waits 5 ms, doubling up to 100 ms; it uses tokio time, so it also
/// works (in virtual time) under `tokio::time::pause()`.
pub async fn wait_for<T, E, F, Fut>(deadline: Duration, what: &str, condition: F) -> Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    poll(
        deadline,
        what,
        Duration::from_millis(5),
        MAX_DELAY,
        condition,
    )
    .await
}

/// [`wait_for`] with a fixed pause of `every` between evaluations instead of the growing
/// one: for a condition that costs the thing awaited something each time (an HTTP request
/// to a service under faults, a new connection), so that waiting does not add load.
pub async fn wait_for_every<T, E, F, Fut>(
    deadline: Duration,
    every: Duration,
    what: &str,
    condition: F,
) -> Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    // A zero pause would never yield to tokio's (paused) clock.
    let every = every.max(Duration::from_millis(1));
    poll(deadline, what, every, every, condition).await
}

const MAX_DELAY: Duration = Duration::from_millis(100);

async fn poll<T, E, F, Fut>(
    deadline: Duration,
    what: &str,
    first_delay: Duration,
    max_delay: Duration,
    mut condition: F,
) -> Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    let start = Instant::now();
    let mut delay = first_delay;
    let mut last_error = None;
    loop {
        match condition().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: deadline,
                last_error,
            });
        }
        tokio::time::sleep(delay.min(deadline - elapsed)).await;
        delay = (delay * 2).min(max_delay);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::wait_for;
    use crate::Error;

    #[tokio::test]
    async fn wait_for_returns_the_value_and_names_the_last_error_on_timeout() {
        let mut calls = 0;
        let value = wait_for(Duration::from_secs(5), "the third call", || {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    1 => Err("not yet"),
                    2 => Ok(None),
                    _ => Ok(Some(n)),
                }
            }
        })
        .await
        .expect("done on the third call");
        assert_eq!(value, 3);

        let mut calls = 0;
        let err = wait_for(Duration::from_millis(30), "nothing", || {
            calls += 1;
            let n = calls;
            async move {
                if n == 1 {
                    Err(format!("boom {n}"))
                } else {
                    Ok(None::<()>)
                }
            }
        })
        .await
        .expect_err("never done");
        match &err {
            Error::Timeout { last_error, .. } => assert_eq!(last_error.as_deref(), Some("boom 1")),
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(calls >= 2, "evaluated again before giving up");
        assert_eq!(
            err.to_string(),
            "timed out after 30ms waiting for nothing (last error: boom 1)"
        );
    }
}
