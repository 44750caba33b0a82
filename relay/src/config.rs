//! Relay settings: a plain struct with documented defaults and `validate()`.

use std::time::Duration;

use crate::error::Error;

/// How the relay claims, publishes, retries and cleans. Every field has a default that suits
/// one relay per service database on the same host as the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// This instance's name in `relay_instance` and partition leases; unique
    /// among the relays of one database. Defaults to `relay-<hostname>-<pid>-<random>`.
    pub instance_id: String,
    /// Rows claimed per claim transaction (the rows one commit marks). Defaults to 512.
    pub batch_size: usize,
    /// Most messages sent and not yet acknowledged (the PubAck window); also bounds the
    /// claimed rows held in memory (twice this). Defaults to 1024.
    pub max_in_flight: usize,
    /// Claim transactions open at once (claiming, publishing or committing), each holding a
    /// database connection. More overlap claims and commits better at a high rate. Defaults
    /// to 6.
    pub max_open_claims: usize,
    /// How long to wait for a PubAck before the outcome counts as unknown and the row is
    /// retried with the same id. Defaults to 5 s.
    pub publish_timeout: Duration,
    /// The longest a claim transaction may stay open: the relay starts no publish in the
    /// second half of it, and the server ends a session left idle in its claim transaction
    /// this long (`idle_in_transaction_session_timeout`), so a hung relay cannot hold rows.
    /// Must be at least twice `publish_timeout`. Defaults to 30 s.
    pub claim_ttl: Duration,
    /// Permanent failures (no stream for its subject, larger than the broker accepts,
    /// refused) after which a row moves to `dead_letter`; they are counted apart from
    /// transient ones (`outbox_message.permanent_failures`). Transient errors (broker down,
    /// timeouts) never dead-letter and do not count here: the row waits. Defaults to 5.
    pub max_permanent_attempts: u32,
    /// First retry delay of a failed row; doubles per attempt, with jitter. Defaults to 100 ms.
    pub retry_min_delay: Duration,
    /// Largest retry delay of a failed row. Defaults to 30 s.
    pub retry_max_delay: Duration,
    /// Shortest wait between claims when the outbox is empty. Defaults to 1 ms.
    pub poll_min_interval: Duration,
    /// Longest wait between claims when the outbox stays empty (the idle cost: one cheap
    /// indexed query per interval). Defaults to 100 ms.
    pub poll_max_interval: Duration,
    /// Also wake on `LISTEN outbox_message` notifications (needs the notify trigger, see
    /// `relay notify enable`). Defaults to false.
    pub listen_notify: bool,
    /// How long a partition lease and an instance heartbeat stay valid; a killed instance's
    /// partitions are taken over after this (its claims end with its database sessions).
    /// Defaults to 5 s.
    pub lease_ttl: Duration,
    /// How often leases and the heartbeat are renewed; must be under a third of
    /// `lease_ttl`. Defaults to 1 s.
    pub heartbeat_interval: Duration,
    /// How long published rows are kept (for `status`, audits and `reconcile`). Zero
    /// deletes a row as soon as its PubAck arrives. Defaults to 1 hour.
    pub retention: Duration,
    /// How often the cleaner deletes rows past the retention. Defaults to 30 s.
    pub cleaner_interval: Duration,
    /// How often the relay vacuums `outbox_message` (needs the table's owner or a superuser;
    /// a failure is logged once and autovacuum is left to do it). Claims slow down as dead
    /// row versions pile up at the head of the claim index. Zero disables. Defaults to 10 s.
    pub vacuum_interval: Duration,
    /// How often backlog gauges are refreshed. Defaults to 5 s.
    pub stats_interval: Duration,
    /// The longest the relay waits for the database in one step (taking a connection plus a
    /// claim, a batch's commit, a late write, a lease renewal) before it counts the database
    /// as unreachable: readiness turns false and the step is retried with backoff. A silently
    /// dead connection (no TCP reset, no answer) would otherwise be waited on forever.
    /// Defaults to 10 s.
    pub db_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            instance_id: default_instance_id(),
            batch_size: 512,
            max_in_flight: 1024,
            max_open_claims: 6,
            publish_timeout: Duration::from_secs(5),
            claim_ttl: Duration::from_secs(30),
            max_permanent_attempts: 5,
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(30),
            poll_min_interval: Duration::from_millis(1),
            poll_max_interval: Duration::from_millis(100),
            listen_notify: false,
            lease_ttl: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            cleaner_interval: Duration::from_secs(30),
            vacuum_interval: Duration::from_secs(10),
            stats_interval: Duration::from_secs(5),
            db_timeout: Duration::from_secs(10),
        }
    }
}

