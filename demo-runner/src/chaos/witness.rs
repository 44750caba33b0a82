//! The witness of a WAL run: what was committed to each outbox, in commit order.
//!
//! With log storage there are no `outbox_message` rows to compare the streams with, and the
//! WAL relay deletes the rows other producers write. So before the load, a second pgoutput
//! slot (the witness) is created in each service database next to the relay's; read once
//! after quiescence, it gives every outbox message committed meanwhile (logical messages
//! with the `outbox` prefix and `outbox_message` INSERTs), each with the end position of its
//! commit. It is decoded here independently of the relay's decoder (text tuples, not the
//! relay's binary ones), so a decoding bug in the relay is not mirrored by the check.

use std::collections::HashMap;

use anyhow::{Context as _, anyhow, bail};
use uuid::Uuid;

use super::streams::OutboxRow;
use crate::stack::{INVENTORY_SLOT, ORDER_SLOT, Stack};
use crate::store;

/// The witness slot of the outbox `outbox` (`orders` or `inventory`).
fn witness_slot(outbox: &str) -> String {
    format!("chaos_witness_{outbox}")
}

/// The outboxes a WAL run witnesses: name, database, publication (the relay's).
fn outboxes(stack: &Stack) -> [(&'static str, &sqlx::PgPool, &'static str); 2] {
    [
        ("orders", &stack.db.orders, ORDER_SLOT),
        ("inventory", &stack.db.inventory, INVENTORY_SLOT),
    ]
}

/// Creates the witness slots (before anything is written to the outboxes).
pub(super) async fn create(stack: &Stack) -> anyhow::Result<()> {
    for (outbox, pool, _) in outboxes(stack) {
        let mut conn = pool.acquire().await?;
        store::create_witness_slot(&mut conn, &witness_slot(outbox))
            .await
            .with_context(|| format!("creating the witness slot of the {outbox} outbox"))?;
    }
    Ok(())
}

/// Every message committed to the witnessed outboxes, as rows whose `seq` is the commit
/// order within their outbox and `end_lsn` the end of their commit (status `relayed`: each
/// must be in the stream, with no PubAck recorded anywhere to compare).
pub(super) async fn committed(stack: &Stack) -> anyhow::Result<Vec<OutboxRow>> {
    let mut rows = Vec::new();
    for (outbox, pool, publication) in outboxes(stack) {
        let mut conn = pool.acquire().await?;
        let changes = store::take_witness_changes(&mut conn, &witness_slot(outbox), publication)
            .await
            .with_context(|| format!("reading the witness slot of the {outbox} outbox"))?;
        rows.extend(
            decode(outbox, &changes)
                .with_context(|| format!("decoding the witness of the {outbox} outbox"))?,
        );
    }
    Ok(rows)
}

/// A cursor over one pgoutput record.
struct Record<'a>(&'a [u8]);

impl<'a> Record<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("pgoutput record cut short");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> anyhow::Result<String> {
        let nul = self
            .0
            .iter()
            .position(|&b| b == 0)
            .context("pgoutput string without its NUL")?;
        let text = String::from_utf8(self.take(nul)?.to_vec())?;
        self.take(1)?;
        Ok(text)
    }
}

