//! Lanes: each handles its messages in order, keeps them alive with progress acks while it
//! holds them, and sends the replies once their transaction is over.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Consumer;
use super::failure::Fault;
use super::transaction::Reply;
use crate::config::Mode;
use crate::store;

/// A message on its way to its lane's handler, with when the broker last heard of it: its
/// delivery to this process (when the reader took it) or its latest progress ack.
pub(super) struct Queued {
    pub(super) message: jetstream::Message,
    pub(super) touched: Instant,
}

/// One lane: handles its messages in order, one transaction per message or per batch, on a
/// connection it keeps between batches (saving the pool's checkout and liveness check per
/// transaction) and gives back after a database error.
///
/// While a batch is handled the lane keeps taking messages from its channel into its own
/// queue (up to [`Consumer::max_ack_pending`]), and every [`Consumer::progress_period`] it
/// sends a progress ack for each message of the batch and of the queue not heard of for half
/// that period, so that `ack_wait` does not run out behind a slow handler. Progress acks are
/// only sent while the batch's transaction is in progress, and the replies (ack, NAK, term)
/// after it, by this task alone: unsent progress acks are dropped before the replies go, so
/// a progress ack never follows a message's NAK (which would replace the NAK's delay by
/// `ack_wait`). Progress acks are never awaited in place of the handler (see
/// [`keep_alive`]), and the replies wait at most [`REPLY_TIMEOUT`] for the NATS client, so
/// that a NATS outage does not hold a transaction open or stop shutdown. A handler past
/// `handler_timeout` is dropped, which ends the progress acks of its message.
pub(super) async fn lane(
    consumer: Arc<Consumer>,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
) {
    let max = consumer.batch_size();
    let hold = consumer.max_ack_pending();
    let period = consumer.progress_period();
    let mut keepalive = tokio::time::interval(period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<LaneConnection> = None;
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut open = true;
    loop {
        if queue.is_empty() {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                next = rx.recv() => match next {
                    Some(queued) => queue.push_back(queued),
                    None => break,
                },
            }
        } else if stop.is_cancelled() {
            break;
        }
        while queue.len() < max {
            match rx.try_recv() {
                Ok(queued) => queue.push_back(queued),
                Err(_) => break,
            }
        }
        let (batch, mut touched): (Vec<jetstream::Message>, Vec<Instant>) = queue
            .drain(..queue.len().min(max))
            .map(|q| (q.message, q.touched))
            .unzip();
        let replies = {
            let work = handle_batch(&consumer, &mut conn, &batch);
            tokio::pin!(work);
            // The progress acks being sent, polled next to the handler's work (never
            // awaited in its stead) and bounded by `period`.
            let mut progress: Option<futures::future::BoxFuture<'static, ()>> = None;
            loop {
                tokio::select! {
                    replies = &mut work => break replies,
                    () = async { progress.as_mut().expect("guarded").await }, if progress.is_some() => {
                        progress = None;
                    }
                    next = rx.recv(), if open && queue.len() < hold => match next {
                        Some(queued) => queue.push_back(queued),
                        None => open = false,
                    },
                    _ = keepalive.tick() => {
                        if progress.is_some() {
                            // The previous ones are still waiting for the client: skip.
                            continue;
                        }
                        let Some(due) = Instant::now().checked_sub(period / 2) else {
                            continue;
                        };
                        let held = batch
                            .iter()
                            .zip(touched.iter_mut())
                            .chain(queue.iter_mut().map(|q| (&q.message, &mut q.touched)));
                        progress = keep_alive(&consumer, held, due, period);
                    }
                }
            }
            // Dropping unsent progress acks here keeps them from following the replies.
        };
        send_replies(
            &consumer,
            batch.iter().zip(replies.into_iter().map(Reply::kind)),
        )
        .await;
    }
    // Pulled but not started: hand back for immediate redelivery (not a handler attempt).
    rx.close();
    let mut rest: Vec<jetstream::Message> = queue.into_iter().map(|q| q.message).collect();
    while let Some(queued) = rx.recv().await {
        rest.push(queued.message);
    }
    send_replies(
        &consumer,
        rest.iter().map(|message| (message, AckKind::Nak(None))),
    )
    .await;
}

/// The longest a lane waits for the NATS client to take the replies of one batch (or the
/// NAKs at shutdown). The client's command channel is full only while it cannot write to the
/// server (during a reconnect it does not read the channel at all); past this the rest are
/// dropped: a lost ack means a redelivery that the inbox row turns into a skip, a lost NAK
/// or term a redelivery after `ack_wait`. Without the bound a NATS outage would hold the
/// lane, and shutdown, until the server is back.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `replies`, within [`REPLY_TIMEOUT`] for all of them.
async fn send_replies<'a>(
    consumer: &Consumer,
    replies: impl Iterator<Item = (&'a jetstream::Message, AckKind)>,
) {
    let name = &consumer.config.name;
    let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
        for (message, kind) in replies {
            if let Err(e) = message.ack_with(kind).await {
                // Committed effects with a lost ack mean a redelivery that the inbox row
                // turns into a skip; a lost NAK means a redelivery after ack_wait.
                tracing::warn!(consumer = %name, error = %e, "ack failed; the message will be redelivered");
            }
        }
    })
    .await;
    if sent.is_err() {
        tracing::warn!(consumer = %name, timeout = ?REPLY_TIMEOUT, "the NATS client did not take the acks in time (disconnected?); the messages will be redelivered");
    }
}

