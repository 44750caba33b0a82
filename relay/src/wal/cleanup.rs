//! Deleting the table rows of resolved transactions before they are confirmed, with none
//! left behind.
//!
//! The log can carry a transaction before its rows are visible: its commit record is
//! written (and decoded, and published) before its backend finishes committing, and that
//! gap is long while the commit waits for a synchronous standby. A DELETE in that gap finds
//! nothing. So a row a DELETE does not find is looked for again once its transaction is
//! visible; only then is a row not found taken as already gone (deleted by an earlier
//! attempt whose reply was lost, or by hand). Until then the transaction is not confirmed,
//! nor any after it; the ones before it are (the pipeline confirms the batch's prefix whose
//! rows are all gone).

use std::collections::HashSet;
use std::time::Duration;

use pgwire_replication::Lsn;
use sqlx::PgPool;
use uuid::Uuid;

use super::store;

/// The most table rows one DELETE statement names.
pub(crate) const DELETE_CHUNK: usize = 5_000;

/// A transaction whose every message is acknowledged or dead-lettered, not yet confirmed.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// Its commit's end; `None` for a message outside a transaction.
    pub(crate) end_lsn: Option<Lsn>,
    /// Its id as the log gives it (0 when unknown; such a transaction holds no row).
    pub(crate) xid: u32,
    /// Its table rows still to delete.
    pub(crate) rows: Vec<Uuid>,
}

/// Why the rows of a batch are not all deleted yet.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A statement failed (the database is down, slow, or refused it).
    Database(String),
    /// This many rows belong to transactions committed in the log but not visible yet.
    NotVisible(usize),
}

/// Deletes the rows of `batch` in statements of at most [`DELETE_CHUNK`] ids, within
/// `timeout` each. Returns the batch with only the rows still to delete: none when `Ok`;
/// on an error, the transactions before the first with rows left are done.
pub(crate) async fn delete_rows(
    pool: PgPool,
    mut batch: Vec<Resolved>,
    timeout: Duration,
) -> (Vec<Resolved>, Result<(), Failure>) {
    let ids: Vec<Uuid> = batch.iter().flat_map(|t| t.rows.iter().copied()).collect();
    let deleted = match delete(&pool, &ids, timeout).await {
        Ok(deleted) => deleted,
        Err((deleted, e)) => {
            keep_undeleted(&mut batch, &ids, &deleted);
            return (batch, Err(e));
        }
    };
    if deleted.len() == ids.len() {
        clear(&mut batch);
        return (batch, Ok(()));
    }
    keep_undeleted(&mut batch, &ids, &deleted);
    // Each transaction with rows not found: visible now (its rows, if any, are gone or
    // visible to the next statement) or still committing (try it later).
    let waiting: Vec<usize> = (0..batch.len())
        .filter(|i| !batch[*i].rows.is_empty())
        .collect();
    let xids: Vec<u32> = waiting.iter().map(|i| batch[*i].xid).collect();
    let visible = match store::transactions_visible(&pool, &xids, timeout).await {
        Ok(visible) => visible,
        Err(e) => return (batch, Err(Failure::Database(e.to_string()))),
    };
    let mut missing: Vec<Uuid> = Vec::new();
    let mut invisible = 0;
    for (i, visible) in waiting.iter().zip(&visible) {
        // xid 0: no transaction (no rows); treated as visible.
        if *visible || batch[*i].xid == 0 {
            missing.append(&mut batch[*i].rows);
        } else {
            invisible += batch[*i].rows.len();
        }
    }
    // Visible now, so a statement from here on sees whichever of these rows still exist.
    match delete(&pool, &missing, timeout).await {
        Ok(deleted) => {
            if deleted.len() < missing.len() {
                tracing::debug!(
                    rows = missing.len() - deleted.len(),
                    "relayed outbox rows were already deleted"
                );
            }
        }
        Err((deleted, e)) => {
            // Put back the ones not deleted (see `restore`).
            let deleted: HashSet<&Uuid> = deleted.iter().collect();
            let left: Vec<Uuid> = missing
                .into_iter()
                .filter(|id| !deleted.contains(id))
                .collect();
            restore(&mut batch, &left, &waiting);
            return (batch, Err(e));
        }
    }
    if invisible > 0 {
        return (batch, Err(Failure::NotVisible(invisible)));
    }
    (batch, Ok(()))
}

/// Deletes `ids` chunk by chunk; returns the ids deleted, with the error that stopped it.
async fn delete(
    pool: &PgPool,
    ids: &[Uuid],
    timeout: Duration,
) -> Result<Vec<Uuid>, (Vec<Uuid>, Failure)> {
    let mut deleted = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(DELETE_CHUNK) {
        match store::delete_relayed(pool, chunk, timeout).await {
            Ok(gone) => deleted.extend(gone),
            Err(e) => return Err((deleted, Failure::Database(e.to_string()))),
        }
    }
    Ok(deleted)
}

/// Leaves in each transaction of `batch` only its rows not in `deleted` (a subset of `ids`).
fn keep_undeleted(batch: &mut [Resolved], ids: &[Uuid], deleted: &[Uuid]) {
    if deleted.len() == ids.len() {
        return clear(batch);
    }
    let deleted: HashSet<&Uuid> = deleted.iter().collect();
    for txn in batch {
        txn.rows.retain(|id| !deleted.contains(id));
    }
}

/// Gives the rows of `left` (not deleted when the second delete failed part way) back to
/// the batch: to the first of `waiting` that is now empty, the earliest transaction they
/// can have come from. That holds back confirmation of it and of everything after it until
/// they are deleted; nothing is confirmed early.
fn restore(batch: &mut [Resolved], left: &[Uuid], waiting: &[usize]) {
    if left.is_empty() {
        return;
    }
    if let Some(first) = waiting.iter().find(|i| batch[**i].rows.is_empty()) {
        batch[*first].rows.extend_from_slice(left);
    }
}

fn clear(batch: &mut [Resolved]) {
    for txn in batch {
        txn.rows.clear();
    }
}
