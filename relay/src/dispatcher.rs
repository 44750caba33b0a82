//! The publishing pipeline: claim, publish with many PubAcks in flight, mark, all overlapped.
//!
//! One task owns the state below and reacts to whichever finishes first: a PubAck, a claim,
//! a flush of outcomes to the database, a poll timer or a wakeup. Claims and flushes run as
//! separate tasks on their own connections, so the next batch is claimed and the previous
//! one marked while messages are on the wire.
//!
//! Per-key order: rows are queued per partition key in `seq` order and only the head of a
//! key's queue is ever in flight; rows of a key claimed later are appended behind it. A
//! failed head returns the rest of its queue to `pending`, and the key is *held back* until
//! that release is written: rows of it that a claim returns meanwhile go straight back too.
//! Once written, the claim statement skips rows behind a head that waits out its backoff
//! (or is claimed by another instance), so no later message of a key overtakes an earlier one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use envelope::Envelope;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use outbox::store::{self as outbox_store, ClaimedRow, Published, Release};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::publisher::{Ack, PublishError, PublishErrorKind, Publisher};

/// A claimed row waiting in its key's queue.
struct Row {
    claimed: ClaimedRow,
    envelope: Result<Envelope, envelope::Error>,
    claimed_at: Instant,
}

/// A row moving to the dead-letter store.
struct Dead {
    id: Uuid,
    reason: &'static str,
    error: String,
    attempts: i32,
}

/// What happened to rows, waiting to be written to the database.
#[derive(Default)]
struct Outcome {
    published: Vec<Published>,
    released: Vec<Release>,
    dead: Vec<Dead>,
}

impl Outcome {
    fn is_empty(&self) -> bool {
        self.published.is_empty() && self.released.is_empty() && self.dead.is_empty()
    }
}

