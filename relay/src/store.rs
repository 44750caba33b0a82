//! All SQL on the relay's own tables, `relay_instance` and `relay_partition_lease`.
//! (Statements on `outbox_message` live in `outbox::store`, on `dead_letter` in `dlq::store`.)

use sqlx::PgConnection;

/// The number of outbox partitions: a row belongs to partition
/// `hashtextextended(partition_key, 0) & 255` (see `outbox::store::claim_batch`).
pub const PARTITIONS: i64 = 256;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Records that `instance` is alive now.
pub async fn heartbeat(conn: &mut PgConnection, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_instance (instance_id) VALUES ($1)
         ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()",
    )
    .bind(instance)
    .execute(conn)
    .await?;
    Ok(())
}

/// How many instances heartbeated within `ttl` (at least 1: the caller).
pub async fn live_instances(
    conn: &mut PgConnection,
    ttl: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay_instance
         WHERE heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(ms(ttl))
    .fetch_one(conn)
    .await?;
    Ok(n.max(1))
}

/// Extends the leases `instance` still holds; returns their partitions, ascending.
pub async fn renew_leases(
    conn: &mut PgConnection,
    instance: &str,
    ttl: std::time::Duration,
) -> Result<Vec<i16>, sqlx::Error> {
    let mut owned: Vec<i16> = sqlx::query_scalar(
        "UPDATE relay_partition_lease SET lease_until = now() + make_interval(secs => $2)
         WHERE owner = $1 RETURNING partition_id",
    )
    .bind(instance)
    .bind(ms(ttl))
    .fetch_all(conn)
    .await?;
    owned.sort_unstable();
    Ok(owned)
}

/// Takes up to `count` partitions that have no owner or an expired lease; returns them.
///
/// Lease rows locked by an open claim transaction (the claim share-locks the lease rows of
/// the partitions it reads) are skipped: a partition whose previous owner still has a claim
/// open is taken at a later round, once that claim has ended, so the new owner can never
/// publish a row of a key ahead of an earlier row the previous owner still holds.
pub async fn acquire_leases(
    conn: &mut PgConnection,
    instance: &str,
    count: i64,
    ttl: std::time::Duration,
) -> Result<Vec<i16>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE relay_partition_lease SET owner = $1, acquired_at = now(),
             lease_until = now() + make_interval(secs => $3)
         WHERE partition_id IN (
             SELECT partition_id FROM relay_partition_lease
             WHERE owner IS NULL OR lease_until < now()
             ORDER BY partition_id
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING partition_id",
    )
    .bind(instance)
    .bind(count)
    .bind(ms(ttl))
    .fetch_all(conn)
    .await
}

/// Gives up the listed partitions of `instance` (or all of them when `partitions` is None).
pub async fn release_leases(
    conn: &mut PgConnection,
    instance: &str,
    partitions: Option<&[i16]>,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE relay_partition_lease SET owner = NULL, lease_until = NULL, acquired_at = NULL
         WHERE owner = $1 AND ($2::smallint[] IS NULL OR partition_id = ANY($2))",
    )
    .bind(instance)
    .bind(partitions)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Removes `instance` from the live set (on clean shutdown).
pub async fn forget_instance(conn: &mut PgConnection, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM relay_instance WHERE instance_id = $1")
        .bind(instance)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes instances silent for longer than `older_than` (housekeeping).
pub async fn forget_dead_instances(
    conn: &mut PgConnection,
    older_than: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM relay_instance WHERE heartbeat_at < now() - make_interval(secs => $1)",
    )
    .bind(ms(older_than))
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// One row of `relay status`: an instance and how many partitions it holds.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct InstanceStatus {
    /// The instance id.
    pub instance_id: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_seconds: f64,
    /// Partitions it holds with a live lease.
    pub partitions: i64,
}

/// Every known instance with its live partition count, most partitions first.
pub async fn instances(conn: &mut PgConnection) -> Result<Vec<InstanceStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.instance_id,
                extract(epoch FROM now() - i.heartbeat_at)::float8 AS heartbeat_age_seconds,
                count(l.partition_id) AS partitions
         FROM relay_instance i
         LEFT JOIN relay_partition_lease l ON l.owner = i.instance_id AND l.lease_until > now()
         GROUP BY i.instance_id, i.heartbeat_at
         ORDER BY partitions DESC, i.instance_id",
    )
    .fetch_all(conn)
    .await
}

