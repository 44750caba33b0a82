//! The stream check: every stream the outboxes published to, read completely, against every
//! outbox row (each published row in its stream once, agreeing with the row; each partition
//! key's messages in commit order). With the WAL source the rows are the witness's (see
//! `witness`), and the copies that a relay kept down past the duplicate window re-sent are
//! told apart from duplicates (see [`ResendAllowance`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use demo_services::events;
use uuid::Uuid;

use crate::stack::{Source, Stack};
use crate::store;

/// One row of a service's `outbox_message`, as the stream check reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Which database.
    pub outbox: &'static str,
    /// The message id (`Nats-Msg-Id`).
    pub id: Uuid,
    /// Commit-ordered position.
    pub seq: i64,
    /// The partition key (`ce-partitionkey`).
    pub partition_key: String,
    /// `pending` or `published` (a table row), or `relayed` (a message the WAL witness saw
    /// committed: it must be in the stream, with no PubAck recorded to compare).
    pub status: String,
    /// The stream of its PubAck.
    pub stream: Option<String>,
    /// The stream sequence of its PubAck.
    pub stream_seq: Option<i64>,
    /// The end of its commit in the write-ahead log (witnessed messages only).
    pub end_lsn: Option<i64>,
}

/// The re-sends a WAL relay kept down past the stream's duplicate window may make: after its
/// restart it publishes again what its slot had not confirmed when it was killed, and the
/// stream, which no longer remembers those ids, stores them a second time (the consumers'
/// inboxes absorb them). Only those: a copy of anything it had confirmed, of another
/// outbox, or stored at any other time is a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResendAllowance {
    /// The relay's outbox (`orders` or `inventory`).
    pub outbox: &'static str,
    /// The relay's confirmed position (the greater of its slot's and its own record, where
    /// it resumes) once the killed relay had let go of the slot.
    pub confirmed_lsn: i64,
    /// The end of the log just after the relay was killed: it cannot have read anything
    /// committed later.
    pub killed_at_lsn: i64,
    /// The stream's last sequence just before the relay was restarted.
    pub stream_seq_at_restart: u64,
}

/// One message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The stream.
    pub stream: String,
    /// Its sequence there.
    pub seq: u64,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// Its `ce-partitionkey` header.
    pub partition_key: Option<String>,
}

/// What the stream check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamFindings {
    /// Messages read from the streams.
    pub msgs: usize,
    /// Distinct partition keys among them.
    pub keys: usize,
    /// Published rows (and committed probes) whose id is not in their stream.
    pub missing: usize,
    /// Extra copies of an id in the streams (after JetStream's dedup, a copy means a publish
    /// was retried after the duplicate window), apart from the allowed re-sends.
    pub dups: usize,
    /// Extra copies that a [`ResendAllowance`] explains (re-sent after a relay was down
    /// longer than the duplicate window).
    pub resends: usize,
    /// Messages whose id no outbox row (nor committed probe) has.
    pub unknown: usize,
    /// Rows whose stream message disagrees with them: partition key header, or the stream
    /// and sequence of the PubAck recorded on the row.
    pub mismatch: usize,
    /// First occurrences of a key's ids out of the `seq` (commit) order of that outbox's
    /// rows: each id that first appears after an id of the same key and outbox with a
    /// higher `seq`.
    pub key_order_violations: usize,
    /// An example of each kind of problem, readable.
    pub problems: Vec<String>,
}

impl StreamFindings {
    /// Whether everything held.
    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.dups == 0
            && self.unknown == 0
            && self.mismatch == 0
            && self.key_order_violations == 0
    }
}

