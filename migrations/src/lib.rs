//! The toolkit's database schema and the embedded migrator that applies it.
//!
//! The numbered SQL files in `migrations/sql/` create the three tables, one owner each:
//! `outbox_message` (outbox crate and relay), `inbox_message` and `inbox_attempt` (inbox crate) and
//! `dead_letter` (dlq crate), and `relay_instance` / `relay_partition_lease` (relay crate). [`migrate`] applies the ones a database lacks, in order, in one
//! transaction, under an advisory lock so that several processes (relays starting together)
//! can call it at once. Applied versions are recorded in `outbox_toolkit_migration`, a table
//! of its own, so the toolkit's schema never collides with an application's own sqlx or
//! refinery migration history.
//!
//! # Layout
//! - [`MIGRATIONS`]: the embedded SQL, in order.
//! - [`migrate`]: applies what is missing and reports what it did.
//! - [`Error`]: why migrating failed.
//!
//! Teams that run their own migration tool can copy the SQL files instead; the relay's
//! `migrate` command calls [`migrate`].

use sqlx::{Connection, PgConnection, Row};

/// One numbered SQL migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number; applied in increasing order.
    pub version: i64,
    /// A short name, from the file name.
    pub name: &'static str,
    /// The statements, run as one script.
    pub sql: &'static str,
}

impl Migration {
    /// A stable fingerprint of the SQL text (64-bit FNV-1a, hex), recorded when applied so
    /// that an edited migration is detected instead of silently diverging.
    pub fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Every migration of this version of the toolkit, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_message",
        sql: include_str!("../sql/0001_outbox_message.sql"),
    },
    Migration {
        version: 2,
        name: "inbox_message",
        sql: include_str!("../sql/0002_inbox_message.sql"),
    },
    Migration {
        version: 3,
        name: "dead_letter",
        sql: include_str!("../sql/0003_dead_letter.sql"),
    },
    Migration {
        version: 4,
        name: "relay_partition",
        sql: include_str!("../sql/0004_relay_partition.sql"),
    },
    Migration {
        version: 5,
        name: "inbox_outcome",
        sql: include_str!("../sql/0005_inbox_outcome.sql"),
    },
    Migration {
        version: 6,
        name: "claim_indexes",
        sql: include_str!("../sql/0006_claim_indexes.sql"),
    },
    Migration {
        version: 7,
        name: "claims_are_row_locks",
        sql: include_str!("../sql/0007_claims_are_row_locks.sql"),
    },
    Migration {
        version: 8,
        name: "cheaper_inserts",
        sql: include_str!("../sql/0008_cheaper_inserts.sql"),
    },
    Migration {
        version: 9,
        name: "permanent_failures",
        sql: include_str!("../sql/0009_permanent_failures.sql"),
    },
    Migration {
        version: 10,
        name: "inbox_attempt",
        sql: include_str!("../sql/0010_inbox_attempt.sql"),
    },
    Migration {
        version: 11,
        name: "outbox_emit",
        sql: include_str!("../sql/0011_outbox_emit.sql"),
    },
    Migration {
        version: 12,
        name: "outbox_emit_guard",
        sql: include_str!("../sql/0012_outbox_emit_guard.sql"),
    },
    Migration {
        version: 13,
        name: "outbox_wal_progress",
        sql: include_str!("../sql/0013_outbox_wal_progress.sql"),
    },
    Migration {
        version: 14,
        name: "console_audit",
        sql: include_str!("../sql/0014_console_audit.sql"),
    },
    Migration {
        version: 15,
        name: "dead_letter_reason_idx",
        sql: include_str!("../sql/0015_dead_letter_reason_idx.sql"),
    },
    Migration {
        version: 16,
        name: "outbox_emit_check_cached",
        sql: include_str!("../sql/0016_outbox_emit_check_cached.sql"),
    },
    Migration {
        version: 17,
        name: "outbox_wal_progress_system",
        sql: include_str!("../sql/0017_outbox_wal_progress_system.sql"),
    },
    Migration {
        version: 18,
        name: "outbox_wal_progress_acknowledged",
        sql: include_str!("../sql/0018_outbox_wal_progress_acknowledged.sql"),
    },
];

