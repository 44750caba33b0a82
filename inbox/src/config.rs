//! Consumer settings: a plain struct with documented defaults and `validate()`.

use std::time::Duration;

use crate::error::Error;

/// How messages are grouped into transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One transaction per message: insert inbox row, run handler, commit, ack.
    Strict,
    /// Up to `max_messages` messages per transaction; all acks after the one commit. The
    /// inbox rows are inserted with one statement and the handlers run without savepoints;
    /// if a handler fails, the batch is rolled back and run again with a savepoint per
    /// message, so that one failing handler does not undo the others. If the database
    /// refuses the batch's COMMIT (a deferred constraint, a serialization failure), the
    /// batch is run again one message at a time, each in its own transaction, so that only
    /// the message whose commit fails is retried (and dead-lettered with reason
    /// `commit_failed` after `max_attempts`). A handler may thus run more than once for one
    /// delivery, but only one run commits, and only the last rerun's failure counts as an
    /// attempt.
    Batched {
        /// Messages per transaction, at least 1.
        max_messages: usize,
    },
}

/// One consumer: its durable JetStream consumer, attempts, backoff, concurrency, retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Durable consumer name, shared by every instance of the service (they load-balance),
    /// and the `consumer` of its inbox rows and dead letters. `A-Z a-z 0-9 - _`, at most 64
    /// characters. Required.
    pub name: String,
    /// The stream to consume. Required.
    pub stream: String,
    /// Subjects to receive (wildcards allowed); empty means the whole stream. Defaults to empty.
    pub filter_subjects: Vec<String>,
    /// Strict or batched. Defaults to strict.
    pub mode: Mode,
    /// Messages handled concurrently, in lanes by partition key: messages of one key are
    /// handled in delivery order by one lane. Each lane keeps one pool connection while the
    /// consumer runs, so the pool needs `concurrency` + 2 connections (cleaner, `dlq retry`
    /// requests). Defaults to 8: a strict-mode transaction waits for its commit flush most of
    /// the time, and more lanes overlap those waits (measured: 0.70x the single-connection
    /// commit rate with 4 lanes, 0.87x with 8, 1.06x with 16).
    pub concurrency: usize,
    /// Handler attempts after which a still-failing message is dead-lettered. Defaults to 5.
    ///
    /// An attempt is a run of the handler that failed: it returned [`HandlerError::Retry`],
    /// panicked, or returned `Ok` but the database refused its transaction's COMMIT (a
    /// deferred constraint, a serialization failure). Deliveries that did not run the
    /// handler to such an end do not count, although they grow the broker's delivery count:
    /// NAKs after a database error (the inbox insert, a lost connection), NAKs at shutdown,
    /// an expired `ack_wait`, a redelivery of a message already handled. The count is kept
    /// in the `inbox_attempt` table, so it carries over when another instance gets the
    /// message. A [`HandlerError::Permanent`] failure parks the message at once, whatever
    /// the count. Also attempts: a handler that returned `Ok` but left its transaction
    /// aborted (it ignored a failed statement; parked as `aborted_transaction`), and a
    /// handler that ran longer than `handler_timeout` (parked as `timeout`).
    ///
    /// The limit is exact for the deliveries of one message. Copies of one message (the same
    /// envelope id published again under another `Nats-Msg-Id`) that two instances handle at
    /// the same moment can each run one attempt more: the second waits for the first's
    /// inbox row and reads the attempt count before the first has counted its failure. Each
    /// such concurrent copy adds at most one attempt; the effects still commit at most once.
    ///
    /// A safety limit bounds the deliveries that are not attempts: once the broker has
    /// delivered a message more than 10 x `max_attempts` times, and at least 100 times (its
    /// `Delivery::delivered`), it is parked with reason `deliveries_exhausted` without running
    /// the handler, so that a message that keeps failing in ways that are not attempts (its
    /// inbox insert always fails, its handler keeps blocking its thread past `ack_wait`)
    /// cannot loop forever. After a database error the messages are NAKed with a delay that
    /// grows with their delivery count up to `retry_max_delay`, so only an outage of about
    /// that many times `retry_max_delay` parks the messages in flight the same way (`dlq
    /// retry` runs them).
    ///
    /// [`HandlerError::Retry`]: crate::HandlerError::Retry
    /// [`HandlerError::Permanent`]: crate::HandlerError::Permanent
    pub max_attempts: u32,
    /// How long one handler call (of one message, or of a batch handler with its batch) may
    /// run. Defaults to 5 minutes: far above what a handler inside a database transaction
    /// should take (it holds a pool connection and row locks all along, and the messages
    /// of its lane wait behind it), yet long enough for a slow legitimate call, such as a
    /// large batch or a slow downstream; lower it for handlers known to be fast. Once it is
    /// exceeded the handler's future is dropped, its transaction rolled back and the call
    /// counted as a failed attempt (`inbox_handler_timeouts_total`); the message is retried,
    /// then parked with reason `timeout`. Progress acks for the message stop with it. A
    /// handler waiting inside a database statement is only stopped once that statement
    /// returns (the rollback waits for it): bound those with `statement_timeout` or
    /// `lock_timeout`. At least 1 s.
    pub handler_timeout: Duration,
    /// The deadline of each database step the consumer takes itself, around the handler:
    /// taking a connection, BEGIN, the inbox insert, the check before COMMIT, COMMIT and
    /// ROLLBACK, the attempt count and the dead-letter writes, the `dlq retry` poll (the
    /// handler's own statements are bounded by `handler_timeout`). Defaults to 10 s. Past it
    /// the step fails like a lost connection: the connection is closed, nothing is counted,
    /// the messages are NAKed with the growing database-error delay, and readiness
    /// ([`Consumer::health`](crate::Consumer::health)) turns false until a step succeeds.
    /// A silently dead connection (no TCP reset, nothing coming back) thus cannot hold a
    /// lane, or shutdown, forever. A COMMIT that timed out may still have committed: the
    /// redelivery then finds its inbox row and is acknowledged without running the handler.
    /// Set it above the slowest legitimate step: a COMMIT that runs deferred triggers or
    /// waits for a synchronous replica, an inbox insert that waits for another instance's
    /// transaction on a copy of the same message. A step that times out NAKs its messages
    /// like any database failure, so later messages of their keys may be handled first (as
    /// after a retry: per-key order holds among first deliveries), and a batch whose COMMIT
    /// always takes longer is never pinned on one message. At least 100 ms.
    pub db_timeout: Duration,
    /// How long the broker waits for an ack before redelivering. Defaults to 30 s. The
    /// durable consumer is created with it; an existing durable with another `ack_wait` is
    /// refused by `Consumer::ensure` (edit it at the broker when changing this). While a
    /// message waits in its lane or its handler runs, the lane sends a progress ack every
    /// quarter of `ack_wait`, so a handler may take longer than `ack_wait` without its
    /// message (or those queued behind it) being redelivered.
    pub ack_wait: Duration,
    /// First retry delay (NAK delay), doubling per attempt with jitter. Defaults to 1 s.
    pub retry_min_delay: Duration,
    /// Largest retry delay. Defaults to 60 s.
    pub retry_max_delay: Duration,
    /// How long inbox rows are kept. It must exceed the redelivery horizon
    /// ([`ConsumerConfig::redelivery_horizon`]: `(handler_timeout + ack_wait) x max_attempts`
    /// plus every retry delay), or a late redelivery would no
    /// longer find its row and run the handler twice; `validate()` refuses shorter values.
    /// Defaults to 7 days.
    pub inbox_retention: Duration,
    /// How often old inbox rows are deleted. Defaults to 10 minutes.
    pub cleaner_interval: Duration,
    /// How often `dlq retry` requests for this consumer are looked for. Defaults to 1 s.
    pub retry_poll_interval: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            name: String::new(),
            stream: String::new(),
            filter_subjects: Vec::new(),
            mode: Mode::Strict,
            concurrency: 8,
            max_attempts: 5,
            handler_timeout: Duration::from_secs(300),
            db_timeout: Duration::from_secs(10),
            ack_wait: Duration::from_secs(30),
            retry_min_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(60),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            cleaner_interval: Duration::from_secs(600),
            retry_poll_interval: Duration::from_secs(1),
        }
    }
}

