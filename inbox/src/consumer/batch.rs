//! Batched mode: a batch in one transaction, on the fast path without savepoints, or with a
//! savepoint per message to isolate a failing one.

use std::collections::HashMap;

use async_nats::jetstream;
use sqlx::{Acquire, PgConnection};

use super::Consumer;
use super::failure::{Fault, release_failed};
use super::transaction::{Ran, Reply, check_not_aborted, commit};
use crate::metrics as m;
use crate::store;

impl Consumer {
    /// Handles one message in a savepoint of `conn` (the batch's transaction): inserts its
    /// inbox row, runs the handler, and resolves a failure here (the savepoint rolled back,
    /// the attempt counted and the message NAKed, or parked, through `conn`). Returns the
    /// reply and whether the handler's effects are in (to count once the batch commits).
    async fn handle_in_savepoint(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<(Reply, bool), sqlx::Error> {
        let mut read = match self.read(message) {
            Ok(read) => read,
            Err(park) => {
                let reply = self.park_unread(conn, message, park).await?;
                return Ok((reply, false));
            }
        };
        let subject = message.subject.as_str();
        let mut sp = self.db(conn.begin()).await?;
        let Some(failed) = self
            .db(store::insert_new_taking_attempts(
                &mut sp,
                &self.config.name,
                &read.id,
                subject,
                read.seq,
            ))
            .await?
        else {
            self.db(sp.commit()).await?;
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok((Reply::Ack, false));
        };
        let attempt = failed.saturating_add(1);
        read.delivery.attempt = attempt;
        let error = match self.run_handler(&mut sp, &read.delivery).await {
            Ok(()) => match self.db(sp.commit()).await {
                Ok(()) => return Ok((Reply::Ack, true)),
                // Rolled back to the savepoint before the next statement (see
                // `release_failed`).
                Err(e) => self.aborted(release_failed(e)?, &read.id),
            },
            Err(error) => {
                self.settle_after(&mut sp, &error).await;
                self.db(sp.rollback()).await?;
                error
            }
        };
        let ran = Ran {
            id: read.id,
            attempt,
        };
        let reply = self.resolve_failure(conn, message, error, &ran).await?;
        Ok((reply, false))
    }

    /// Handles a batch in one transaction with a savepoint per message, so that a failing
    /// handler is resolved alone and the others commit.
    pub(super) async fn with_savepoints(
        &self,
        conn: &mut PgConnection,
        batch: &[jetstream::Message],
    ) -> Result<Vec<Reply>, Fault> {
        let mut tx = self.db(conn.begin()).await?;
        let mut replies = Vec::with_capacity(batch.len());
        let mut processed = 0;
        for message in batch {
            let (reply, ran) = self.handle_in_savepoint(&mut tx, message).await?;
            processed += u64::from(ran);
            replies.push(reply);
        }
        commit(tx, self.config.db_timeout).await?;
        self.count_processed(processed);
        Ok(replies)
    }

    /// The batched fast path: one statement inserts every inbox row, then the handlers run
    /// one after the other in the same transaction without savepoints (or the batch handler
    /// runs once for all new messages), and it commits: two round trips per message fewer
    /// than a savepoint each. Returns `None`, having rolled everything back, when a message
    /// does not decode or a handler fails; the caller then runs the batch again with
    /// savepoints, which isolates the failure (the failed run here does not count as an
    /// attempt: the rerun's does). Handlers may thus run twice for one delivery, but only
    /// the second run can commit (the handler contract allows this: the first transaction
    /// did not commit). A handler that left the transaction aborted (it ignored a failed
    /// statement) is caught before COMMIT by [`check_not_aborted`] (one round trip per
    /// batch) and treated the same way. A refused COMMIT is returned as [`Fault::Commit`].
    pub(super) async fn try_batch_without_savepoints(
        &self,
        conn: &mut PgConnection,
        batch: &[jetstream::Message],
    ) -> Result<Option<Vec<Reply>>, Fault> {
        let mut reads = Vec::with_capacity(batch.len());
        for message in batch {
            let Ok(read) = self.read(message) else {
                return Ok(None);
            };
            reads.push(read);
        }
        let ids: Vec<String> = reads.iter().map(|r| r.id.clone()).collect();
        let subjects: Vec<String> = batch.iter().map(|m| m.subject.to_string()).collect();
        let seqs: Vec<Option<i64>> = reads.iter().map(|r| r.seq).collect();
        let mut tx = self.db(conn.begin()).await?;
        // New rows, with the failed attempts counted for them, in one statement.
        let mut new: HashMap<String, u32> = self
            .db(store::insert_many_new_taking_attempts(
                &mut tx,
                &self.config.name,
                &ids,
                &subjects,
                &seqs,
            ))
            .await?
            .into_iter()
            .collect();
        let mut fresh = Vec::with_capacity(new.len());
        let mut duplicates = 0;
        for read in reads {
            // Taking the id out makes a second copy in the same batch a duplicate.
            if let Some(failed) = new.remove(&read.id) {
                let mut delivery = read.delivery;
                delivery.attempt = failed.saturating_add(1);
                fresh.push(delivery);
            } else {
                duplicates += 1;
            }
        }
        let handled = fresh.len() as u64;
        let result = match &self.batch_handler {
            Some(batch_handler) if !fresh.is_empty() => {
                self.run_batch_handler(&mut tx, batch_handler.as_ref(), &fresh)
                    .await
            }
            Some(_) => Ok(()),
            None => {
                let mut result = Ok(());
                for delivery in &fresh {
                    result = self.run_handler(&mut tx, delivery).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        };
        let result = match result {
            Ok(()) if handled > 0 => self.db(check_not_aborted(&mut tx)).await?,
            other => other,
        };
        if let Err(error) = result {
            // Not an attempt: the rerun with savepoints pins it on its message.
            tracing::debug!(consumer = %self.config.name, error = %error, "a handler failed in a batch; running it again with a savepoint per message");
            self.settle_after(&mut tx, &error).await;
            self.db(tx.rollback()).await?;
            return Ok(None);
        }
        commit(tx, self.config.db_timeout).await?;
        self.count_processed(handled);
        metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone())
            .increment(duplicates);
        Ok(Some(vec![Reply::Ack; batch.len()]))
    }
}
