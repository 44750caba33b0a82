//! The publishing pipeline: claim, publish with many PubAcks in flight, mark, all overlapped.
//!
//! A claim is a transaction: it locks a batch of pending rows (`FOR UPDATE SKIP LOCKED`) and
//! stays open while they are published; when every row of the batch is resolved, the
//! published marks, failed attempts and dead letters are written in that transaction and it
//! commits (one commit per batch). Rows the batch did not publish need no write: they are
//! pending all along and the commit unlocks them. Several claims are open at once, so the next
//! batch is claimed and the previous one committed while messages are on the wire.
//!
//! One task owns the state below and reacts to whichever finishes first: a PubAck, a claim,
//! a batch's commit, a late write, a poll timer or a wakeup.
//!
//! Per-key order: rows are queued per partition key in `seq` order and only the head of a
//! key's queue is ever in flight; rows of a key claimed later (in another batch) are appended
//! behind it. A key's queue is *given up* when its head fails, when its head waited so long
//! that its claim could end before the ack, and on stop: its rows stay pending but stay
//! locked until their batches end, and a claim meanwhile would skip them (`SKIP LOCKED`) and
//! return the key's later rows. So a given-up key is *blocked* by every open batch that
//! locks one of its given-up rows: claims leave it out (`skip_keys`), rows of it that a claim
//! returns anyway are left unqueued (their batch then blocks the key too), and a claim that
//! was already running when the last block ended still treats the key as blocked (its
//! snapshot may predate that commit). Once a failure is committed, the claim statement itself skips
//! the key while its head waits out the backoff. So no later message of a key overtakes an
//! earlier one.
//!
//! The publish window: at most `max_in_flight` PubAcks are awaited at once (the publisher
//! may block beyond that, and only this task frees room by polling the acks). Keys whose
//! head is ready while the window is full wait in a FIFO and are sent as acks come back.
//!
//! Every database step has a deadline (`db_timeout`), so a silent connection cannot hang the
//! pipeline. A claim or a commit that timed out may leave its transaction open at the
//! server, holding row locks this task no longer tracks; no claim starts until the server
//! has ended it (`claim_ttl`, its idle-in-transaction timeout).
//!
//! If a batch cannot commit (the database went away), its rows' locks are gone with the
//! session. The PubAcks it held are written later on a fresh connection, with backoff; until
//! then a claim that returns one of those rows marks it without publishing it again.
//!
//! This file is the event loop; `outcome` holds what a batch's rows came to and writes it
//! (published marks, failed attempts and their retry delay, dead letters).

mod outcome;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envelope::Envelope;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use outbox::deadline::{is_timeout, within};
use outbox::store::{self as outbox_store, ClaimedRow, Failure, Published};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::outcome::{
    Dead, Outcome, Unwritten, WriteSettings, backoff, end_batch, retry_delay, write_late,
};
use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::publisher::{Ack, PublishError, PublishErrorKind, Publisher};

type ClaimTx = Transaction<'static, Postgres>;

/// A claim's open transaction, its rows and when the statement returned them (the server
/// counts the transaction idle from then).
type Claimed = Result<(ClaimTx, Vec<ClaimedRow>, Instant), sqlx::Error>;

/// A claimed row waiting in its key's queue.
struct Row {
    claimed: ClaimedRow,
    envelope: Result<Envelope, envelope::Error>,
    batch: u64,
    claimed_at: Instant,
}

/// An open claim transaction and what its rows came to so far.
struct Batch {
    tx: ClaimTx,
    /// Rows not resolved yet (queued or in flight).
    open: usize,
    outcome: Outcome,
    /// Keys blocked until this batch ends (it locks rows of them it will not publish), once
    /// per block taken (see [`Dispatcher::block_key`]).
    blocks_keys: Vec<Arc<str>>,
}

