//! The WAL source's SQL: the slot and its publication, prerequisites, the relay's durable
//! confirmed position (`outbox_wal_progress`, whose only writer this is), and the writes the
//! pipeline makes (dead letters through `dlq::store`, relayed rows through
//! `outbox::store`).

use std::time::Duration;

use outbox::deadline::within;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::decode::Poison;
use crate::error::Error;

/// A slot and the publication it streams, named alike by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotName(String);

impl SlotName {
    /// The default: `outbox_relay`.
    pub const DEFAULT: &'static str = "outbox_relay";

    /// A slot name PostgreSQL accepts: 1 to 63 lower-case letters, digits and underscores.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(SlotName(name))
        } else {
            Err(Error::Config(format!(
                "slot name {name:?}: use 1 to 63 lower-case letters, digits and underscores"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct SlotStatus {
    /// The slot's name.
    pub slot: String,
    /// Its output plugin (the relay's is `pgoutput`).
    pub plugin: Option<String>,
    /// Its database.
    pub database: Option<String>,
    /// A session streams it now.
    pub active: bool,
    /// That session's backend pid.
    pub active_pid: Option<i32>,
    /// Everything before this position is published and confirmed, as the slot has it (a
    /// PostgreSQL crash can set it back to the last position saved to disk).
    pub confirmed_flush_lsn: Option<String>,
    /// The relay's own record of its confirmed position (`outbox_wal_progress`), written
    /// before it is reported to the slot: a relay resumes from the greater of the two.
    pub relay_confirmed_lsn: Option<String>,
    /// The oldest WAL the slot keeps.
    pub restart_lsn: Option<String>,
    /// WAL bytes kept for the slot (current position minus `restart_lsn`).
    pub retained_wal_bytes: Option<i64>,
    /// Bytes between the current position and `confirmed_flush_lsn`: how far the relay is
    /// behind.
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (WAL removed past
    /// `max_slot_wal_keep_size`: the slot can no longer stream).
    pub wal_status: Option<String>,
    /// The server's current WAL position (a relay record ahead of it is not this server's:
    /// a restored backup, or a slot recreated by hand; it is ignored and removed).
    pub current_lsn: Option<String>,
    /// The relay's record was written by another server: its system identifier
    /// (`pg_control_system()`, migration 0017) is another's. A dump restored into another
    /// cluster brings such a record, whose position means nothing here; it is ignored and
    /// removed. False when there is no record, or one without an identifier (written before
    /// 0017: trusted as before, and stamped at the next save).
    pub relay_record_foreign: bool,
}

/// Refuses to start without `wal_level = logical` and a role that may replicate.
pub async fn check_prerequisites(conn: &mut PgConnection, slot: &SlotName) -> Result<(), Error> {
    let refuse = |reason: String| Error::Slot {
        slot: slot.to_string(),
        reason,
    };
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&mut *conn)
        .await?;
    if wal_level != "logical" {
        return Err(refuse(format!(
            "the server has wal_level = {wal_level}; the WAL source needs wal_level = logical (set it and restart PostgreSQL)"
        )));
    }
    let may_replicate: bool = sqlx::query_scalar(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !may_replicate {
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut *conn)
            .await?;
        return Err(refuse(format!(
            "role {user} lacks REPLICATION: ALTER ROLE {user} REPLICATION (or use a role that has it)"
        )));
    }
    let has_progress: bool =
        sqlx::query_scalar("SELECT to_regclass('outbox_wal_progress') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !has_progress {
        return Err(refuse(
            "the table outbox_wal_progress is missing: apply the toolkit's migrations (`relay migrate`, or `relay run --migrate`)".to_owned(),
        ));
    }
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_attribute
         WHERE attrelid = to_regclass('outbox_wal_progress') AND NOT attisdropped
           AND attname IN ('system_identifier', 'acknowledged_ids', 'acknowledged_until')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if columns < 3 {
        return Err(refuse(
            "outbox_wal_progress lacks the columns of migrations 0017 and 0018: apply the toolkit's migrations (`relay migrate`, or `relay run --migrate`)".to_owned(),
        ));
    }
    Ok(())
}

/// What the WAL relay's role needs, besides REPLICATION: deleting relayed rows (DELETE ..
/// WHERE .. RETURNING reads them), writing dead letters and recording its position (both
/// upserts: ON CONFLICT DO UPDATE reads the row it updates).
const RELAY_PRIVILEGES: &[(&str, &str)] = &[
    ("outbox_message", "SELECT"),
    ("outbox_message", "DELETE"),
    ("dead_letter", "SELECT"),
    ("dead_letter", "INSERT"),
    ("dead_letter", "UPDATE"),
    ("outbox_wal_progress", "SELECT"),
    ("outbox_wal_progress", "INSERT"),
    ("outbox_wal_progress", "UPDATE"),
];

/// Refuses to start a relay whose role could not make its writes: deleting relayed rows,
/// writing dead letters and recording its position. Without this check each would fail at
/// its first use and be retried forever, holding back confirmation while WAL piles up.
pub async fn check_privileges(conn: &mut PgConnection, slot: &SlotName) -> Result<(), Error> {
    let (tables, privileges): (Vec<&str>, Vec<&str>) = RELAY_PRIVILEGES.iter().copied().unzip();
    // "SELECT, DELETE on outbox_message", by table in list order.
    let missing: Vec<String> = sqlx::query_scalar(
        "SELECT string_agg(p, ', ' ORDER BY n) || ' on ' || t
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(t, p, n)
         WHERE NOT has_table_privilege(t, p) GROUP BY t ORDER BY min(n)",
    )
    .bind(&tables)
    .bind(&privileges)
    .fetch_all(&mut *conn)
    .await?;
    if missing.is_empty() {
        return Ok(());
    }
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *conn)
        .await?;
    Err(Error::Slot {
        slot: slot.to_string(),
        reason: format!("role {user} lacks {}: grant them", missing.join("; ")),
    })
}

/// Creates the publication (INSERTs into `outbox_message`; logical messages need none) and
/// the `pgoutput` slot, from the current position on. Returns false when both existed.
/// Run it before the first producer writes to the log: a slot keeps only what is written
/// after it.
pub async fn create_slot(conn: &mut PgConnection, slot: &SlotName) -> Result<bool, Error> {
    check_prerequisites(conn, slot).await?;
    let mut created = false;
    let publication_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)")
            .bind(slot.as_str())
            .fetch_one(&mut *conn)
            .await?;
    if !publication_exists {
        // The name is checked to be [a-z0-9_]: safe as an identifier.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE PUBLICATION {slot} FOR TABLE outbox_message WITH (publish = 'insert')"
        )))
        .execute(&mut *conn)
        .await?;
        created = true;
    }
    match status(conn, slot).await? {
        Some(existing) => {
            check_usable(conn, slot, &existing).await?;
        }
        None => {
            // A position recorded for an earlier slot of this name means nothing to this one.
            delete_progress(conn, slot).await?;
            sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot.as_str())
                .execute(&mut *conn)
                .await?;
            created = true;
        }
    }
    Ok(created)
}

