//! Database steps with a deadline, shared by the relay and the inbox consumer: a connection
//! that goes silent (no reset, nothing coming back) must fail a step, not hang it.

use std::future::Future;
use std::time::Duration;

/// Runs a database step with a deadline: past `limit` it fails as a timed-out I/O error
/// ([`is_timeout`]) and the step's future is dropped. A transaction in it ends with its
/// connection, which the caller should close rather than return to the pool (the pool pings
/// a returned connection without a deadline).
pub async fn within<T>(
    limit: Duration,
    step: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(limit, step).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the database within {limit:?}"),
        ))),
    }
}

/// Whether `e` is [`within`]'s timeout (or another timed-out I/O error).
pub fn is_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_step_past_its_limit_fails_as_a_timeout() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, sqlx::Error>(())
        };
        let err = within(Duration::from_millis(10), slow)
            .await
            .expect_err("timed out");
        assert!(is_timeout(&err), "{err}");
        let quick = within(Duration::from_secs(1), async { Ok::<_, sqlx::Error>(7) }).await;
        assert_eq!(quick.expect("in time"), 7);
        assert!(!is_timeout(&sqlx::Error::PoolTimedOut));
    }
}
