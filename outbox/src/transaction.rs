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
/// buffered messages (one multi-row `INSERT`, or one log emit with
/// [`Storage::Log`](crate::Storage::Log)) and `COMMIT` in one simple query.
///
/// # Guarantee
/// Atomic: the business changes and every buffered message commit together, or none does.
/// If [`commit`] returns an error, the messages were not written and the transaction was not
/// committed (as with any commit, a connection lost after `COMMIT` was sent leaves the
/// outcome unknown: the server may have committed). The values of a message reach the SQL only as base64 and
/// hex literals, so no payload, header or key can change the statement.
///
/// Dropped without [`commit`] or [`rollback`], or after an error in either, the transaction
/// is rolled back by closing its connection (the pool opens a new one): a connection whose
/// state is not known is never handed to the next user. Do not start a nested transaction
/// (`begin()`) on it; it is already a transaction, and a nested `commit()` would end it.
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
        mut conn: PoolConnection<Postgres>,
    ) -> Result<OutboxTransaction, Error> {
        if let Err(e) = store::begin(&mut conn).await {
            conn.close_on_drop();
            return Err(Error::Database(e));
        }
        Ok(OutboxTransaction {
            outbox: self.clone(),
            conn: Some(conn),
            batch: Batch::new(self.storage()),
            ids: Vec::new(),
        })
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
    pub async fn commit(mut self) -> Result<(), Error> {
        let batch = std::mem::replace(&mut self.batch, Batch::new(self.outbox.storage()));
        let mut conn = self.take_connection();
        match store::commit_with(&mut conn, batch.finish()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                conn.close_on_drop();
                Err(store::classify(e, &self.ids))
            }
        }
    }

    /// Rolls back: nothing buffered is written.
    pub async fn rollback(mut self) -> Result<(), Error> {
        let mut conn = self.take_connection();
        store::rollback(&mut conn).await.map_err(|e| {
            conn.close_on_drop();
            Error::Database(e)
        })
    }

    fn take_connection(&mut self) -> PoolConnection<Postgres> {
        self.conn
            .take()
            .expect("the connection is held until commit or rollback consumes the transaction")
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