/// A resolved PubAck.
struct Done {
    key: Arc<str>,
    sent_at: Instant,
    result: Result<Ack, PublishError>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// A batch's commit: its holds-back keys and whatever could not be written.
type Finishing =
    FuturesUnordered<Pin<Box<dyn Future<Output = (Vec<Arc<str>>, Result<(), Unwritten>)> + Send>>>;

/// The pipeline's state; see the module docs.
pub(crate) struct Dispatcher<P> {
    config: RelayConfig,
    pool: PgPool,
    publisher: Arc<P>,
    health: Health,
    wake: Arc<Notify>,
    queues: HashMap<Arc<str>, VecDeque<Row>>,
    /// Rows claimed and not yet resolved (queued or in flight).
    claimed_rows: usize,
    in_flight: InFlight,
    /// Keys whose head is in flight.
    sending: HashSet<Arc<str>>,
    /// Keys whose head waits for room in the publish window, in arrival order (a key may be
    /// listed twice; the second entry finds it sending or gone and is dropped).
    ready: VecDeque<Arc<str>>,
    /// Open claims by number.
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    finishing: Finishing,
    /// Keys that open batches block, with how many blocks (see the module docs).
    blocked_keys: HashMap<Arc<str>, usize>,
    /// Whether a claim statement is running.
    claiming: bool,
    /// Keys whose last block ended while the running claim was under way: that claim's
    /// snapshot may predate the commit that ended the block, so it still treats them as
    /// blocked.
    released_during_claim: HashSet<Arc<str>>,
    /// PubAcks whose batch could not commit, to be written on their own; by id, so that a
    /// claim returning one of those rows marks it instead of publishing it again.
    late_published: HashMap<Uuid, Published>,
    /// Dead letters whose batch could not commit.
    late_dead: HashMap<Uuid, Dead>,
    stopping: bool,
    stopping_since: Option<Instant>,
    next_claim_at: Instant,
    /// No claim before this (a broker pause, transactions that may still hold locks); only
    /// ever moved later.
    claims_blocked_until: Instant,
    /// The end of the current pause after broker failures.
    broker_paused_until: Instant,
    idle_delay: Duration,
    broker_backoff: Option<backon::ExponentialBackoff>,
    db_backoff: Option<backon::ExponentialBackoff>,
}

impl<P: Publisher> Dispatcher<P> {
    pub(crate) fn new(
        config: RelayConfig,
        pool: PgPool,
        publisher: Arc<P>,
        health: Health,
        wake: Arc<Notify>,
    ) -> Self {
        let idle_delay = config.poll_min_interval;
        Dispatcher {
            config,
            pool,
            publisher,
            health,
            wake,
            queues: HashMap::new(),
            claimed_rows: 0,
            in_flight: FuturesUnordered::new(),
            sending: HashSet::new(),
            ready: VecDeque::new(),
            batches: HashMap::new(),
            next_batch: 0,
            finishing: FuturesUnordered::new(),
            blocked_keys: HashMap::new(),
            claiming: false,
            released_during_claim: HashSet::new(),
            late_published: HashMap::new(),
            late_dead: HashMap::new(),
            stopping: false,
            stopping_since: None,
            next_claim_at: Instant::now(),
            claims_blocked_until: Instant::now(),
            broker_paused_until: Instant::now(),
            idle_delay,
            broker_backoff: None,
            db_backoff: None,
        }
    }