/// Progress acks (`AckKind::Progress`, which restarts the broker's `ack_wait`) for each
/// held message last heard of at or before `due`, as a future for the lane to poll next to
/// its handler, bounded by `within`; `None` if there are none to send or the client is not
/// connected. The lane never waits for it: while async-nats reconnects it stops reading its
/// command channel, so an awaited send could block for the whole outage with the handler's
/// transaction open (holding its locks). Acks that do not leave in time are dropped and the
/// messages marked heard of all the same (the next ones go a period later); if NATS stays
/// away longer than `ack_wait` the broker redelivers them, which the inbox tolerates.
fn keep_alive<'a>(
    consumer: &Consumer,
    held: impl Iterator<Item = (&'a jetstream::Message, &'a mut Instant)>,
    due: Instant,
    within: Duration,
) -> Option<futures::future::BoxFuture<'static, ()>> {
    let client = consumer.jetstream.client();
    if client.connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let now = Instant::now();
    let mut subjects = Vec::new();
    for (message, touched) in held {
        if *touched > due {
            continue;
        }
        if let Some(reply) = &message.reply {
            subjects.push(reply.clone());
        }
        *touched = now;
    }
    if subjects.is_empty() {
        return None;
    }
    let name = consumer.config.name.clone();
    Some(Box::pin(async move {
        let sent = tokio::time::timeout(within, async {
            for subject in subjects {
                if let Err(e) = client.publish(subject, AckKind::Progress.into()).await {
                    tracing::debug!(consumer = %name, error = %e, "progress ack failed");
                }
            }
        })
        .await;
        if sent.is_err() {
            tracing::debug!(consumer = %name, "progress acks not sent in time; dropped");
        }
    }))
}

/// Handles messages in one transaction and returns the replies to send once it is over.
/// Strict mode runs each message alone ([`Consumer::handle_alone`]). Batched mode first
/// tries the fast path ([`Consumer::try_batch_without_savepoints`]); when a handler fails
/// there, the batch is rolled back and run again with a savepoint per message. When the
/// database refuses the batch's COMMIT (a deferred constraint, a serialization failure),
/// the batch is run again one message at a time, each in its own transaction, so that the
/// others commit and only the message whose commit fails is retried (and parked with reason
/// `commit_failed` after `max_attempts`). If the database fails otherwise, nothing is acked
/// and no attempt is counted: the messages are NAKed with a delay that grows with their
/// delivery count (from `retry_min_delay` to `retry_max_delay`).
async fn handle_batch(
    consumer: &Consumer,
    held: &mut Option<LaneConnection>,
    batch: &[jetstream::Message],
) -> Vec<Reply> {
    let outcome = async {
        let lane = match held {
            Some(lane) => lane,
            None => {
                let mut conn = consumer.db(consumer.pool.acquire()).await?;
                let backend_pid = consumer.db(store::backend_pid(&mut conn)).await?;
                held.insert(LaneConnection { conn, backend_pid })
            }
        };
        LANE_BACKEND
            .scope(lane.backend_pid, handle_on(consumer, &mut lane.conn, batch))
            .await
    }
    .await;
    match outcome {
        Ok(replies) => {
            consumer.health.set_database(true);
            replies
        }
        Err(e) => {
            consumer.health.set_database(false);
            // The connection may be broken (or silent: a release to the pool would ping it
            // and wait): close it, and take a fresh one for the next batch.
            if let Some(mut lane) = held.take() {
                lane.conn.close_on_drop();
            }
            // Backed off with each message's delivery count, so that an outage redelivers
            // ever more slowly instead of every retry_min_delay.
            let delays: Vec<Duration> = batch
                .iter()
                .map(|message| {
                    let delivered = message.info().map_or(1, |i| i.delivered);
                    consumer.backoff(u32::try_from(delivered).unwrap_or(u32::MAX))
                })
                .collect();
            tracing::warn!(consumer = %consumer.config.name, error = %e, first_retry_in = ?delays.first(), "database failed; messages will be redelivered");
            delays.into_iter().map(Reply::Nak).collect()
        }
    }
}

/// [`handle_batch`]'s work on the lane's connection.
async fn handle_on(
    consumer: &Consumer,
    conn: &mut PgConnection,
    batch: &[jetstream::Message],
) -> Result<Vec<Reply>, sqlx::Error> {
    let together = if consumer.config.mode == Mode::Strict {
        // Batches of one: nothing to pin a refused COMMIT on but the message itself.
        Err(None)
    } else {
        match consumer.try_batch_without_savepoints(conn, batch).await {
            Ok(Some(replies)) => Ok(replies),
            Ok(None) => consumer.with_savepoints(conn, batch).await.map_err(Some),
            Err(fault) => Err(Some(fault)),
        }
    };
    match together {
        Ok(replies) => Ok(replies),
        Err(Some(Fault::Database(e))) => Err(e),
        Err(refused) => {
            if let Some(Fault::Commit(e)) = refused {
                consumer.count_commit_failure();
                tracing::warn!(consumer = %consumer.config.name, messages = batch.len(), error = %e, "the database refused the batch's COMMIT; running its messages one at a time");
            }
            let mut replies = Vec::with_capacity(batch.len());
            for message in batch {
                replies.push(consumer.handle_alone(conn, message).await?);
            }
            Ok(replies)
        }
    }
}

/// A lane's pool connection and the pid of its server backend (to cancel a handler's
/// statement that outlives `handler_timeout`, see [`Consumer::catching`]).
struct LaneConnection {
    conn: PoolConnection<Postgres>,
    backend_pid: i32,
}

tokio::task_local! {
    /// The backend pid of the lane connection the current handler runs on.
    pub(super) static LANE_BACKEND: i32;
}