/// A resolved PubAck.
struct Done {
    key: Arc<str>,
    sent_at: Instant,
    result: Result<Ack, PublishError>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>;

/// The pipeline's state; see the module docs.
pub(crate) struct Dispatcher<P> {
    config: RelayConfig,
    pool: PgPool,
    publisher: Arc<P>,
    health: Health,
    wake: Arc<Notify>,
    queues: HashMap<Arc<str>, VecDeque<Row>>,
    /// Rows claimed and not yet resolved (queued or in flight).
    held: usize,
    in_flight: InFlight,
    /// Keys whose head is in flight.
    sending: HashSet<Arc<str>>,
    outcome: Outcome,
    /// Keys with a release not yet written, and the number of the flush that writes it.
    held_back: HashMap<Arc<str>, u64>,
    /// Flushes spawned so far (the next one gets this number plus one).
    flushes: u64,
    stopping: bool,
    stopping_since: Option<Instant>,
    next_claim_at: Instant,
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
            held: 0,
            in_flight: FuturesUnordered::new(),
            sending: HashSet::new(),
            outcome: Outcome::default(),
            held_back: HashMap::new(),
            flushes: 0,
            stopping: false,
            stopping_since: None,
            next_claim_at: Instant::now(),
            idle_delay,
            broker_backoff: None,
            db_backoff: None,
        }
    }

    /// Runs until `stop`, then finishes what is in flight, releases what was claimed and
    /// not sent, records every outcome, and returns.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut claim: Option<JoinHandle<Result<Vec<ClaimedRow>, sqlx::Error>>> = None;
        let mut flush: Option<JoinHandle<Result<(), (Outcome, sqlx::Error)>>> = None;
        let mut flush_retry_at = Instant::now();
        loop {
            let now = Instant::now();
            let room = self.held + self.config.batch_size.min(self.config.max_in_flight)
                <= self.config.max_held();
            let can_claim = !self.stopping && claim.is_none() && room;
            if can_claim && now >= self.next_claim_at {
                claim = Some(self.spawn_claim());
            }
            let can_flush = flush.is_none() && !self.outcome.is_empty();
            if can_flush && now >= flush_retry_at {
                flush = Some(self.spawn_flush());
            }
            if self.stopping
                && claim.is_none()
                && self.in_flight.is_empty()
                && self.held == 0
                && flush.is_none()
            {
                if self.outcome.is_empty() {
                    break;
                }
                if self
                    .stopping_since
                    .is_some_and(|t| now.duration_since(t) > self.config.claim_ttl)
                {
                    // The database stayed unreachable: our claims expire by themselves and the
                    // rescuer returns them; published rows are published again (deduplicated).
                    tracing::warn!(
                        "stopping without recording every outcome: the database is unreachable"
                    );
                    break;
                }
                // The database is failing while we stop: keep retrying the flush.
                flush_retry_at = flush_retry_at.min(now + self.config.poll_max_interval);
            }
            self.health.set_in_flight(self.in_flight.len());
            metrics::gauge!(m::IN_FLIGHT).set(self.in_flight.len() as f64);

            // Timers are armed from the same `now` as the decisions above, so a deadline that
            // passes in between still wakes the loop (sleep_until a past instant returns at once).
            let claim_timer = can_claim && claim.is_none();
            let flush_timer = can_flush && flush.is_none();
            tokio::select! {
                _ = stop.cancelled(), if !self.stopping => {
                    tracing::info!(in_flight = self.in_flight.len(), held = self.held, "stopping: finishing in-flight messages and releasing the rest");
                    self.stopping = true;
                    self.stopping_since = Some(Instant::now());
                    self.release_all_queued();
                }
                Some(done) = self.in_flight.next() => self.on_ack(done).await,
                joined = async { claim.as_mut().expect("guarded").await }, if claim.is_some() => {
                    claim = None;
                    self.on_claim(joined).await;
                }
                joined = async { flush.as_mut().expect("guarded").await }, if flush.is_some() => {
                    flush = None;
                    if let Some(delay) = self.on_flush(joined, self.flushes) {
                        flush_retry_at = Instant::now() + delay;
                    }
                }
                _ = tokio::time::sleep_until(self.next_claim_at), if claim_timer => {}
                _ = tokio::time::sleep_until(flush_retry_at), if flush_timer => {}
                _ = self.wake.notified(), if can_claim => {
                    self.next_claim_at = Instant::now();
                    self.idle_delay = self.config.poll_min_interval;
                }
            }
        }
        self.health.set_in_flight(0);
    }

    fn spawn_claim(&self) -> JoinHandle<Result<Vec<ClaimedRow>, sqlx::Error>> {
        let pool = self.pool.clone();
        let owner = self.config.instance_id.clone();
        let room = self.config.max_held() - self.held;
        let limit = self.config.batch_size.min(room) as i64;
        let ttl = i64::try_from(self.config.claim_ttl.as_millis()).unwrap_or(i64::MAX);
        tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            outbox_store::claim_batch(&mut conn, &owner, limit, ttl).await
        })
    }

    fn spawn_flush(&mut self) -> JoinHandle<Result<(), (Outcome, sqlx::Error)>> {
        self.flushes += 1;
        let outcome = std::mem::take(&mut self.outcome);
        let pool = self.pool.clone();
        let owner = self.config.instance_id.clone();
        let delete = self.config.retention.is_zero();
        tokio::spawn(flush(pool, owner, delete, outcome))
    }

    async fn on_claim(
        &mut self,
        joined: Result<Result<Vec<ClaimedRow>, sqlx::Error>, tokio::task::JoinError>,
    ) {
        let rows = match joined {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.health.set_database(false);
                let delay = next_delay(&mut self.db_backoff, &self.config);
                tracing::warn!(error = %e, retry_in = ?delay, "claim failed");
                self.next_claim_at = Instant::now() + delay;
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
            .min(self.config.max_held() - self.held);
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
        let now = Instant::now();
        let mut fresh_keys = Vec::new();
        for claimed in rows {
            let key: Arc<str> = Arc::from(claimed.partition_key.as_str());
            if self.held_back.contains_key(&key) {
                // An earlier row of this key is on its way back to pending: this one must
                // not overtake it.
                self.outcome.released.push(Release {
                    id: claimed.id,
                    failed: false,
                    delay_ms: 0,
                    error: None,
                });
                self.held_back.insert(key, self.flushes + 1);
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
                claimed_at: now,
            });
            self.held += 1;
        }
        for key in fresh_keys {
            self.send_head(key).await;
        }
    }

    /// Sends the head of `key`'s queue, resolving heads that cannot be sent on the way.
    async fn send_head(&mut self, key: Arc<str>) {
        loop {
            let Some(queue) = self.queues.get_mut(&key) else {
                return;
            };
            let Some(row) = queue.front() else {
                self.queues.remove(&key);
                return;
            };
            if self.stopping || row.claimed_at.elapsed() > self.config.claim_ttl / 2 {
                // Do not start a publish whose claim could expire before its ack.
                self.release_queue(&key, None);
                return;
            }
            let envelope = match &row.envelope {
                Ok(envelope) => envelope,
                Err(e) => {
                    let dead = Dead {
                        id: row.claimed.id,
                        reason: "invalid_row",
                        error: e.to_string(),
                        attempts: row.claimed.attempts + 1,
                    };
                    tracing::warn!(id = %dead.id, error = %dead.error, "outbox row can never be published: moving it to dead_letter");
                    self.outcome.dead.push(dead);
                    self.pop_head(&key);
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
                    self.outcome.published.push(Published {
                        id: row.claimed.id,
                        stream: ack.stream,
                        stream_seq: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
                    });
                }
                self.send_head(done.key).await;
            }
            Err(error) => {
                if self.on_failure(&done.key, error) {
                    self.send_head(done.key).await;
                }
            }
        }
    }

    /// Handles a failed head of `key`. Returns true when the head was dead-lettered and the
    /// next row of the key may be sent; false when the queue was released.
    fn on_failure(&mut self, key: &Arc<str>, error: PublishError) -> bool {
        metrics::counter!(m::FAILED, "kind" => error.kind.as_str()).increment(1);
        let Some(row) = self.queues.get(key).and_then(|q| q.front()) else {
            return false;
        };
        let attempts = row.claimed.attempts + 1;
        let id = row.claimed.id;
        if error.kind.is_permanent() && attempts >= self.config.max_permanent_attempts as i32 {
            tracing::warn!(%id, attempts, error = %error, "permanent publish failure: moving the row to dead_letter");
            self.outcome.dead.push(Dead {
                id,
                reason: error.kind.as_str(),
                error: error.to_string(),
                attempts,
            });
            self.pop_head(key);
            return true;
        }
        let delay = retry_delay(&self.config, attempts);
        tracing::debug!(%id, attempts, retry_in = ?delay, error = %error, "publish failed; row goes back to pending");
        metrics::counter!(m::RETRIED).increment(1);
        self.release_queue(
            key,
            Some(Release {
                id,
                failed: true,
                delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                error: Some(error.to_string()),
            }),
        );
        if matches!(
            error.kind,
            PublishErrorKind::Unavailable | PublishErrorKind::Timeout
        ) {
            // The broker is in trouble: stop claiming for a while instead of churning rows.
            self.health.set_broker(self.publisher.is_connected());
            let pause = next_delay(&mut self.broker_backoff, &self.config);
            self.next_claim_at = self.next_claim_at.max(Instant::now() + pause);
        }
        false
    }

    fn pop_head(&mut self, key: &Arc<str>) -> Option<Row> {
        let queue = self.queues.get_mut(key)?;
        let row = queue.pop_front();
        if row.is_some() {
            self.held -= 1;
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
        row
    }

    /// Returns `key`'s whole queue to pending: the head with `head` (a failure), the rest
    /// unchanged.
    fn release_queue(&mut self, key: &Arc<str>, head: Option<Release>) {
        let Some(queue) = self.queues.remove(key) else {
            return;
        };
        self.held -= queue.len();
        let mut rows = queue.into_iter();
        if let Some(head) = head {
            rows.next();
            self.outcome.released.push(head);
        }
        for row in rows {
            self.outcome.released.push(Release {
                id: row.claimed.id,
                failed: false,
                delay_ms: 0,
                error: None,
            });
        }
    }

    /// On stop: every queued row that is not in flight goes back to pending; a head in
    /// flight stays until its ack resolves it.
    fn release_all_queued(&mut self) {
        let keys: Vec<Arc<str>> = self.queues.keys().cloned().collect();
        for key in keys {
            if self.sending.contains(&key) {
                let Some(queue) = self.queues.get_mut(&key) else {
                    continue;
                };
                let behind: Vec<Row> = queue.drain(1..).collect();
                self.held -= behind.len();
                for row in behind {
                    self.outcome.released.push(Release {
                        id: row.claimed.id,
                        failed: false,
                        delay_ms: 0,
                        error: None,
                    });
                }
            } else {
                self.release_queue(&key, None);
            }
        }
    }

    fn on_flush(
        &mut self,
        joined: Result<Result<(), (Outcome, sqlx::Error)>, tokio::task::JoinError>,
        flush_number: u64,
    ) -> Option<Duration> {
        match joined {
            Ok(Ok(())) => {
                self.health.set_database(true);
                // Releases written by this flush (or earlier ones) no longer hold keys back.
                self.held_back
                    .retain(|_, written_by| *written_by > flush_number);
                None
            }
            Ok(Err((unwritten, e))) => {
                self.health.set_database(false);
                let delay = next_delay(&mut self.db_backoff, &self.config);
                tracing::warn!(error = %e, retry_in = ?delay, "recording publish outcomes failed; will retry");
                // Keep what was not written, ahead of anything newer.
                let newer = std::mem::replace(&mut self.outcome, unwritten);
                self.outcome.published.extend(newer.published);
                self.outcome.released.extend(newer.released);
                self.outcome.dead.extend(newer.dead);
                Some(delay)
            }
            Err(e) => {
                tracing::error!(error = %e, "flush task failed");
                Some(self.config.poll_max_interval)
            }
        }
    }
}