    /// Runs until `stop`, then finishes what is in flight, gives up what was claimed and not
    /// sent, commits every batch, and returns.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut claim: Option<JoinHandle<Claimed>> = None;
        let mut late_write: Option<JoinHandle<Result<(), Unwritten>>> = None;
        let mut late_retry_at = Instant::now();
        loop {
            let now = Instant::now();
            let room = self.claimed_rows + self.config.batch_size.min(self.config.max_in_flight)
                <= self.config.max_claimed_rows();
            let open = self.batches.len() + self.finishing.len();
            let can_claim =
                !self.stopping && claim.is_none() && room && open < self.config.max_open_claims;
            let claim_at = self.next_claim_at.max(self.claims_blocked_until);
            if can_claim && now >= claim_at {
                claim = Some(self.spawn_claim());
                self.claiming = true;
            }
            let late = !self.late_published.is_empty() || !self.late_dead.is_empty();
            let can_write_late = late_write.is_none() && late;
            if can_write_late && now >= late_retry_at {
                late_write = Some(self.spawn_late_write());
            }
            if self.stopping
                && claim.is_none()
                && self.in_flight.is_empty()
                && self.claimed_rows == 0
                && self.batches.is_empty()
                && self.finishing.is_empty()
                && late_write.is_none()
            {
                if !late {
                    break;
                }
                if self
                    .stopping_since
                    .is_some_and(|t| now.duration_since(t) > self.config.claim_ttl)
                {
                    // The database stayed unreachable: these rows are pending and will be
                    // published again (deduplicated by the broker within its window).
                    tracing::warn!(
                        rows = self.late_published.len(),
                        "stopping without marking every published row: the database is unreachable"
                    );
                    break;
                }
            }
            self.health.set_in_flight(self.in_flight.len());
            metrics::gauge!(m::IN_FLIGHT).set(self.in_flight.len() as f64);

            // Timers are armed from the same `now` as the decisions above, so a deadline that
            // passes in between still wakes the loop (sleep_until a past instant returns at once).
            let claim_timer = can_claim && claim.is_none();
            let late_timer = can_write_late && late_write.is_none();
            tokio::select! {
                _ = stop.cancelled(), if !self.stopping => {
                    tracing::info!(in_flight = self.in_flight.len(), claimed_rows = self.claimed_rows, "stopping: finishing in-flight messages and giving up the rest");
                    self.stopping = true;
                    self.stopping_since = Some(Instant::now());
                    self.give_up_all_queued();
                }
                Some(done) = self.in_flight.next() => self.on_ack(done).await,
                Some((keys, result)) = self.finishing.next() => self.on_finished(keys, result),
                joined = async { claim.as_mut().expect("guarded").await }, if claim.is_some() => {
                    claim = None;
                    self.on_claim(joined).await;
                    self.claiming = false;
                    self.released_during_claim.clear();
                }
                joined = async { late_write.as_mut().expect("guarded").await }, if late_write.is_some() => {
                    late_write = None;
                    if let Some(delay) = self.on_late_written(joined) {
                        late_retry_at = Instant::now() + delay;
                    }
                }
                _ = tokio::time::sleep_until(claim_at), if claim_timer => {}
                _ = tokio::time::sleep_until(late_retry_at), if late_timer => {}
                _ = self.wake.notified(), if can_claim => {
                    self.next_claim_at = Instant::now();
                    self.idle_delay = self.config.poll_min_interval;
                }
            }
        }
        self.health.set_in_flight(0);
    }

    fn spawn_claim(&self) -> JoinHandle<Claimed> {
        let pool = self.pool.clone();
        let owner = self.config.instance_id.clone();
        let room = self.config.max_claimed_rows() - self.claimed_rows;
        let limit = self.config.batch_size.min(room) as i64;
        let ttl = u64::try_from(self.config.claim_ttl.as_millis()).unwrap_or(u64::MAX);
        let skip_keys: Vec<String> = self.blocked_keys.keys().map(|k| k.to_string()).collect();
        let db_timeout = self.config.db_timeout;
        tokio::spawn(within(db_timeout, async move {
            let mut tx = outbox_store::begin_claim(&pool, ttl).await?;
            let rows = outbox_store::claim_batch(&mut tx, &owner, limit, &skip_keys).await?;
            Ok((tx, rows, Instant::now()))
        }))
    }

    fn spawn_late_write(&mut self) -> JoinHandle<Result<(), Unwritten>> {
        let outcome = Outcome {
            published: std::mem::take(&mut self.late_published)
                .into_values()
                .collect(),
            failures: Vec::new(),
            dead: std::mem::take(&mut self.late_dead).into_values().collect(),
        };
        let pool = self.pool.clone();
        let how = WriteSettings::new(&self.config);
        tokio::spawn(write_late(pool, how, outcome, self.config.db_timeout))
    }