/// Refuses a slot of another plugin or another database: slot names are shared by every
/// database of the server.
pub async fn check_usable(
    conn: &mut PgConnection,
    slot: &SlotName,
    existing: &SlotStatus,
) -> Result<(), Error> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await?;
    if existing.database.as_deref() != Some(database.as_str()) {
        return Err(Error::Slot {
            slot: slot.to_string(),
            reason: format!(
                "it belongs to database {:?}, not {database:?} (slot names are shared by all databases of a server): choose another name with --slot",
                existing.database.as_deref().unwrap_or("none")
            ),
        });
    }
    if existing.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::Slot {
            slot: slot.to_string(),
            reason: format!(
                "it exists with plugin {:?}; the relay needs pgoutput: drop it or choose another name",
                existing.plugin
            ),
        });
    }
    Ok(())
}

/// A slot's state and the relay's record of it; `WHERE` follows.
const SLOT_STATUS: &str = "SELECT s.slot_name::text AS slot, s.plugin::text AS plugin,
        s.database::text AS database, s.active, s.active_pid,
        s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
        p.confirmed_lsn::text AS relay_confirmed_lsn,
        s.restart_lsn::text AS restart_lsn,
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_wal_bytes,
        pg_wal_lsn_diff(pg_current_wal_lsn(),
            GREATEST(s.confirmed_flush_lsn, p.confirmed_lsn))::bigint AS lag_bytes,
        s.wal_status, pg_current_wal_lsn()::text AS current_lsn,
        coalesce(p.system_identifier <>
            (SELECT system_identifier FROM pg_control_system()), false) AS relay_record_foreign
    FROM pg_replication_slots s
    LEFT JOIN outbox_wal_progress p ON p.slot_name = s.slot_name";

/// The slot's state, or `None` when there is no such slot.
pub async fn status(
    conn: &mut PgConnection,
    slot: &SlotName,
) -> Result<Option<SlotStatus>, sqlx::Error> {
    sqlx::query_as::<_, SlotStatus>(sqlx::AssertSqlSafe(format!(
        "{SLOT_STATUS} WHERE s.slot_name = $1"
    )))
    .bind(slot.as_str())
    .fetch_optional(&mut *conn)
    .await
}

