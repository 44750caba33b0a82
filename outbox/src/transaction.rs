//! Enqueues that ride with `COMMIT`: [`OutboxTransaction`].

use std::ops::{Deref, DerefMut};

use envelope::{Event, MessageId};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use crate::error::Error;
use crate::message::Message;
use crate::outbox::Outbox;
use crate::store::{self, literal::Batch};

/// A database transaction whose enqueued messages travel with its `COMMIT`: the enqueues
/// cost no round trip of their own. Made by [`Outbox::begin`].
///
/// Run the business statements on it as on a connection (`&mut *tx`); [`enqueue`] and
/// [`enqueue_message`] validate a message at once and buffer it; [`commit`] sends the
/// buffered messages (one multi-row `INSERT`, or with [`Storage::Log`](crate::Storage::Log)
/// one `pg_logical_emit_message` per message, the first behind the log storage's guard) and
/// `COMMIT` in one simple query.
///
/// # Guarantee
/// Atomic: the business changes and every buffered message commit together, or none does.
/// If [`commit`] returns an error, the messages were not written and the transaction was not
/// committed (as with any commit, a connection lost after `COMMIT` was sent leaves the
/// outcome unknown: the server may have committed). The values of a message reach the SQL only as base64 and
/// hex literals, so no payload, header or key can change the statement.
///
/// Dropped without [`commit`] or [`rollback`], after an error in either, or while one of its
/// calls is cancelled, the transaction is rolled back by closing its connection (the pool
/// opens a new one): a connection whose state is not known is never handed to the next
/// user.
///
/// Do not start a nested transaction (`begin()`) on it: it already is one, and the nested
/// `commit()` would end it, committing what came before without the buffered messages.
/// [`commit`] detects that case and writes nothing ([`Error::TransactionEnded`]), but what
/// the nested commit wrote stays. Buffered messages are written at commit, after anything
/// enqueued meanwhile through [`Outbox::enqueue`] on the same transaction: use one or the
/// other for messages of one key.
///
/// [`enqueue`]: OutboxTransaction::enqueue
/// [`enqueue_message`]: OutboxTransaction::enqueue_message
/// [`commit`]: OutboxTransaction::commit
/// [`rollback`]: OutboxTransaction::rollback
#[derive(Debug)]
pub struct OutboxTransaction {
    outbox: Outbox,
    /// `Some` until commit or rollback consumes the transaction.
    conn: Option<PoolConnection<Postgres>>,
    batch: Batch,
    ids: Vec<MessageId>,
}

impl Outbox {
    /// Begins a transaction on a connection from `pool` whose enqueues ride with `COMMIT`.
    pub async fn begin(&self, pool: &PgPool) -> Result<OutboxTransaction, Error> {
        let conn = pool.acquire().await.map_err(Error::Database)?;
        self.begin_on(conn).await
    }

    /// Begins such a transaction on a connection already taken from a pool.
    pub async fn begin_on(
        &self,
        conn: PoolConnection<Postgres>,
    ) -> Result<OutboxTransaction, Error> {
        // Held by the transaction before BEGIN is sent: if this future is dropped midway,
        // the transaction's drop closes the connection instead of pooling it.
        let mut tx = OutboxTransaction {
            outbox: self.clone(),
            conn: Some(conn),
            batch: Batch::new(self.storage()),
            ids: Vec::new(),
        };
        store::begin(&mut tx).await.map_err(Error::Database)?;
        Ok(tx)
    }
}

impl OutboxTransaction {
    /// Validates a typed event with default metadata and buffers it for [`commit`]; returns
    /// its id. An `Err` buffers nothing and leaves the transaction usable.
    ///
    /// [`commit`]: OutboxTransaction::commit
    pub fn enqueue<E: Event>(&mut self, event: &E) -> Result<MessageId, Error> {
        self.enqueue_message(Message::event(event)?)
    }

    /// Validates one message (typed or raw, with metadata) and buffers it for [`commit`];
    /// returns its id. Messages are written in the order they were buffered. An `Err`
    /// buffers nothing and leaves the transaction usable.
    ///
    /// [`commit`]: OutboxTransaction::commit
    pub fn enqueue_message(&mut self, message: Message) -> Result<MessageId, Error> {
        let envelope = self.outbox.prepare(message)?;
        self.batch.push(&envelope)?;
        self.ids.push(envelope.id);
        Ok(envelope.id)
    }

    /// The ids buffered so far, in order.
    pub fn enqueued(&self) -> &[MessageId] {
        &self.ids
    }

    /// Writes the buffered messages and commits, in one round trip. See the type's
    /// guarantee. A reused caller-chosen id (table storage) is [`Error::DuplicateId`].
    ///
    /// Also an error, with nothing written by it: a transaction that a failed statement
    /// aborted (PostgreSQL would answer a bare `COMMIT` with a silent rollback), and one
    /// that something ended before (a nested `begin()` and `commit()` on it):
    /// [`Error::TransactionEnded`].
    pub async fn commit(mut self) -> Result<(), Error> {
        let batch = std::mem::replace(&mut self.batch, Batch::new(self.outbox.storage()));
        // The connection stays in `self` while the commit is under way: if this future is
        // dropped midway, the drop closes it.
        match store::commit_with(&mut self, batch.finish(std::time::SystemTime::now())).await {
            Ok(()) => {
                // Committed: the connection goes back to the pool.
                self.conn.take();
                Ok(())
            }
            Err(e) if store::is_no_transaction(&e) => Err(Error::TransactionEnded),
            Err(e) => Err(store::classify(e, &self.ids)),
        }
    }

    /// Rolls back: nothing buffered is written.
    pub async fn rollback(mut self) -> Result<(), Error> {
        store::rollback(&mut self).await.map_err(Error::Database)?;
        self.conn.take();
        Ok(())
    }
}

impl Deref for OutboxTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_deref()
            .expect("the connection is held until commit or rollback consumes the transaction")
    }
}

impl DerefMut for OutboxTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("the connection is held until commit or rollback consumes the transaction")
    }
}

impl Drop for OutboxTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            // Uncommitted: closing the connection ends the transaction on the server.
            conn.close_on_drop();
        }
    }
}