    async fn on_claim(&mut self, joined: Result<Claimed, tokio::task::JoinError>) {
        let (tx, rows, claimed_at) = match joined {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(e)) => {
                self.health.set_database(false);
                let delay = next_delay(&mut self.db_backoff, &self.config);
                tracing::warn!(error = %e, retry_in = ?delay, "claim failed");
                self.next_claim_at = Instant::now() + delay;
                if is_timeout(&e) {
                    self.pause_for_lost_locks();
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "claim task failed");
                self.next_claim_at = Instant::now() + self.config.poll_max_interval;
                return;
            }
        };
        self.db_backoff = None;
        self.health.set_database(true);
        metrics::histogram!(m::BATCH_SIZE).record(rows.len() as f64);
        let limit = self
            .config
            .batch_size
            .min(self.config.max_claimed_rows() - self.claimed_rows);
        if rows.len() >= limit {
            // A full batch: there is probably more right now.
            self.idle_delay = self.config.poll_min_interval;
            self.next_claim_at = Instant::now();
        } else if rows.is_empty() {
            self.next_claim_at = Instant::now() + self.idle_delay;
            self.idle_delay = (self.idle_delay * 2).min(self.config.poll_max_interval);
        } else {
            self.idle_delay = self.config.poll_min_interval;
            self.next_claim_at = Instant::now() + self.idle_delay;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        let mut batch = Batch {
            tx,
            open: 0,
            outcome: Outcome::default(),
            blocks_keys: Vec::new(),
        };
        let mut fresh_keys = Vec::new();
        let mut holds = Vec::new();
        for claimed in rows {
            if let Some(published) = self.late_published.remove(&claimed.id) {
                // Published already; its mark was lost with an earlier batch. Mark it here.
                batch.outcome.published.push(published);
                continue;
            }
            if let Some(dead) = self.late_dead.remove(&claimed.id) {
                // Resolved as dead already; that write was lost with an earlier batch.
                batch.outcome.dead.push(dead);
                continue;
            }
            let key: Arc<str> = Arc::from(claimed.partition_key.as_str());
            if self.blocked_keys.contains_key(&key) || self.released_during_claim.contains(&key) {
                // An earlier row of this key is given up and maybe still locked, or failed
                // with a backoff not visible to this claim: this one must not overtake it.
                // Left pending, but locked by this batch: it holds the key back too.
                if holds.last() != Some(&key) {
                    holds.push(key);
                }
                continue;
            }
            let envelope = claimed.to_envelope();
            let queue = self.queues.entry(key.clone()).or_default();
            if queue.is_empty() {
                fresh_keys.push(key);
            }
            queue.push_back(Row {
                claimed,
                envelope,
                batch: id,
                claimed_at,
            });
            batch.open += 1;
            self.claimed_rows += 1;
        }
        let empty = batch.open == 0;
        self.batches.insert(id, batch);
        for key in holds {
            self.block_key(id, key);
        }
        if empty {
            self.finish(id);
        }
        self.ready.extend(fresh_keys);
        self.pump().await;
    }

    /// Blocks `key` until batch `batch` ends.
    fn block_key(&mut self, batch: u64, key: Arc<str>) {
        if let Some(open) = self.batches.get_mut(&batch) {
            *self.blocked_keys.entry(key.clone()).or_default() += 1;
            open.blocks_keys.push(key);
        }
    }

    /// One row of `batch` is resolved, with what to record for it (nothing for a row given
    /// up); commits the batch when it was the last. Every queued row's batch is open.
    fn resolve(&mut self, batch: u64, record: impl FnOnce(&mut Outcome)) {
        let Some(open) = self.batches.get_mut(&batch) else {
            return;
        };
        record(&mut open.outcome);
        open.open -= 1;
        if open.open == 0 {
            self.finish(batch);
        }
    }

    /// Writes a fully resolved batch's outcome in its transaction and commits it.
    fn finish(&mut self, id: u64) {
        let Some(batch) = self.batches.remove(&id) else {
            return;
        };
        let how = WriteSettings::new(&self.config);
        let db_timeout = self.config.db_timeout;
        let Batch {
            tx,
            outcome,
            blocks_keys,
            ..
        } = batch;
        self.finishing.push(Box::pin(async move {
            let written = end_batch(tx, how, outcome, db_timeout).await;
            (blocks_keys, written)
        }));
    }