/// Every logical `pgoutput` slot of the connection's database, by name (the console's
/// overview: a relay's slot, and any other that keeps WAL).
pub async fn slots(conn: &mut PgConnection) -> Result<Vec<SlotStatus>, sqlx::Error> {
    sqlx::query_as::<_, SlotStatus>(sqlx::AssertSqlSafe(format!(
        "{SLOT_STATUS} WHERE s.database = current_database() AND s.plugin = 'pgoutput'
         ORDER BY s.slot_name"
    )))
    .fetch_all(&mut *conn)
    .await
}

/// [`status`] on a connection of `pool`, within `timeout` (the running relay's checks).
pub(crate) async fn status_within(
    pool: &PgPool,
    slot: &SlotName,
    timeout: Duration,
) -> Result<Option<SlotStatus>, sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        status(&mut conn, slot).await
    })
    .await
}

/// Drops the slot and its publication. Refused while a relay streams the slot (stop it
/// first). Returns false when neither existed.
pub async fn drop_slot(conn: &mut PgConnection, slot: &SlotName) -> Result<bool, Error> {
    let mut dropped = false;
    if let Some(existing) = status(conn, slot).await? {
        if existing.active {
            return Err(Error::Slot {
                slot: slot.to_string(),
                reason: format!(
                    "a relay streams it now (backend pid {}): stop it first",
                    existing.active_pid.unwrap_or_default()
                ),
            });
        }
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot.as_str())
            .execute(&mut *conn)
            .await?;
        dropped = true;
    }
    delete_progress(conn, slot).await?;
    let publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)")
            .bind(slot.as_str())
            .fetch_one(&mut *conn)
            .await?;
    if publication {
        // The name is checked to be [a-z0-9_]: safe as an identifier.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP PUBLICATION {slot}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(dropped || publication)
}

/// Removes the relay's record of its position for `slot`.
async fn delete_progress(conn: &mut PgConnection, slot: &SlotName) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox_wal_progress WHERE slot_name = $1")
        .bind(slot.as_str())
        .execute(conn)
        .await
        .map(drop)
}

/// [`delete_progress`] of a record that cannot be this server's, on a connection of `pool`,
/// within `timeout`.
pub(crate) async fn forget_progress(
    pool: &PgPool,
    slot: &SlotName,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        delete_progress(&mut conn, slot).await
    })
    .await
}

/// Records `lsn` as the relay's confirmed position for `slot` (never moving it back), on a
/// connection of `pool`, within `timeout`; committed when it returns `Ok`.
pub(crate) async fn save_progress(
    pool: &PgPool,
    slot: &SlotName,
    lsn: &str,
    acknowledged: &(Vec<Uuid>, Option<pgwire_replication::Lsn>),
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        sqlx::query(
            "INSERT INTO outbox_wal_progress (slot_name, confirmed_lsn, system_identifier,
                                              acknowledged_ids, acknowledged_until)
             VALUES ($1, $2::pg_lsn, (SELECT system_identifier FROM pg_control_system()), $3,
                     $4::pg_lsn)
             ON CONFLICT (slot_name) DO UPDATE
                SET confirmed_lsn = CASE
                        WHEN outbox_wal_progress.system_identifier <> EXCLUDED.system_identifier
                            THEN EXCLUDED.confirmed_lsn
                        ELSE GREATEST(outbox_wal_progress.confirmed_lsn, EXCLUDED.confirmed_lsn)
                    END,
                    system_identifier = EXCLUDED.system_identifier,
                    acknowledged_ids = EXCLUDED.acknowledged_ids,
                    acknowledged_until = EXCLUDED.acknowledged_until,
                    updated_at = now()",
        )
        .bind(slot.as_str())
        .bind(lsn)
        .bind(&acknowledged.0)
        .bind(acknowledged.1.map(|l| l.to_string()))
        .execute(&mut *conn)
        .await
        .map(drop)
    })
    .await
}

/// The messages the relay's record lists as acknowledged past its confirmed position, and
/// the end of the last transaction they cover (none without a record), within `timeout`.
pub(crate) async fn acknowledged_ids(
    pool: &PgPool,
    slot: &SlotName,
    timeout: Duration,
) -> Result<(Vec<Uuid>, Option<pgwire_replication::Lsn>), sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        let row: Option<(Vec<Uuid>, Option<String>)> = sqlx::query_as(
            "SELECT acknowledged_ids, acknowledged_until::text
             FROM outbox_wal_progress WHERE slot_name = $1",
        )
        .bind(slot.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(row.map_or((Vec::new(), None), |(ids, until)| {
            let until = until.and_then(|u| pgwire_replication::Lsn::parse(&u).ok());
            (ids, until)
        }))
    })
    .await
}

