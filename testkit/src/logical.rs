//! Reading the outbox's logical decoding messages in tests, without a replication
//! connection: a `pgoutput` slot read through SQL (`pg_logical_slot_get_binary_changes`).
//!
//! [`create_message_slot`] creates a publication and a slot of one name; [`take_messages`]
//! consumes what the slot has decoded since and returns the logical messages (`'M'`
//! records) with their prefixes, in commit order. The relay itself streams over the
//! replication protocol; these two functions are for checking what producers wrote.

use sqlx::PgConnection;

use crate::error::{Error, Result};

/// Creates publication `name` (empty: messages only) and a `pgoutput` slot `name`. Run it
/// outside a transaction that has written: PostgreSQL refuses to create a slot there.
pub async fn create_message_slot(conn: &mut PgConnection, name: &str) -> Result<()> {
    // Identifiers from the test itself, quoted anyway.
    let publication = format!("CREATE PUBLICATION \"{}\"", name.replace('"', "\"\""));
    sqlx::raw_sql(sqlx::AssertSqlSafe(publication))
        .execute(&mut *conn)
        .await
        .map_err(|source| Error::Sql {
            what: format!("create publication {name}"),
            source,
        })?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(name)
        .execute(&mut *conn)
        .await
        .map_err(|source| Error::Sql {
            what: format!("create slot {name}"),
            source,
        })?;
    Ok(())
}

/// Consumes slot `name` (made by [`create_message_slot`]) and returns each logical message
/// it decoded, as (prefix, content), in commit order. Rolled-back messages never appear.
pub async fn take_messages(conn: &mut PgConnection, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let changes: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
            'proto_version', '1', 'publication_names', $1, 'messages', 'true')",
    )
    .bind(name)
    .fetch_all(&mut *conn)
    .await
    .map_err(|source| Error::Sql {
        what: format!("read slot {name}"),
        source,
    })?;
    changes
        .iter()
        .filter(|data| data.first() == Some(&b'M'))
        .map(|data| {
            parse_message(data).ok_or_else(|| Error::Sql {
                what: format!("read slot {name}"),
                source: sqlx::Error::Protocol("malformed pgoutput message record".into()),
            })
        })
        .collect()
}

/// 'M', flags (1), lsn (8), prefix (NUL-terminated), length (4), content.
fn parse_message(data: &[u8]) -> Option<(String, Vec<u8>)> {
    let rest = data.get(10..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let prefix = String::from_utf8(rest[..nul].to_vec()).ok()?;
    let len_bytes = rest.get(nul + 1..nul + 5)?;
    let len = u32::from_be_bytes(len_bytes.try_into().ok()?) as usize;
    let content = rest.get(nul + 5..nul + 5 + len)?;
    Some((prefix, content.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::parse_message;

    #[test]
    fn parses_a_message_record_and_refuses_truncated_ones() {
        let mut record = vec![b'M', 1];
        record.extend_from_slice(&7u64.to_be_bytes());
        record.extend_from_slice(b"outbox\0");
        record.extend_from_slice(&3u32.to_be_bytes());
        record.extend_from_slice(b"abc");
        assert_eq!(
            parse_message(&record),
            Some(("outbox".to_owned(), b"abc".to_vec()))
        );
        for cut in 0..record.len() {
            assert_eq!(parse_message(&record[..cut]), None, "cut at {cut}");
        }
    }
}