/// Why [`migrate`] failed. Nothing was applied when it returns an error: all migrations run
/// in one transaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused a statement or could not be reached.
    #[error("migration failed: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration recorded as applied has different SQL now: the file was edited after it
    /// was applied. Write a new migration instead.
    #[error(
        "migration {version} ({name}) was applied with checksum {applied} but the embedded SQL has {embedded}: applied migrations must not be edited"
    )]
    Modified {
        /// The migration's number.
        version: i64,
        /// Its name.
        name: &'static str,
        /// The checksum recorded in the database.
        applied: String,
        /// The checksum of the embedded SQL.
        embedded: String,
    },
    /// A migration could not take the lock it needs on a table within [`LOCK_TIMEOUT`], in
    /// each of [`LOCK_TRIES`] tries: a long-running transaction holds a conflicting lock.
    /// Waiting longer would hold every writer of that table behind the migration's queued
    /// lock, so it gives up; run it again once that transaction ends.
    #[error(
        "migration {version} ({name}) could not lock its table within {LOCK_TIMEOUT:?} in {LOCK_TRIES} tries: a long-running transaction holds a conflicting lock (see pg_stat_activity); nothing was applied, run it again when that transaction has ended"
    )]
    LockTimeout {
        /// The migration's number.
        version: i64,
        /// Its name.
        name: &'static str,
    },
}

/// The longest a migration waits for a table lock in one try (PostgreSQL's `lock_timeout`):
/// while it waits, writers of that table queue behind it.
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How many times [`migrate`] tries before returning [`Error::LockTimeout`], a second apart.
pub const LOCK_TRIES: u32 = 3;

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Versions applied by this call, in order (empty when the schema was up to date).
    pub applied: Vec<i64>,
    /// Versions recorded in the database that this toolkit does not know (written by a newer
    /// version). They are left alone.
    pub unknown: Vec<i64>,
}

/// Key of the transaction-level advisory lock taken while migrating ("outbox-mig" in ASCII).
const LOCK_KEY: i64 = 0x6f75_7462_6f78_6d69;

/// Applies every migration the database lacks, in order, in one transaction.
///
/// Safe to call concurrently from several processes: they serialise on an advisory lock and
/// all but the first find nothing to do. Refuses with [`Error::Modified`] if an applied
/// migration's SQL changed. Never holds the application's writers for long: each table lock
/// is waited for at most [`LOCK_TIMEOUT`], and after [`LOCK_TRIES`] tries it returns
/// [`Error::LockTimeout`] with nothing applied.
pub async fn migrate(conn: &mut PgConnection) -> Result<Report, Error> {
    let mut tries = 1;
    loop {
        match migrate_once(conn).await {
            Err(Error::LockTimeout { version, name }) if tries < LOCK_TRIES => {
                tracing::warn!(
                    version,
                    name,
                    try_number = tries,
                    "a migration could not lock its table in time; trying again"
                );
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            done => return done,
        }
    }
}

/// One try of [`migrate`], in one transaction.
async fn migrate_once(conn: &mut PgConnection) -> Result<Report, Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", LOCK_TIMEOUT.as_millis()))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outbox_toolkit_migration (
            version     bigint      PRIMARY KEY,
            name        text        NOT NULL,
            checksum    text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    let rows =
        sqlx::query("SELECT version, checksum FROM outbox_toolkit_migration ORDER BY version")
            .fetch_all(&mut *tx)
            .await?;
    let mut recorded = Vec::with_capacity(rows.len());
    for row in rows {
        recorded.push((row.try_get::<i64, _>(0)?, row.try_get::<String, _>(1)?));
    }

    let mut report = Report {
        applied: Vec::new(),
        unknown: recorded
            .iter()
            .map(|(v, _)| *v)
            .filter(|v| !MIGRATIONS.iter().any(|m| m.version == *v))
            .collect(),
    };
    for migration in MIGRATIONS {
        let embedded = migration.checksum();
        match recorded.iter().find(|(v, _)| *v == migration.version) {
            Some((_, applied)) if *applied == embedded => continue,
            Some((_, applied)) => {
                return Err(Error::Modified {
                    version: migration.version,
                    name: migration.name,
                    applied: applied.clone(),
                    embedded,
                });
            }
            None => {}
        }
        if let Err(e) = sqlx::raw_sql(migration.sql).execute(&mut *tx).await {
            // 55P03 lock_not_available: lock_timeout ran out.
            if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03") {
                return Err(Error::LockTimeout {
                    version: migration.version,
                    name: migration.name,
                });
            }
            return Err(e.into());
        }
        sqlx::query(
            "INSERT INTO outbox_toolkit_migration (version, name, checksum) VALUES ($1, $2, $3)",
        )
        .bind(migration.version)
        .bind(migration.name)
        .bind(&embedded)
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        report.applied.push(migration.version);
    }
    tx.commit().await?;
    if !report.unknown.is_empty() {
        tracing::warn!(versions = ?report.unknown, "database has migrations newer than this toolkit");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    /// Checksums are taken over the bytes: a CRLF checkout (see `.gitattributes`) would make
    /// every applied migration look edited.
    #[test]
    fn the_embedded_sql_has_lf_line_ends() {
        for m in MIGRATIONS {
            assert!(
                !m.sql.contains('\r'),
                "migration {} has CR bytes",
                m.version
            );
        }
    }
}