/// `relay-<hostname>-<pid>-<4 hex>` (with `-<n>` for the n-th further id of one process):
/// unique enough that two processes, or two relays of one process, never share it.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    // The random bits of a UUIDv7 (its last bytes) tell apart restarts with the same pid
    // (pid 1 in a container); a count of the ids this process made tells apart relays of one
    // process (two UUIDv7s of one millisecond can share their last bytes).
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let random = uuid::Uuid::now_v7().as_u128() as u16;
    let pid = std::process::id();
    if made == 0 {
        format!("relay-{host}-{pid}-{random:04x}")
    } else {
        format!("relay-{host}-{pid}-{random:04x}-{made}")
    }
}

impl RelayConfig {
    /// Refuses values that cannot work, naming the field and the rule.
    pub fn validate(&self) -> Result<(), Error> {
        let refuse = |msg: String| Err(Error::Config(msg));
        if self.instance_id.is_empty()
            || self.instance_id.len() > 200
            || self.instance_id.chars().any(char::is_control)
        {
            return refuse("instance_id must be 1 to 200 printable characters".into());
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return refuse(format!(
                "batch_size must be 1 to 10000, got {}",
                self.batch_size
            ));
        }
        if !(1..=64).contains(&self.max_open_claims) {
            return refuse(format!(
                "max_open_claims must be 1 to 64, got {}",
                self.max_open_claims
            ));
        }
        if !(1..=65_536).contains(&self.max_in_flight) {
            return refuse(format!(
                "max_in_flight must be 1 to 65536, got {}",
                self.max_in_flight
            ));
        }
        if self.publish_timeout < Duration::from_millis(100) {
            return refuse("publish_timeout must be at least 100ms".into());
        }
        if self.claim_ttl < self.publish_timeout * 2 {
            return refuse(format!(
                "claim_ttl ({:?}) must be at least twice publish_timeout ({:?}), or claims could expire while a publish is still in flight",
                self.claim_ttl, self.publish_timeout
            ));
        }
        if self.max_permanent_attempts == 0 {
            return refuse("max_permanent_attempts must be at least 1".into());
        }
        if self.retry_min_delay.is_zero() || self.retry_min_delay > self.retry_max_delay {
            return refuse("retry_min_delay must be positive and at most retry_max_delay".into());
        }
        if self.poll_min_interval.is_zero() || self.poll_min_interval > self.poll_max_interval {
            return refuse(
                "poll_min_interval must be positive and at most poll_max_interval".into(),
            );
        }
        if self.poll_max_interval > Duration::from_secs(60) {
            return refuse("poll_max_interval must be at most 60s".into());
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return refuse("lease_ttl must be at least 1s".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 3 > self.lease_ttl {
            return refuse(format!(
                "heartbeat_interval ({:?}) must be positive and at most a third of lease_ttl ({:?})",
                self.heartbeat_interval, self.lease_ttl
            ));
        }
        for (name, value) in [
            ("cleaner_interval", self.cleaner_interval),
            ("stats_interval", self.stats_interval),
            ("db_timeout", self.db_timeout),
        ] {
            if value.is_zero() {
                return refuse(format!("{name} must be positive"));
            }
        }
        Ok(())
    }

    /// The fewest database connections the relay's pool must allow: one per open claim, one
    /// for late marks, leases, cleaner, vacuum and stats, and one more with `listen_notify`.
    pub fn min_connections(&self) -> u32 {
        self.max_open_claims as u32 + 5 + u32::from(self.listen_notify)
    }

    /// Rows held in memory at most: the claim window.
    pub(crate) fn max_claimed_rows(&self) -> usize {
        self.max_in_flight * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unsafe_values_are_refused() {
        RelayConfig::default()
            .validate()
            .expect("defaults are valid");
        let bad = [
            RelayConfig {
                batch_size: 0,
                ..RelayConfig::default()
            },
            RelayConfig {
                claim_ttl: Duration::from_secs(6),
                ..RelayConfig::default()
            },
            RelayConfig {
                heartbeat_interval: Duration::from_secs(2),
                ..RelayConfig::default()
            },
            RelayConfig {
                instance_id: String::new(),
                ..RelayConfig::default()
            },
            RelayConfig {
                max_permanent_attempts: 0,
                ..RelayConfig::default()
            },
        ];
        for config in bad {
            let err = config.validate().expect_err("refused");
            assert!(
                err.to_string().starts_with("invalid relay configuration: "),
                "{err}"
            );
        }
    }

    #[test]
    fn default_instance_ids_differ() {
        // Many in a row, most within one millisecond.
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| default_instance_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