/// The outbox messages of pgoutput `changes` (proto_version 1, text tuples, messages on) in
/// commit order.
pub fn decode(outbox: &'static str, changes: &[(i64, Vec<u8>)]) -> anyhow::Result<Vec<OutboxRow>> {
    // Relation id -> its column names, for `outbox_message` only.
    let mut relations: HashMap<u32, Vec<String>> = HashMap::new();
    let mut open: Vec<(Uuid, String)> = Vec::new();
    let mut rows = Vec::new();
    let commit = |found: &mut Vec<(Uuid, String)>, end_lsn: i64, rows: &mut Vec<OutboxRow>| {
        for (id, partition_key) in found.drain(..) {
            rows.push(OutboxRow {
                outbox,
                id,
                seq: rows.len() as i64 + 1,
                partition_key,
                status: "relayed".to_owned(),
                stream: None,
                stream_seq: None,
                end_lsn: Some(end_lsn),
            });
        }
    };
    for (lsn, data) in changes {
        let mut r = Record(data);
        match r.u8()? {
            b'R' => {
                let id = r.u32()?;
                let _namespace = r.string()?;
                let name = r.string()?;
                let _identity = r.u8()?;
                let columns = r.u16()?;
                let mut names = Vec::with_capacity(columns.into());
                for _ in 0..columns {
                    let _flags = r.u8()?;
                    names.push(r.string()?);
                    let _type = r.u32()?;
                    let _modifier = r.u32()?;
                }
                if name == "outbox_message" {
                    relations.insert(id, names);
                } else {
                    relations.remove(&id);
                }
            }
            b'I' => {
                let Some(names) = relations.get(&r.u32()?) else {
                    continue;
                };
                if r.u8()? != b'N' {
                    bail!("INSERT without a new tuple");
                }
                let columns = r.u16()?;
                let mut values: HashMap<&str, String> = HashMap::new();
                for i in 0..columns as usize {
                    match r.u8()? {
                        b'n' | b'u' => {}
                        b't' => {
                            let len = r.u32()? as usize;
                            let text = String::from_utf8(r.take(len)?.to_vec())?;
                            if let Some(name) = names.get(i) {
                                values.insert(name, text);
                            }
                        }
                        other => bail!("tuple column of kind {:?}", other as char),
                    }
                }
                let id = values.remove("id").context("outbox row without id")?;
                let key = values
                    .remove("partition_key")
                    .context("outbox row without partition_key")?;
                open.push((Uuid::parse_str(&id)?, key));
            }
            b'M' => {
                let flags = r.u8()?;
                let _lsn = r.i64()?;
                let prefix = r.string()?;
                let len = r.u32()? as usize;
                let content = r.take(len)?;
                if prefix != envelope::wal::PREFIX {
                    continue;
                }
                let message = envelope::wal::decode(content)
                    .map_err(|e| anyhow!("an outbox log message at {lsn} does not decode: {e}"))?;
                let found = (
                    Uuid::from(message.id),
                    message.partition_key.as_str().to_owned(),
                );
                if flags & 1 == 1 {
                    open.push(found);
                } else {
                    commit(&mut vec![found], *lsn, &mut rows);
                }
            }
            b'C' => {
                let _flags = r.u8()?;
                let _commit_lsn = r.i64()?;
                let end_lsn = r.i64()?;
                commit(&mut open, end_lsn, &mut rows);
            }
            b'B' if !open.is_empty() => bail!("a transaction began inside another"),
            // Origin, type, truncate: nothing of the outbox.
            _ => {}
        }
    }
    if !open.is_empty() {
        bail!("the witness ends inside a transaction");
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn relation(id: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut r = vec![b'R'];
        r.extend_from_slice(&id.to_be_bytes());
        string(&mut r, "public");
        string(&mut r, name);
        r.push(b'd');
        r.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for c in columns {
            r.push(0);
            string(&mut r, c);
            r.extend_from_slice(&25u32.to_be_bytes());
            r.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        r
    }

    fn insert(id: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut r = vec![b'I'];
        r.extend_from_slice(&id.to_be_bytes());
        r.push(b'N');
        r.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => r.push(b'n'),
                Some(v) => {
                    r.push(b't');
                    r.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    r.extend_from_slice(v.as_bytes());
                }
            }
        }
        r
    }

    fn commit(end_lsn: i64) -> Vec<u8> {
        let mut r = vec![b'C', 0];
        r.extend_from_slice(&(end_lsn - 8).to_be_bytes());
        r.extend_from_slice(&end_lsn.to_be_bytes());
        r.extend_from_slice(&0i64.to_be_bytes());
        r
    }

    /// A log message of an event whose partition key is `order` (as a string).
    fn message(order: Uuid, id: Uuid, prefix: &str) -> Vec<u8> {
        let event = demo_services::events::InventoryReservationFailed {
            order_id: order,
            reason: "test".to_owned(),
        };
        let source = envelope::HeaderText::new("source", "test").expect("source");
        let mut envelope = envelope::Envelope::from_event(source, &event).expect("envelope");
        envelope.id = envelope::MessageId::from_uuid(id);
        let content = envelope::wal::encode(&envelope).expect("encode");
        let mut r = vec![b'M', 1];
        r.extend_from_slice(&5i64.to_be_bytes());
        string(&mut r, prefix);
        r.extend_from_slice(&(content.len() as u32).to_be_bytes());
        r.extend_from_slice(&content);
        r
    }

    #[test]
    fn the_witness_decodes_rows_and_messages_in_commit_order() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let (k1, k2) = (Uuid::from_u128(11), Uuid::from_u128(12));
        let (k1s, k2s) = (k1.to_string(), k2.to_string());
        let columns = ["id", "seq", "partition_key"];
        let changes = vec![
            (10, b"B".to_vec()),
            (11, relation(7, "outbox_message", &columns)),
            (
                12,
                insert(7, &[Some(&a.to_string()), Some("1"), Some(&k1s)]),
            ),
            (13, relation(8, "other", &["id"])),
            (14, insert(8, &[Some("x")])),
            (15, message(k2, b, "outbox")),
            (16, message(k2, c, "not-ours")),
            (17, commit(100)),
            (18, b"B".to_vec()),
            (19, message(k1, c, "outbox")),
            (20, commit(200)),
        ];
        let rows = decode("orders", &changes).expect("decodes");
        let seen: Vec<(Uuid, &str, i64, Option<i64>)> = rows
            .iter()
            .map(|r| (r.id, r.partition_key.as_str(), r.seq, r.end_lsn))
            .collect();
        assert_eq!(
            seen,
            vec![
                (a, k1s.as_str(), 1, Some(100)),
                (b, k2s.as_str(), 2, Some(100)),
                (c, k1s.as_str(), 3, Some(200))
            ]
        );
        // Cut records and unfinished transactions are errors, never silently fewer rows.
        let unfinished = &changes[..changes.len() - 1];
        assert!(decode("orders", unfinished).is_err());
        let mut cut = changes.clone();
        cut[2].1.truncate(10);
        assert!(decode("orders", &cut).is_err());
    }
}