    fn on_finished(&mut self, blocks_keys: Vec<Arc<str>>, result: Result<(), Unwritten>) {
        for key in blocks_keys {
            if let Some(count) = self.blocked_keys.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.blocked_keys.remove(&key);
                    if self.claiming {
                        self.released_during_claim.insert(key);
                    }
                }
            }
        }
        match result {
            Ok(()) => self.health.set_database(true),
            Err(unwritten) => {
                self.health.set_database(false);
                tracing::warn!(
                    error = %unwritten.error,
                    published = unwritten.outcome.published.len(),
                    "committing a batch failed; its published rows will be marked later"
                );
                if unwritten.locks_may_linger {
                    self.pause_for_lost_locks();
                }
                self.keep_late(unwritten.outcome);
            }
        }
    }

    /// A claim or a batch's commit timed out: its transaction may still hold row locks at
    /// the server that this relay no longer tracks, and a claim would skip those rows and
    /// return later rows of their keys. No claim starts before the server has ended such a
    /// transaction (it ends a session idle in a claim after `claim_ttl`).
    fn pause_for_lost_locks(&mut self) {
        let until = Instant::now() + self.config.claim_ttl;
        tracing::warn!(pause = ?self.config.claim_ttl, "a transaction may still hold row locks at the server: no claims until it has ended");
        self.claims_blocked_until = self.claims_blocked_until.max(until);
    }

    /// Keeps the PubAcks and dead letters of an outcome that could not be written. Failed
    /// attempts are only backoff hints: those rows are pending again and will be retried.
    fn keep_late(&mut self, outcome: Outcome) {
        for published in outcome.published {
            self.late_published.insert(published.id, published);
        }
        self.late_dead
            .extend(outcome.dead.into_iter().map(|dead| (dead.id, dead)));
    }

    fn on_late_written(
        &mut self,
        joined: Result<Result<(), Unwritten>, tokio::task::JoinError>,
    ) -> Option<Duration> {
        match joined {
            Ok(Ok(())) => {
                self.health.set_database(true);
                None
            }
            Ok(Err(unwritten)) => {
                self.health.set_database(false);
                let delay = next_delay(&mut self.db_backoff, &self.config);
                tracing::warn!(error = %unwritten.error, retry_in = ?delay, "marking published rows failed; will retry");
                self.keep_late(unwritten.outcome);
                Some(delay)
            }
            Err(e) => {
                tracing::error!(error = %e, "late write task failed");
                Some(self.config.poll_max_interval)
            }
        }
    }

    /// Sends the heads of ready keys while the publish window has room.
    async fn pump(&mut self) {
        while self.in_flight.len() < self.config.max_in_flight {
            let Some(key) = self.ready.pop_front() else {
                return;
            };
            self.send_head(key).await;
        }
    }

    /// Sends the head of `key`'s queue, resolving heads that cannot be sent on the way. The
    /// caller checked that the window has room.
    async fn send_head(&mut self, key: Arc<str>) {
        if self.sending.contains(&key) {
            return;
        }
        loop {
            let Some(queue) = self.queues.get_mut(&key) else {
                return;
            };
            let Some(row) = queue.front() else {
                self.queues.remove(&key);
                return;
            };
            if self.stopping || row.claimed_at.elapsed() > self.config.claim_ttl / 2 {
                // Do not start a publish whose claim could end before its ack.
                self.give_up_queue(&key);
                return;
            }
            let envelope = match &row.envelope {
                Ok(envelope) => envelope,
                Err(e) => {
                    let dead = Dead {
                        id: row.claimed.id,
                        reason: dlq::reason::INVALID_ROW,
                        error: e.to_string(),
                        attempts: row.claimed.attempts.saturating_add(1),
                    };
                    tracing::warn!(id = %dead.id, error = %dead.error, "outbox row can never be published: moving it to dead_letter");
                    if let Some(row) = self.pop_head(&key) {
                        self.resolve(row.batch, |o| o.dead.push(dead));
                    }
                    continue;
                }
            };
            let sent_at = Instant::now();
            match self.publisher.publish(envelope).await {
                Ok(ack) => {
                    self.sending.insert(key.clone());
                    let key = key.clone();
                    self.in_flight.push(Box::pin(async move {
                        Done {
                            key,
                            sent_at,
                            result: ack.await,
                        }
                    }));
                    return;
                }
                Err(error) => {
                    if !self.on_failure(&key, error) {
                        return;
                    }
                }
            }
        }
    }

    async fn on_ack(&mut self, done: Done) {
        self.sending.remove(&done.key);
        match done.result {
            Ok(ack) => {
                metrics::counter!(m::PUBLISHED).increment(1);
                if ack.duplicate {
                    metrics::counter!(m::DUPLICATES).increment(1);
                }
                metrics::histogram!(m::PUBLISH_LATENCY)
                    .record(done.sent_at.elapsed().as_secs_f64());
                self.broker_backoff = None;
                self.health.set_broker(true);
                if let Some(row) = self.pop_head(&done.key) {
                    let published = Published {
                        id: row.claimed.id,
                        stream: ack.stream,
                        stream_seq: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
                    };
                    self.resolve(row.batch, |o| o.published.push(published));
                }
                self.ready.push_back(done.key);
            }
            Err(error) => {
                if self.on_failure(&done.key, error) {
                    self.ready.push_back(done.key);
                }
            }
        }
        self.pump().await;
    }

    /// Handles a failed head of `key`. Returns true when the head was dead-lettered and the
    /// next row of the key may be sent; false when the queue was given up.
    fn on_failure(&mut self, key: &Arc<str>, error: PublishError) -> bool {
        metrics::counter!(m::FAILED, "kind" => error.kind.as_str()).increment(1);
        let Some(row) = self.queues.get(key).and_then(|q| q.front()) else {
            return false;
        };
        let attempts = row.claimed.attempts.saturating_add(1);
        let permanent_failures = row.claimed.permanent_failures.saturating_add(1);
        let id = row.claimed.id;
        let batch = row.batch;
        let permanent = error.kind.is_permanent();
        let limit = i32::try_from(self.config.max_permanent_attempts).unwrap_or(i32::MAX);
        if permanent && permanent_failures >= limit {
            tracing::warn!(%id, attempts, error = %error, "permanent publish failure: moving the row to dead_letter");
            let dead = Dead {
                id,
                reason: error.kind.as_str(),
                error: error.to_string(),
                attempts,
            };
            self.pop_head(key);
            self.resolve(batch, |o| o.dead.push(dead));
            return true;
        }
        let delay = retry_delay(&self.config, attempts);
        tracing::debug!(%id, attempts, retry_in = ?delay, error = %error, "publish failed; row stays pending with a backoff");
        metrics::counter!(m::RETRIED).increment(1);
        let failure = Failure {
            id,
            delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            error: error.to_string(),
            permanent,
        };
        if let Some(open) = self.batches.get_mut(&batch) {
            open.outcome.failures.push(failure);
        }
        // The head's batch holds the key until the failure and its backoff are committed.
        self.give_up_queue(key);
        if matches!(
            error.kind,
            PublishErrorKind::Unavailable | PublishErrorKind::Timeout
        ) {
            // The broker is in trouble: stop claiming for a while instead of churning rows.
            // The pause grows once per pause, not once per failed message: every message in
            // flight fails together in one outage, and escalating for each of them paused
            // the relay for the longest delay (tens of seconds) after every short outage.
            self.health.set_broker(self.publisher.is_connected());
            let now = Instant::now();
            if now >= self.broker_paused_until {
                let pause = next_delay(&mut self.broker_backoff, &self.config);
                self.broker_paused_until = now + pause;
                self.claims_blocked_until = self.claims_blocked_until.max(now + pause);
            }
        }
        false
    }

    fn pop_head(&mut self, key: &Arc<str>) -> Option<Row> {
        let queue = self.queues.get_mut(key)?;
        let row = queue.pop_front();
        if row.is_some() {
            self.claimed_rows -= 1;
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
        row
    }

    /// Gives up `key`'s whole queue: its rows stay pending, unlocked when their batches end;
    /// each of those batches holds the key back until then.
    fn give_up_queue(&mut self, key: &Arc<str>) {
        let Some(queue) = self.queues.remove(key) else {
            return;
        };
        self.give_up_rows(key, queue);
    }

    fn give_up_rows(&mut self, key: &Arc<str>, rows: impl IntoIterator<Item = Row>) {
        let mut last_batch = None;
        for row in rows {
            self.claimed_rows -= 1;
            if last_batch != Some(row.batch) {
                // Taken before the row resolves: its batch may end right here.
                self.block_key(row.batch, key.clone());
                last_batch = Some(row.batch);
            }
            self.resolve(row.batch, |_| {});
        }
    }

    /// On stop: every queued row that is not in flight is given up; a head in flight stays
    /// until its ack resolves it.
    fn give_up_all_queued(&mut self) {
        let keys: Vec<Arc<str>> = self.queues.keys().cloned().collect();
        for key in keys {
            if self.sending.contains(&key) {
                let Some(queue) = self.queues.get_mut(&key) else {
                    continue;
                };
                let behind: Vec<Row> = queue.drain(1..).collect();
                self.give_up_rows(&key, behind);
            } else {
                self.give_up_queue(&key);
            }
        }
    }
}

/// The next delay of a pause that grows while failures go on (broker, database).
fn next_delay(state: &mut Option<backon::ExponentialBackoff>, config: &RelayConfig) -> Duration {
    state
        .get_or_insert_with(|| backoff(config))
        .next()
        .unwrap_or(config.retry_max_delay)
}