/// Checks the streams' messages (`entries`, any order) against the outbox rows of every
/// service and the ids of committed probes (whose rows must be there too, or at least their
/// messages); extra copies that `resends` explains are counted apart.
pub fn check_stream_contents(
    rows: &[OutboxRow],
    committed: &[Uuid],
    entries: &[StreamEntry],
    resends: Option<ResendAllowance>,
) -> StreamFindings {
    let mut entries: Vec<&StreamEntry> = entries.iter().collect();
    entries.sort_by(|a, b| (&a.stream, a.seq).cmp(&(&b.stream, b.seq)));
    let by_id: HashMap<Uuid, &OutboxRow> = rows.iter().map(|r| (r.id, r)).collect();
    let committed: HashSet<Uuid> = committed.iter().copied().collect();
    let mut findings = StreamFindings {
        msgs: entries.len(),
        keys: entries
            .iter()
            .filter_map(|e| e.partition_key.as_deref())
            .collect::<HashSet<_>>()
            .len(),
        ..StreamFindings::default()
    };
    let first = |kind: &str, text: String, problems: &mut Vec<String>| {
        if !problems.iter().any(|p| p.starts_with(kind)) {
            problems.push(format!("{kind}: {text}"));
        }
    };
    let mut problems = Vec::new();

    // Where each id is, in stream order.
    let mut occurrences: HashMap<Uuid, Vec<&StreamEntry>> = HashMap::new();
    for entry in &entries {
        match entry.msg_id.as_deref().map(Uuid::parse_str) {
            Some(Ok(id)) => {
                if !by_id.contains_key(&id) && !committed.contains(&id) {
                    findings.unknown += 1;
                    first(
                        "unknown",
                        format!(
                            "{}:{} has id {id}, which no outbox row has",
                            entry.stream, entry.seq
                        ),
                        &mut problems,
                    );
                }
                occurrences.entry(id).or_default().push(entry);
            }
            _ => {
                findings.unknown += 1;
                first(
                    "unknown",
                    format!(
                        "{}:{} has Nats-Msg-Id {:?}, not an outbox id",
                        entry.stream, entry.seq, entry.msg_id
                    ),
                    &mut problems,
                );
            }
        }
    }
    let mut duplicated: Vec<(&Uuid, &Vec<&StreamEntry>)> =
        occurrences.iter().filter(|(_, at)| at.len() > 1).collect();
    duplicated.sort_by_key(|(_, at)| (&at[0].stream, at[0].seq));
    for (id, at) in &duplicated {
        let resent = resends.is_some_and(|allowed| {
            by_id.get(id).is_some_and(|row| {
                row.outbox == allowed.outbox
                    && row.end_lsn.is_some_and(|end| {
                        end > allowed.confirmed_lsn && end <= allowed.killed_at_lsn
                    })
            }) && at.len() == 2
                && at[0].seq <= allowed.stream_seq_at_restart
                && at[1].seq > allowed.stream_seq_at_restart
        });
        if resent {
            findings.resends += 1;
            continue;
        }
        findings.dups += at.len() - 1;
        let row = by_id.get(id).map_or_else(
            || "no row".to_owned(),
            |r| format!("{} outbox seq {} key {}", r.outbox, r.seq, r.partition_key),
        );
        first(
            "duplicate",
            format!(
                "id {id} ({row}) is stored {} times: {}",
                at.len(),
                at.iter()
                    .map(|e| format!("{}:{}", e.stream, e.seq))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &mut problems,
        );
    }

    // Every published row in its stream, agreeing with the row.
    let mut rows_sorted: Vec<&OutboxRow> = rows.iter().collect();
    rows_sorted.sort_by_key(|r| (r.outbox, r.seq));
    for row in rows_sorted
        .iter()
        .filter(|r| r.status == "published" || r.status == "relayed")
    {
        let stream = row.stream.as_deref().unwrap_or(events::STREAM);
        let at: Vec<&&StreamEntry> = occurrences
            .get(&row.id)
            .into_iter()
            .flatten()
            .filter(|e| e.stream == stream)
            .collect();
        if at.is_empty() {
            findings.missing += 1;
            first(
                "missing",
                format!(
                    "{} outbox row {} (seq {}, key {}) is published (stream {:?} seq {:?}) but not in {stream}",
                    row.outbox, row.id, row.seq, row.partition_key, row.stream, row.stream_seq
                ),
                &mut problems,
            );
            continue;
        }
        let recorded = row
            .stream_seq
            .is_some_and(|s| at.iter().any(|e| e.seq as i64 == s));
        if row.status == "published" && (row.stream.is_none() || !recorded) {
            findings.mismatch += 1;
            first(
                "mismatch",
                format!(
                    "{} outbox row {} records PubAck {:?}:{:?} but is at {}",
                    row.outbox,
                    row.id,
                    row.stream,
                    row.stream_seq,
                    at.iter()
                        .map(|e| format!("{}:{}", e.stream, e.seq))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &mut problems,
            );
        }
        if let Some(e) = at
            .iter()
            .find(|e| e.partition_key.as_deref() != Some(row.partition_key.as_str()))
        {
            findings.mismatch += 1;
            first(
                "mismatch",
                format!(
                    "{} outbox row {} has key {} but {}:{} has ce-partitionkey {:?}",
                    row.outbox, row.id, row.partition_key, e.stream, e.seq, e.partition_key
                ),
                &mut problems,
            );
        }
    }
    // A committed probe whose row is gone must at least be in the stream.
    let mut gone: Vec<&Uuid> = committed
        .iter()
        .filter(|id| !by_id.contains_key(id) && !occurrences.contains_key(id))
        .collect();
    gone.sort();
    findings.missing += gone.len();
    if let Some(id) = gone.first() {
        first(
            "missing",
            format!(
                "probe {id} was committed but is neither in its outbox nor in the stream ({} such)",
                gone.len()
            ),
            &mut problems,
        );
    }

    // Per key (and outbox: one order's events come from two), first occurrences in seq order.
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut last: HashMap<(&str, &str, &str), (&OutboxRow, &StreamEntry)> = HashMap::new();
    for entry in &entries {
        let Some(Ok(id)) = entry.msg_id.as_deref().map(Uuid::parse_str) else {
            continue;
        };
        let Some(row) = by_id.get(&id) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let key = entry
            .partition_key
            .as_deref()
            .unwrap_or(row.partition_key.as_str());
        let group = (entry.stream.as_str(), key, row.outbox);
        match last.get(&group) {
            Some((before, at)) if before.seq > row.seq => {
                findings.key_order_violations += 1;
                first(
                    "key order",
                    format!(
                        "key {key} ({} outbox): seq {} ({}) first appears at {}:{}, after seq {} ({}) at {}:{}",
                        row.outbox,
                        row.seq,
                        row.id,
                        entry.stream,
                        entry.seq,
                        before.seq,
                        before.id,
                        at.stream,
                        at.seq
                    ),
                    &mut problems,
                );
            }
            _ => {
                last.insert(group, (row, entry));
            }
        }
    }
    findings.problems = problems;
    findings
}

/// Every `outbox_message` row of the service databases (none for a database without the
/// table).
async fn outbox_rows(stack: &Stack) -> anyhow::Result<Vec<OutboxRow>> {
    let mut rows = Vec::new();
    for (outbox, pool) in [
        ("orders", &stack.db.orders),
        ("inventory", &stack.db.inventory),
        ("email", &stack.db.email),
    ] {
        let mut conn = pool.acquire().await?;
        let found = store::outbox_rows(&mut conn)
            .await
            .with_context(|| format!("reading the {outbox} outbox"))?;
        rows.extend(found.into_iter().flatten().map(
            |(id, seq, partition_key, status, stream, stream_seq)| OutboxRow {
                outbox,
                id,
                seq,
                partition_key,
                status,
                stream,
                stream_seq,
                end_lsn: None,
            },
        ));
    }
    Ok(rows)
}

/// Every message of the stream `name`, read by sequence (8 readers at once).
async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<Vec<StreamEntry>> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("opening the stream {name}"))?;
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let (first, last) = (state.first_sequence, state.last_sequence);
    const READERS: u64 = 8;
    let mut readers = tokio::task::JoinSet::new();
    for r in 0..READERS {
        let stream = stream.clone();
        let name = name.to_owned();
        readers.spawn(async move {
            let mut out = Vec::new();
            let mut seq = first + r;
            while seq <= last {
                let mut attempt = 0;
                let message = loop {
                    match stream.get_raw_message(seq).await {
                        Ok(m) => break m,
                        Err(e) if attempt >= 10 => {
                            return Err(
                                anyhow!(e).context(format!("reading {name} sequence {seq}"))
                            );
                        }
                        Err(_) => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                let header = |h: &str| message.headers.get(h).map(|v| v.as_str().to_owned());
                out.push(StreamEntry {
                    stream: name.clone(),
                    seq: message.sequence,
                    msg_id: header("Nats-Msg-Id"),
                    partition_key: header("ce-partitionkey"),
                });
                seq += READERS;
            }
            anyhow::Ok(out)
        });
    }
    let mut entries = Vec::with_capacity(state.messages as usize);
    while let Some(done) = readers.join_next().await {
        entries.extend(done.context("a stream reader panicked")??);
    }
    Ok(entries)
}

/// The stream check, after quiescence: every stream the outboxes published to (and the
/// saga's), read completely, against every outbox row (with the WAL source: every message
/// the witness saw committed).
pub(super) async fn check_streams(
    stack: &Stack,
    committed: &[Uuid],
    resends: Option<ResendAllowance>,
) -> anyhow::Result<StreamFindings> {
    let rows = match stack.source {
        Source::Table => outbox_rows(stack).await?,
        Source::Wal => super::witness::committed(stack).await?,
    };
    let mut streams: Vec<String> = rows.iter().filter_map(|r| r.stream.clone()).collect();
    streams.push(events::STREAM.to_owned());
    streams.sort();
    streams.dedup();
    let client = demo_services::platform::NatsConfig {
        url: stack.nats_url.clone(),
        ..demo_services::platform::NatsConfig::default()
    }
    .connect()
    .await
    .context("connecting to NATS for the stream check")?;
    let js = async_nats::jetstream::new(client);
    let mut entries = Vec::new();
    for name in &streams {
        entries.extend(read_stream(&js, name).await?);
    }
    Ok(check_stream_contents(&rows, committed, &entries, resends))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(outbox: &'static str, seq: i64, key: &str, stream_seq: i64) -> OutboxRow {
        OutboxRow {
            outbox,
            id: Uuid::from_u128(seq as u128 + if outbox == "orders" { 0 } else { 1 << 64 }),
            seq,
            partition_key: key.to_owned(),
            status: "published".to_owned(),
            stream: Some("DEMO".to_owned()),
            stream_seq: Some(stream_seq),
            end_lsn: None,
        }
    }

    fn entry(seq: u64, row: &OutboxRow) -> StreamEntry {
        StreamEntry {
            stream: "DEMO".to_owned(),
            seq,
            msg_id: Some(row.id.to_string()),
            partition_key: Some(row.partition_key.clone()),
        }
    }

    #[test]
    fn the_stream_check_passes_a_faithful_stream() {
        // Two outboxes share key "o1" (an order's events come from both): each outbox's
        // rows are in seq order, interleaved with the other's.
        let rows = vec![
            row("orders", 1, "o1", 1),
            row("orders", 2, "hot", 3),
            row("inventory", 1, "o1", 2),
            row("orders", 3, "o1", 4),
            row("inventory", 2, "o1", 5),
            row("orders", 4, "hot", 6),
        ];
        let entries: Vec<StreamEntry> = rows
            .iter()
            .map(|r| entry(r.stream_seq.expect("recorded") as u64, r))
            .rev()
            .collect();
        let found = check_stream_contents(&rows, &[rows[0].id], &entries, None);
        assert!(found.clean(), "{found:?}");
        assert_eq!((found.msgs, found.keys), (6, 2));
    }

    #[test]
    fn the_stream_check_finds_missing_duplicated_unknown_and_reordered_messages() {
        let rows = vec![
            row("orders", 1, "hot", 2),
            row("orders", 2, "hot", 1),
            row("orders", 3, "k", 3),
            row("orders", 4, "k", 4),
            row("orders", 5, "k2", 9),
        ];
        let mut entries: Vec<StreamEntry> = rows[..4]
            .iter()
            .map(|r| entry(r.stream_seq.expect("recorded") as u64, r))
            .collect();
        // The second copy of seq 3 (published again after the dedup window) is not a
        // reordering: first occurrences count.
        entries.push(entry(5, &rows[2]));
        entries.push(StreamEntry {
            stream: "DEMO".to_owned(),
            seq: 6,
            msg_id: Some(Uuid::from_u128(99).to_string()),
            partition_key: Some("x".to_owned()),
        });
        let found = check_stream_contents(&rows, &[], &entries, None);
        assert_eq!(found.missing, 1, "{found:?}");
        assert_eq!(found.dups, 1, "{found:?}");
        assert_eq!(found.unknown, 1, "{found:?}");
        assert_eq!(found.key_order_violations, 1, "{found:?}");
        assert_eq!(found.mismatch, 0, "{found:?}");
        assert_eq!(found.problems.len(), 4, "{:?}", found.problems);
        assert!(!found.clean());

        // A wrong PubAck sequence or key header is a mismatch; a committed probe that is
        // neither in its outbox nor in the stream is missing.
        let mut bad = rows[..1].to_vec();
        bad[0].stream_seq = Some(7);
        let mut wrong_key = entry(2, &bad[0]);
        wrong_key.partition_key = Some("other".to_owned());
        let found = check_stream_contents(&bad, &[Uuid::from_u128(42)], &[wrong_key], None);
        assert_eq!((found.mismatch, found.missing), (2, 1), "{found:?}");
    }

    #[test]
    fn only_unconfirmed_messages_of_the_long_down_relay_may_be_stored_again_after_its_restart() {
        let witnessed = |outbox: &'static str, seq: i64, end_lsn: i64| OutboxRow {
            status: "relayed".to_owned(),
            stream: None,
            stream_seq: None,
            end_lsn: Some(end_lsn),
            ..row(outbox, seq, "k", 0)
        };
        let rows = [
            witnessed("orders", 1, 100),
            witnessed("orders", 2, 200),
            witnessed("inventory", 1, 300),
            witnessed("orders", 3, 400),
        ];
        let allowed = ResendAllowance {
            outbox: "orders",
            confirmed_lsn: 150,
            killed_at_lsn: 250,
            stream_seq_at_restart: 3,
        };
        let faithful: Vec<StreamEntry> =
            vec![entry(1, &rows[0]), entry(2, &rows[1]), entry(3, &rows[2])];
        let found = check_stream_contents(&rows[..3], &[], &faithful, Some(allowed));
        assert!(
            found.clean(),
            "no PubAck is expected of witnessed rows: {found:?}"
        );

        // Seq 2 was not confirmed when the relay died: its copy after the restart is a
        // re-send. Seq 1 was confirmed, and the inventory relay was not down: duplicates.
        let mut entries = faithful.clone();
        entries.push(entry(4, &rows[1]));
        let found = check_stream_contents(&rows[..3], &[], &entries, Some(allowed));
        assert_eq!((found.resends, found.dups), (1, 0), "{found:?}");
        assert!(found.clean());
        entries.push(entry(5, &rows[0]));
        entries.push(entry(6, &rows[2]));
        let found = check_stream_contents(&rows[..3], &[], &entries, Some(allowed));
        assert_eq!((found.resends, found.dups), (1, 2), "{found:?}");
        // Seq 3 committed after the kill: the relay never read it before, so a copy of it
        // before the restart and another after is a duplicate, not a re-send.
        let late = vec![entry(1, &rows[3]), entry(4, &rows[3])];
        let found = check_stream_contents(&rows[3..], &[], &late, Some(allowed));
        assert_eq!((found.resends, found.dups), (0, 1), "{found:?}");
        // A copy stored before the restart is no re-send of it either.
        let early = vec![entry(1, &rows[0]), entry(2, &rows[1]), entry(3, &rows[1])];
        let found = check_stream_contents(&rows[..2], &[], &early, Some(allowed));
        assert_eq!((found.resends, found.dups), (0, 1), "{found:?}");
        // Without an allowance every copy is a duplicate.
        let found = check_stream_contents(&rows[..3], &[], &entries, None);
        assert_eq!((found.resends, found.dups), (0, 3), "{found:?}");
    }
}