/// Writes outcomes: published marks, releases, dead letters. On failure returns what was
/// not written yet.
async fn flush(
    pool: PgPool,
    owner: String,
    delete: bool,
    mut outcome: Outcome,
) -> Result<(), (Outcome, sqlx::Error)> {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return Err((outcome, e)),
    };
    if let Err(e) = outbox_store::mark_published(&mut conn, &outcome.published, delete).await {
        return Err((outcome, e));
    }
    outcome.published.clear();
    if let Err(e) = outbox_store::release(&mut conn, &owner, &outcome.released).await {
        return Err((outcome, e));
    }
    outcome.released.clear();
    if !outcome.dead.is_empty() {
        if let Err(e) = dead_letter(&mut conn, &owner, &outcome.dead).await {
            return Err((outcome, e));
        }
        outcome.dead.clear();
    }
    Ok(())
}

/// Moves rows to `dead_letter` and out of the outbox in one transaction.
async fn dead_letter(
    conn: &mut sqlx::PgConnection,
    owner: &str,
    dead: &[Dead],
) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let ids: Vec<Uuid> = dead.iter().map(|d| d.id).collect();
    let rows = outbox_store::take_for_dead_letter(&mut tx, owner, &ids).await?;
    for row in rows {
        let Some(why) = dead.iter().find(|d| d.id == row.id) else {
            continue;
        };
        // The full wire headers when the row is valid, so that `dlq retry` can rebuild the
        // message; otherwise what the row holds.
        let headers = match row
            .to_envelope()
            .map(|env| envelope::nats::to_headers(&env))
        {
            Ok(Ok(map)) => dlq::headers_to_json(&map),
            _ => {
                let mut headers = row.headers.as_object().cloned().unwrap_or_default();
                for (name, value) in [
                    ("ce-type", Some(row.event_type.clone())),
                    ("ce-source", Some(row.source.clone())),
                    ("ce-partitionkey", Some(row.partition_key.clone())),
                ] {
                    if let Some(value) = value {
                        headers.insert(name.to_owned(), serde_json::Value::String(value));
                    }
                }
                headers
            }
        };
        let letter = dlq::DeadLetter {
            source: dlq::Source::Relay,
            consumer: "relay".to_owned(),
            message_id: row.id.to_string(),
            subject: row.subject.clone(),
            partition_key: Some(row.partition_key.clone()),
            headers,
            payload: row.payload.clone(),
            reason: why.reason.to_owned(),
            error_chain: vec![why.error.clone()],
            attempts: why.attempts,
            stream: None,
            stream_seq: None,
        };
        dlq::store::record(&mut tx, &letter).await?;
        metrics::counter!(m::DEAD_LETTERED, "reason" => why.reason).increment(1);
    }
    tx.commit().await
}

fn backoff(config: &RelayConfig) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(config.retry_min_delay)
        .with_max_delay(config.retry_max_delay)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The delay before retry `attempts` (1-based) of one row: exponential with jitter.
pub(crate) fn retry_delay(config: &RelayConfig, attempts: i32) -> Duration {
    let n = usize::try_from(attempts.max(1) - 1).unwrap_or(0).min(64);
    backoff(config).nth(n).unwrap_or(config.retry_max_delay)
}

fn next_delay(state: &mut Option<backon::ExponentialBackoff>, config: &RelayConfig) -> Duration {
    state
        .get_or_insert_with(|| backoff(config))
        .next()
        .unwrap_or(config.retry_max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let config = RelayConfig::default();
        let first = retry_delay(&config, 1);
        assert!(
            first >= config.retry_min_delay && first <= config.retry_min_delay * 2,
            "{first:?}"
        );
        let later = retry_delay(&config, 6);
        assert!(later >= config.retry_min_delay * 32, "{later:?}");
        for attempts in [20, 1000, i32::MAX] {
            assert!(retry_delay(&config, attempts) <= config.retry_max_delay * 2);
        }
    }
}