/// Deletes the table rows the relay read from the log and published, on a connection of
/// `pool`, within `timeout`; returns the ids deleted.
pub(crate) async fn delete_relayed(
    pool: &PgPool,
    rows: &[Uuid],
    timeout: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        outbox::store::delete_by_ids(&mut conn, rows).await
    })
    .await
}

/// For each transaction of `xids` (32-bit ids, as the log gives them, of transactions the
/// log shows committed), whether it is visible to a statement that starts now: a committed
/// transaction's rows stay invisible until its backend finishes committing, which can come
/// well after the log has it (a commit waiting for a synchronous standby).
pub(crate) async fn transactions_visible(
    pool: &PgPool,
    xids: &[u32],
    timeout: Duration,
) -> Result<Vec<bool>, sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        visible_in(&mut conn, xids, None).await
    })
    .await
}

/// [`transactions_visible`] against `snapshot` (`pg_snapshot` text), or the statement's own
/// when `None`. A 32-bit id is widened to the full id nearest the snapshot's `xmax` (within
/// 2^31 either way, by signed 32-bit distance): a transaction still committing can be at or
/// above `xmax` (latest completed + 1), and one from before an epoch boundary below it.
async fn visible_in(
    conn: &mut PgConnection,
    xids: &[u32],
    snapshot: Option<&str>,
) -> Result<Vec<bool>, sqlx::Error> {
    let xids: Vec<i64> = xids.iter().map(|x| i64::from(*x)).collect();
    sqlx::query_scalar(
        "SELECT pg_visible_in_snapshot(
                    (r + (((x - (r & 4294967295)) % 4294967296 + 4294967296 + 2147483648)
                          % 4294967296) - 2147483648)::text::xid8,
                    s)
         FROM (SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS s) AS snap
         CROSS JOIN LATERAL (SELECT pg_snapshot_xmax(snap.s)::text::bigint AS r) AS reference
         CROSS JOIN unnest($1::bigint[]) WITH ORDINALITY AS u(x, n)
         ORDER BY n",
    )
    .bind(&xids)
    .bind(snapshot)
    .fetch_all(&mut *conn)
    .await
}

/// The dead letter of a message that cannot be published.
pub(crate) fn dead_letter(poison: &Poison, reason: &str, attempts: u32) -> dlq::DeadLetter {
    dlq::DeadLetter {
        source: dlq::Source::Relay,
        consumer: "relay".to_owned(),
        message_id: poison.message_id.clone(),
        subject: poison.subject.clone(),
        partition_key: poison.partition_key.clone(),
        headers: poison.headers.clone(),
        payload: poison.payload.clone(),
        reason: reason.to_owned(),
        error_chain: vec![poison.error.clone()],
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        stream: None,
        stream_seq: None,
    }
}

/// Writes a dead letter on a connection of `pool`, within `timeout`.
pub(crate) async fn record_dead_letter(
    pool: &PgPool,
    letter: &dlq::DeadLetter,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    within(timeout, async {
        let mut conn = pool.acquire().await?;
        dlq::store::record(&mut conn, letter).await.map(drop)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In epoch 1 (ids above 2^32), with transaction 2^32+103 in progress and 2^32+105 the
    /// next to complete: an id at or above `xmax` is not visible (it is still committing),
    /// nor one in progress; the ones before, and one from the end of epoch 0, are.
    #[tokio::test]
    async fn ids_are_widened_by_their_distance_to_the_snapshot() {
        let pg = testkit::Postgres::start().await.expect("PostgreSQL");
        let url = pg.fresh_database().await.expect("db");
        let mut conn = <PgConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("connect");
        let snapshot = "4294967396:4294967401:4294967399";
        let cases: [(u32, bool); 6] = [
            (102, true),
            (103, false),
            (104, true),
            (105, false),
            (200, false),
            (u32::MAX, true),
        ];
        let xids: Vec<u32> = cases.iter().map(|(x, _)| *x).collect();
        let visible = visible_in(&mut conn, &xids, Some(snapshot))
            .await
            .expect("query");
        let expected: Vec<bool> = cases.iter().map(|(_, v)| *v).collect();
        assert_eq!(visible, expected, "for {xids:?}");
    }
}