impl ConsumerConfig {
    /// A default configuration for `name` on `stream`.
    pub fn new(name: impl Into<String>, stream: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            stream: stream.into(),
            ..ConsumerConfig::default()
        }
    }

    /// The longest time between a message's first delivery and its last redelivery: every
    /// attempt may run for `handler_timeout` (kept alive by progress acks), wait `ack_wait`
    /// and then a retry delay of at most twice `retry_max_delay` (jitter included).
    pub fn redelivery_horizon(&self) -> Duration {
        (self.handler_timeout + self.ack_wait + self.retry_max_delay * 2) * self.max_attempts
    }

    /// Refuses values that cannot work or that would break exactly-once.
    pub fn validate(&self) -> Result<(), Error> {
        let refuse = |m: String| Err(Error::Config(m));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.name) {
            return refuse(format!(
                "name {:?} must be 1-64 characters of A-Z a-z 0-9 - _",
                self.name
            ));
        }
        if !name_ok(&self.stream) {
            return refuse(format!(
                "stream {:?} must be 1-64 characters of A-Z a-z 0-9 - _",
                self.stream
            ));
        }
        if let Mode::Batched { max_messages } = self.mode
            && !(1..=1000).contains(&max_messages)
        {
            return refuse(format!(
                "batched max_messages must be 1 to 1000, got {max_messages}"
            ));
        }
        if !(1..=256).contains(&self.concurrency) {
            return refuse(format!(
                "concurrency must be 1 to 256, got {}",
                self.concurrency
            ));
        }
        if self.max_attempts == 0 {
            return refuse("max_attempts must be at least 1".into());
        }
        if self.handler_timeout < Duration::from_secs(1) {
            return refuse("handler_timeout must be at least 1s".into());
        }
        if self.db_timeout < Duration::from_millis(100) {
            return refuse("db_timeout must be at least 100ms".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return refuse("ack_wait must be at least 1s".into());
        }
        if self.retry_min_delay.is_zero() || self.retry_min_delay > self.retry_max_delay {
            return refuse("retry_min_delay must be positive and at most retry_max_delay".into());
        }
        let horizon = self.redelivery_horizon();
        if self.inbox_retention <= horizon {
            return refuse(format!(
                "inbox_retention ({:?}) must exceed the redelivery horizon ({horizon:?} = (handler_timeout + ack_wait + 2 x retry_max_delay) x max_attempts): a redelivery after its inbox row is deleted would run the handler twice",
                self.inbox_retention
            ));
        }
        if self.cleaner_interval.is_zero() || self.retry_poll_interval.is_zero() {
            return refuse("cleaner_interval and retry_poll_interval must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_retention_shorter_than_the_redelivery_horizon() {
        let ok = ConsumerConfig::new("email", "ORDERS");
        ok.validate().expect("defaults are valid");
        let short = ConsumerConfig {
            inbox_retention: Duration::from_secs(60),
            ..ok.clone()
        };
        let err = short.validate().expect_err("refused").to_string();
        assert!(err.contains("redelivery horizon"), "{err}");
        assert!(
            ConsumerConfig {
                name: "a b".into(),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            ConsumerConfig {
                mode: Mode::Batched { max_messages: 0 },
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(
            ConsumerConfig {
                handler_timeout: Duration::from_millis(100),
                ..ConsumerConfig::new("email", "ORDERS")
            }
            .validate()
            .is_err()
        );
    }
}