/// The application name a relay instance's database sessions carry, so that its sessions
/// and open claims can be told apart: `relay <instance id>`; for an id that would not fit
/// PostgreSQL's 63 bytes or is not printable ASCII (which PostgreSQL would rewrite), its
/// printable ASCII start and a hash of the whole id (`relay <start>~<16 hex digits>`), so that
/// two instances never share a name.
pub fn application_name(instance: &str) -> String {
    let plain = format!("relay {instance}");
    if plain.len() <= 63 && instance.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return plain;
    }
    // FNV-1a, 64 bits: stable across processes and versions (the console computes it too).
    let hash = instance.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let start: String = instance
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .take(63 - "relay ".len() - 17)
        .collect();
    format!("relay {start}~{hash:016x}")
}

/// Who holds each of the 256 partitions.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PartitionOwner {
    /// The partition, 0..255.
    pub partition_id: i16,
    /// The instance holding a live lease on it; `None` when nobody does.
    pub owner: Option<String>,
}

/// Every partition, in order, with its live owner.
pub async fn partition_owners(conn: &mut PgConnection) -> Result<Vec<PartitionOwner>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition_id, CASE WHEN lease_until > now() THEN owner END AS owner
         FROM relay_partition_lease ORDER BY partition_id",
    )
    .fetch_all(conn)
    .await
}

/// A registered instance's database sessions, from `pg_stat_activity` (by
/// [`application_name`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct InstanceSessions {
    /// The instance id.
    pub instance_id: String,
    /// Its sessions to this database.
    pub sessions: i64,
    /// Of those, the ones inside a transaction: its open claims (each claim is a
    /// transaction that holds its rows' locks) and any write in progress.
    pub in_transaction: i64,
    /// Of those, the ones whose state this role may not see (it needs `pg_read_all_stats`
    /// or membership in the relay's role): `in_transaction` does not count them.
    pub hidden: i64,
}

/// The sessions of every registered instance that has one.
pub async fn instance_sessions(
    conn: &mut PgConnection,
) -> Result<Vec<InstanceSessions>, sqlx::Error> {
    let instances: Vec<String> =
        sqlx::query_scalar("SELECT instance_id FROM relay_instance ORDER BY instance_id")
            .fetch_all(&mut *conn)
            .await?;
    let names: Vec<String> = instances.iter().map(|i| application_name(i)).collect();
    sqlx::query_as(
        "SELECT i.instance_id,
                count(*) AS sessions,
                count(*) FILTER (WHERE a.xact_start IS NOT NULL) AS in_transaction,
                count(*) FILTER (WHERE a.state IS NULL) AS hidden
         FROM unnest($1::text[], $2::text[]) AS i(instance_id, application_name)
         JOIN pg_stat_activity a ON a.application_name = i.application_name
                                AND a.datname = current_database()
         GROUP BY i.instance_id ORDER BY i.instance_id",
    )
    .bind(&instances)
    .bind(&names)
    .fetch_all(conn)
    .await
}

/// Installs the statement-level trigger that sends `NOTIFY outbox_message` after inserts,
/// for relays running with `listen_notify`. It costs producers a notification per
/// transaction (PostgreSQL serialises commits that notify), which is why it is optional.
pub async fn enable_notify(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION outbox_message_notify() RETURNS trigger
         LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('outbox_message', '');
             RETURN NULL;
         END $$;
         DROP TRIGGER IF EXISTS outbox_message_notify ON outbox_message;
         CREATE TRIGGER outbox_message_notify AFTER INSERT ON outbox_message
             FOR EACH STATEMENT EXECUTE FUNCTION outbox_message_notify();",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes the notify trigger (relays fall back to polling alone).
pub async fn disable_notify(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "DROP TRIGGER IF EXISTS outbox_message_notify ON outbox_message;
         DROP FUNCTION IF EXISTS outbox_message_notify();",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether the notify trigger is installed.
pub async fn notify_enabled(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgname = 'outbox_message_notify'
                          AND tgrelid = 'outbox_message'::regclass)",
    )
    .fetch_one(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::application_name;

    #[test]
    fn application_names_fit_and_stay_distinct() {
        assert_eq!(application_name("relay-a"), "relay relay-a");
        let long_a = format!("{}-a", "pod".repeat(30));
        let long_b = format!("{}-b", "pod".repeat(30));
        let (a, b) = (application_name(&long_a), application_name(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b, "the cut part still tells them apart");
        assert_eq!(a, application_name(&long_a), "stable");
        let odd = application_name("relé-1");
        assert!(odd.is_ascii() && odd.starts_with("relay rel-1~"), "{odd}");
    }
}
