//! The inbox's generative suite: seeded random workloads against a real PostgreSQL and a real
//! nats-server, with a checker of the whole history.
//!
//! Each seed draws a scenario: 100 to 3000 messages over 1 to 2000 keys (sometimes a hot key
//! taking most of them), published to a JetStream stream with `Nats-Msg-Id`, some of them
//! twice (again with the same `Nats-Msg-Id`, which the stream drops, or as a copy under
//! another one, which the stream stores and the inbox must skip), right away or later; one or
//! two consumer instances on the same durable, strict or batched (2 to 200 messages per
//! transaction), with a per-message or a batch handler, 1 to 8 lanes, 1 to 4 attempts, an
//! `ack_wait` of 1 or 2 s; and for every message a script of what its handler does at each
//! attempt, decided from the seed: succeed, return a retry (a few times then succeed, or
//! forever), return a permanent failure, panic, fail its insert (an immediate trigger), write
//! a row that a DEFERRABLE INITIALLY DEFERRED constraint trigger refuses at COMMIT (the
//! handler sets the row's `fail_commit` only at the attempts the script says), and sleep a few
//! milliseconds or, for a few messages, longer than `ack_wait`. Instances are stopped
//! gracefully, their `run()` task aborted, or their runtime dropped with their database
//! sessions terminated (a SIGKILL), and replaced mid-run; the inbox table may refuse inserts
//! for a while (a database outage the consumer sees as errors, not as handler attempts).
//!
//! The handler writes its effect into `effect(message_id, n, key, attempt, ...)`, a table
//! without a unique constraint, so that a double effect is visible. After quiescence (every
//! message in `effect` or `dead_letter`, and nothing left pending or unacknowledged at the
//! broker) the consumers are stopped and the checker asserts, per message:
//! - its effect committed exactly once if its script ends in success, with the attempt
//!   number the script succeeds at (so attempts were counted exactly: crashes, outages,
//!   shutdowns and expired `ack_wait`s use none up), and never if it is parked;
//! - it is parked exactly once, with the expected reason and attempts: `rejected` (the
//!   handler's own reason) at the attempt that returned it, and at `max_attempts`
//!   `attempts_exhausted` (retries, failed inserts), `panic` or `commit_failed`;
//! - nothing dropped or doubled: duplicates and copies take effect once, every message has one
//!   inbox row with the matching outcome, no attempt row is left, no unknown effect or dead
//!   letter exists, the stream stores exactly the copies that were meant to be stored;
//! - the handler never saw an attempt above `max_attempts`;
//! - the consumers never exited on their own (each `run()` still pending until stopped), and
//!   after a requested stop `run()` returned `Ok`;
//! - without restarts and outages, a message whose handler always succeeds is delivered once
//!   (progress acks keep `ack_wait` from expiring behind slow handlers).
//!
//! Per-key order is not checked: the inbox keeps it only among first deliveries.
//!
//! Copies stored under another `Nats-Msg-Id` once restarted a message's attempts at 1 (the
//! inbox read its `inbox_attempt` row only for `delivered > 1`), and two instances could then
//! both park it; both are fixed. One race is left: when the original and its copy are
//! delivered to two instances at once, the second's inbox insert waits for the first's
//! transaction and, once it rolls back, reads the attempt row before the first has counted
//! its failed attempt, so each concurrent copy can use one attempt more than `max_attempts`
//! (effects still exactly once). For such messages (see [`copy_reset`]) the checker only asks
//! that the message be processed exactly once or parked and never processed, and the summary
//! counts them (`copy_resets`, `copy_double_parks`, `copy_stale_attempts`);
//! `INBOX_FUZZ_STRICT=1` checks them strictly too (the fixed seeds pass it).
//!
//! `make test` runs the fixed seeds below; `make fuzz SEEDS=200` runs that many more from a
//! random start (`INBOX_FUZZ_SEEDS=N`, `INBOX_FUZZ_START=s`). A failure prints its seed:
//! `INBOX_FUZZ_SEED=<seed> cargo test -p outbox-toolkit-inbox --test generative -- --nocapture` replays it
//! (the same scenario, publications, scripts and fault schedule; the interleaving still
//! depends on timing).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use envelope::{Envelope, Event, HeaderText, MessageId, Subject};
use futures::FutureExt;
use inbox::{
    BatchHandler, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed,
    typed_batch,
};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use testkit::{NatsServer, Postgres, wait_until};
use tokio::time::Instant;
use uuid::Uuid;

/// Seeds `make test` runs (about a minute on two cores): every profile (seed % 4) five times,
/// every mode, handler kind, restart kind and fault among them.
const FIXED_SEEDS: &[u64] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
];

/// What an injected panic's message starts with (the panic hook keeps them quiet).
const INJECTED_PANIC: &str = "generative: injected panic";

/// The reason of the handler's permanent failures.
const REJECTED: &str = "rejected";

// ---------------------------------------------------------------------------------------
// Randomness: splitmix64, so that a seed means the same scenario everywhere.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A random number for one (message, attempt) decision, the same in every run of a seed.
fn decide(seed: u64, n: u32, attempt: u32, what: u64) -> Rng {
    let mut rng = Rng(seed ^ (u64::from(n) << 24) ^ (u64::from(attempt) << 48) ^ what);
    rng.next();
    rng
}

// ---------------------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------------------

/// What a handler run does at one attempt, besides writing its effect row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Writes, then returns [`HandlerError::retry`] (or `retry_after`).
    Retry,
    /// Writes, then panics.
    Panic,
    /// Its insert fails (an immediate trigger); the handler returns the error as a retry.
    InsertFail,
    /// Writes a row the deferred constraint trigger refuses: the COMMIT fails.
    CommitFail,
    /// Writes, then returns a permanent failure with reason [`REJECTED`].
    Permanent,
}

impl Step {
    /// The dead letter's reason when this step fails the last allowed attempt.
    fn exhausted(self) -> &'static str {
        match self {
            Step::Retry | Step::InsertFail => "attempts_exhausted",
            Step::Panic => "panic",
            Step::CommitFail => "commit_failed",
            Step::Permanent => REJECTED,
        }
    }

    fn letter(self) -> char {
        match self {
            Step::Retry => 'R',
            Step::Panic => 'P',
            Step::InsertFail => 'I',
            Step::CommitFail => 'C',
            Step::Permanent => 'X',
        }
    }
}

/// How a message is published a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dup {
    None,
    /// Again with the same `Nats-Msg-Id`: the stream drops it.
    SameId,
    /// Again under another `Nats-Msg-Id` (a republish after the duplicate window): the
    /// stream stores a second copy, the inbox must skip it.
    Copy,
}

/// One message's fate.
#[derive(Debug, Clone)]
struct Plan {
    key: String,
    /// What attempts 1, 2, ... do; after them the handler succeeds, unless `forever`.
    steps: Vec<Step>,
    /// The last step repeats forever.
    forever: bool,
    dup: Dup,
    /// The second publication comes with the next wave instead of right after.
    late_dup: bool,
    /// The first attempt sleeps longer than `ack_wait`.
    long_slow: bool,
}

/// What the checker expects of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Processed { attempt: u32 },
    Parked { reason: &'static str, attempts: u32 },
}

impl Plan {
    fn step(&self, attempt: u32) -> Option<Step> {
        let at = attempt.checked_sub(1)? as usize;
        match self.steps.get(at) {
            Some(step) => Some(*step),
            None if self.forever => self.steps.last().copied(),
            None => None,
        }
    }

    fn expect(&self, max_attempts: u32) -> Expect {
        for attempt in 1..=max_attempts {
            match self.step(attempt) {
                None => return Expect::Processed { attempt },
                Some(Step::Permanent) => {
                    return Expect::Parked {
                        reason: REJECTED,
                        attempts: attempt,
                    };
                }
                Some(step) if attempt == max_attempts => {
                    return Expect::Parked {
                        reason: step.exhausted(),
                        attempts: attempt,
                    };
                }
                Some(_) => {}
            }
        }
        unreachable!("max_attempts is at least 1")
    }

    fn script(&self) -> String {
        let steps: String = self.steps.iter().map(|s| s.letter()).collect();
        format!(
            "[{steps}{}]{}{}",
            if self.forever { "..." } else { "" },
            match (self.dup, self.late_dup) {
                (Dup::None, _) => "",
                (Dup::SameId, false) => " +same-id",
                (Dup::SameId, true) => " +same-id(late)",
                (Dup::Copy, false) => " +copy",
                (Dup::Copy, true) => " +copy(late)",
            },
            if self.long_slow { " long-slow" } else { "" }
        )
    }
}

/// How an instance goes away mid-run (and is replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// Shutdown asked: `run()` must finish what it handles and return `Ok`.
    Graceful,
    /// The `run()` task aborted (its future dropped) while the process lives on.
    Abort,
    /// The instance's runtime dropped and its database sessions terminated: a SIGKILL.
    Kill,
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    messages: usize,
    keys: usize,
    /// Share of messages on the key "hot".
    hot_share: f64,
    /// Share of messages with a failure script.
    fail_share: f64,
    /// Share of messages published twice.
    dup_share: f64,
    /// Probability that an attempt sleeps 1..=`slow_ms` ms.
    slow_rate: f64,
    slow_ms: u64,
    /// Messages whose first attempt outlasts `ack_wait`.
    long_slow: usize,
    /// Publish in this many waves.
    waves: usize,
    /// Publish the first wave before the consumers start.
    backlog: bool,
    instances: usize,
    batch_handler: bool,
    /// Filter on the scenario's subjects (else the whole stream).
    filtered: bool,
    /// Restarts, at these times after the consumers start.
    restarts: Vec<(Duration, Restart)>,
    /// The inbox refuses inserts during this window (start, length).
    outage: Option<(Duration, Duration)>,
    config: ConsumerConfig,
}

impl Scenario {
    fn generate(seed: u64) -> Scenario {
        let mut rng = Rng(seed);
        let profile = seed % 4;
        let messages = match rng.below(10) {
            0..=1 => 1_500 + rng.below(1_501) as usize,
            2..=4 => 500 + rng.below(1_000) as usize,
            _ => 100 + rng.below(400) as usize,
        };
        let keys = if rng.chance(0.2) {
            messages.min(2_000)
        } else {
            rng.pick(&[1, 2, 7, 50, 300, 2_000]).min(messages)
        };
        let hot_share = if profile == 1 || rng.chance(0.2) {
            rng.pick(&[0.2, 0.5, 0.8])
        } else {
            0.0
        };
        let mode = if profile == 0 || rng.chance(0.3) {
            Mode::Strict
        } else {
            Mode::Batched {
                max_messages: rng.pick(&[2, 10, 50, 200]),
            }
        };
        let instances = if profile == 2 || rng.chance(0.3) {
            2
        } else {
            1
        };
        let mut restarts: Vec<(Duration, Restart)> = if profile == 2 || rng.chance(0.25) {
            (0..1 + rng.below(3))
                .map(|_| {
                    let at = Duration::from_millis(100 + rng.below(2_500));
                    (
                        at,
                        rng.pick(&[Restart::Graceful, Restart::Abort, Restart::Kill]),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        restarts.sort_by_key(|(at, _)| *at);
        let outage = (profile == 3 || rng.chance(0.15)).then(|| {
            (
                Duration::from_millis(100 + rng.below(1_500)),
                Duration::from_millis(200 + rng.below(600)),
            )
        });
        let max_attempts = rng.pick(&[1, 2, 3, 3, 4, 4]);
        let retry_min_delay = Duration::from_millis(rng.pick(&[10, 30, 100]));
        let config = ConsumerConfig {
            mode,
            concurrency: 1 + rng.below(8) as usize,
            max_attempts,
            ack_wait: Duration::from_secs(rng.pick(&[1, 2])),
            retry_min_delay,
            retry_max_delay: retry_min_delay.max(Duration::from_millis(rng.pick(&[200, 500]))),
            ..ConsumerConfig::new(format!("gen-{seed}"), format!("GEN_{seed}"))
        };
        Scenario {
            seed,
            messages,
            keys,
            hot_share,
            fail_share: rng.pick(&[0.0, 0.02, 0.1, 0.3]),
            dup_share: rng.pick(&[0.0, 0.02, 0.1]),
            slow_rate: rng.pick(&[0.0, 0.01, 0.05]),
            slow_ms: rng.pick(&[3, 10]),
            long_slow: if profile == 3 || rng.chance(0.2) {
                1 + rng.below(2) as usize
            } else {
                0
            },
            waves: 1 + rng.below(3) as usize,
            backlog: rng.chance(0.5),
            instances,
            batch_handler: rng.chance(0.4),
            filtered: rng.chance(0.5),
            restarts,
            outage,
            config,
        }
    }

    /// Every message's plan, in publication order.
    fn plans(&self) -> Vec<Plan> {
        let mut rng = Rng(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xF00D);
        let max = self.config.max_attempts;
        let mut plans: Vec<Plan> = (0..self.messages)
            .map(|_| {
                let key = if self.hot_share > 0.0 && rng.chance(self.hot_share) {
                    "hot".to_owned()
                } else {
                    format!("k{}", rng.below(self.keys as u64))
                };
                let (steps, forever) = if rng.chance(self.fail_share) {
                    script(&mut rng, max)
                } else {
                    (Vec::new(), false)
                };
                let dup = if rng.chance(self.dup_share) {
                    rng.pick(&[Dup::SameId, Dup::Copy, Dup::Copy])
                } else {
                    Dup::None
                };
                Plan {
                    key,
                    steps,
                    forever,
                    dup,
                    late_dup: rng.chance(0.5),
                    long_slow: false,
                }
            })
            .collect();
        // The long sleepers are messages that always succeed, so that they run once.
        let clean: Vec<usize> = (0..plans.len())
            .filter(|i| plans[*i].steps.is_empty())
            .collect();
        for _ in 0..self.long_slow.min(clean.len()) {
            let at = clean[rng.below(clean.len() as u64) as usize];
            plans[at].long_slow = true;
        }
        plans
    }

    fn restarted(&self) -> bool {
        !self.restarts.is_empty()
    }

    fn summary(&self) -> String {
        let mode = match self.config.mode {
            Mode::Strict => "strict".to_owned(),
            Mode::Batched { max_messages } => format!("batched({max_messages})"),
        };
        let restarts: Vec<String> = self
            .restarts
            .iter()
            .map(|(at, kind)| format!("{kind:?}@{}ms", at.as_millis()))
            .collect();
        format!(
            "seed={} messages={} keys={} hot={} fail={} dups={} slow={}x{}ms long_slow={} waves={} backlog={} instances={} mode={mode} batch_handler={} lanes={} max_attempts={} ack_wait={:?} retry={:?}..{:?} restarts=[{}] outage={:?}",
            self.seed,
            self.messages,
            self.keys,
            self.hot_share,
            self.fail_share,
            self.dup_share,
            self.slow_rate,
            self.slow_ms,
            self.long_slow,
            self.waves,
            self.backlog,
            self.instances,
            self.batch_handler,
            self.config.concurrency,
            self.config.max_attempts,
            self.config.ack_wait,
            self.config.retry_min_delay,
            self.config.retry_max_delay,
            restarts.join(","),
            self.outage
                .map(|(at, len)| (at.as_millis(), len.as_millis())),
        )
    }
}

/// A failure script: (steps, forever).
fn script(rng: &mut Rng, max: u32) -> (Vec<Step>, bool) {
    let kinds = [Step::Retry, Step::Panic, Step::InsertFail, Step::CommitFail];
    let kind = rng.pick(&kinds);
    let mixed = rng.chance(0.3);
    let step = |rng: &mut Rng| if mixed { rng.pick(&kinds) } else { kind };
    match rng.below(10) {
        // A few failures, then success (within the attempts when there is room).
        0..=3 if max > 1 => {
            let n = 1 + rng.below(u64::from(max - 1)) as usize;
            ((0..n).map(|_| step(rng)).collect(), false)
        }
        // Permanent, maybe after a few failures.
        4..=5 => {
            let n = rng.below(u64::from(max)) as usize;
            let mut steps: Vec<Step> = (0..n).map(|_| step(rng)).collect();
            steps.push(Step::Permanent);
            (steps, false)
        }
        // Failing forever (or for exactly max_attempts, which is the same).
        _ => {
            let n = 1 + rng.below(u64::from(max)) as usize;
            ((0..n).map(|_| step(rng)).collect(), true)
        }
    }
}

// ---------------------------------------------------------------------------------------
// The handler.
// ---------------------------------------------------------------------------------------

/// The event every message carries: its index in the scenario and its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: u32,
    key: String,
}

impl Event for Work {
    const NAME: &'static str = "gen.work";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.key.clone()
    }
}

/// One handler run, as the handler saw it.
#[derive(Debug, Clone)]
struct Run {
    n: u32,
    attempt: u32,
    delivered: Option<u32>,
    instance: Arc<str>,
    /// The stream sequence of the delivery (a copy has its own).
    stream_seq: Option<u64>,
    /// Messages in the handler call (1 for a per-message handler).
    batch: usize,
}

/// What every instance's handler shares: the scripts and the record of runs.
struct Shared {
    seed: u64,
    plans: Vec<Plan>,
    slow_rate: f64,
    slow_ms: u64,
    ack_wait: Duration,
    runs: Mutex<Vec<Run>>,
}

impl Shared {
    fn runs_of(&self, n: u32) -> Vec<Run> {
        let runs = self.runs.lock().expect("runs");
        runs.iter().filter(|r| r.n == n).cloned().collect()
    }

    /// How long attempt `attempt` of message `n` sleeps before writing.
    fn pause(&self, n: u32, attempt: u32) -> Duration {
        let plan = &self.plans[n as usize];
        let mut rng = decide(self.seed, n, attempt, 0x51_0E);
        if plan.long_slow && attempt == 1 {
            return self.ack_wait + Duration::from_millis(200 + rng.below(600));
        }
        if self.slow_rate > 0.0 && rng.chance(self.slow_rate) {
            return Duration::from_millis(1 + rng.below(self.slow_ms));
        }
        Duration::ZERO
    }
}

#[derive(Clone)]
struct Worker {
    shared: Arc<Shared>,
    instance: Arc<str>,
}

/// One row of `effect` about to be written.
struct Row {
    id: String,
    n: i32,
    key: String,
    attempt: i32,
    fail_insert: bool,
    fail_commit: bool,
}

impl Worker {
    /// Records the run and returns what its script says for this attempt.
    fn begin(&self, work: &Work, delivery: &Delivery, batch: usize) -> (Option<Step>, Row) {
        self.shared.runs.lock().expect("runs").push(Run {
            n: work.n,
            attempt: delivery.attempt,
            delivered: delivery.delivered,
            stream_seq: delivery.stream_seq,
            instance: self.instance.clone(),
            batch,
        });
        let step = self
            .shared
            .plans
            .get(work.n as usize)
            .and_then(|plan| plan.step(delivery.attempt));
        let row = Row {
            id: delivery.envelope.id.to_string(),
            n: work.n as i32,
            key: work.key.clone(),
            attempt: delivery.attempt as i32,
            fail_insert: step == Some(Step::InsertFail),
            fail_commit: step == Some(Step::CommitFail),
        };
        (step, row)
    }

    /// The handler's disposition after writing, for a step.
    fn finish(&self, n: u32, attempt: u32, step: Option<Step>) -> Result<(), HandlerError> {
        match step {
            None | Some(Step::InsertFail) | Some(Step::CommitFail) => Ok(()),
            Some(Step::Retry) => {
                let error = std::io::Error::other(format!("injected retry: message {n}"));
                let mut rng = decide(self.shared.seed, n, attempt, 0xAF7E);
                if rng.chance(0.3) {
                    Err(HandlerError::retry_after(
                        Duration::from_millis(5 + rng.below(100)),
                        error,
                    ))
                } else {
                    Err(HandlerError::retry(error))
                }
            }
            Some(Step::Permanent) => Err(HandlerError::permanent_because(
                REJECTED,
                std::io::Error::other(format!("injected rejection: message {n}")),
            )),
            Some(Step::Panic) => {
                panic!("{INJECTED_PANIC}: message {n} attempt {attempt}")
            }
        }
    }

    async fn write(&self, conn: &mut PgConnection, rows: &[Row]) -> Result<(), HandlerError> {
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let ns: Vec<i32> = rows.iter().map(|r| r.n).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let fail_insert: Vec<bool> = rows.iter().map(|r| r.fail_insert).collect();
        let fail_commit: Vec<bool> = rows.iter().map(|r| r.fail_commit).collect();
        sqlx::query(
            "INSERT INTO effect (message_id, n, key, attempt, instance, fail_insert, fail_commit)
             SELECT id, n, key, attempt, $7, fi, fc
             FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::bool[], $6::bool[])
                 AS r(id, n, key, attempt, fi, fc)",
        )
        .bind(&ids)
        .bind(&ns)
        .bind(&keys)
        .bind(&attempts)
        .bind(&fail_insert)
        .bind(&fail_commit)
        .bind(&*self.instance)
        .execute(&mut *conn)
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

impl Handler<Work> for Worker {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        work: Work,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let (step, row) = self.begin(&work, delivery, 1);
        let pause = self.shared.pause(work.n, delivery.attempt);
        if !pause.is_zero() {
            // The handler's own work, not synchronisation.
            tokio::time::sleep(pause).await;
        }
        self.write(conn, std::slice::from_ref(&row)).await?;
        self.finish(work.n, delivery.attempt, step)
    }
}

impl BatchHandler<Work> for Worker {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(Work, &Delivery)>,
    ) -> Result<(), HandlerError> {
        let size = events.len();
        let mut rows = Vec::with_capacity(size);
        let mut steps = Vec::with_capacity(size);
        let mut pause = Duration::ZERO;
        for (work, delivery) in &events {
            let (step, row) = self.begin(work, delivery, size);
            pause += self.shared.pause(work.n, delivery.attempt);
            steps.push((work.n, delivery.attempt, step));
            rows.push(row);
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        self.write(conn, &rows).await?;
        for (n, attempt, step) in steps {
            self.finish(n, attempt, step)?;
        }
        Ok(())
    }
}

/// Injected panics would flood the output; every other panic still reports.
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info
                .payload_as_str()
                .is_some_and(|m| m.starts_with(INJECTED_PANIC))
            {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------
// Consumer instances: each on a runtime of its own, so that a kill drops every task of it.
// ---------------------------------------------------------------------------------------

struct Instance {
    name: String,
    /// Taken when the instance goes; dropped in the background otherwise (a runtime may not
    /// be dropped inside another).
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    /// What `run()` returned, once it did.
    ended: Option<Result<(), String>>,
}

impl Instance {
    fn start(
        db_url: &str,
        nats_url: &str,
        scenario: &Scenario,
        shared: &Arc<Shared>,
        name: String,
    ) -> Instance {
        let options: PgConnectOptions = db_url.parse().expect("database url");
        let options = options.application_name(&name);
        let config = scenario.config.clone();
        let config = ConsumerConfig {
            filter_subjects: if scenario.filtered {
                vec![format!("gen.s{}.>", scenario.seed)]
            } else {
                Vec::new()
            },
            ..config
        };
        let worker = Worker {
            shared: shared.clone(),
            instance: Arc::from(name.as_str()),
        };
        let batch_handler = scenario.batch_handler;
        let nats_url = nats_url.to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let client = async_nats::connect(&nats_url)
                .await
                .map_err(|e| format!("nats: {e}"))?;
            let js = jetstream::new(client);
            let pool = PgPoolOptions::new()
                .max_connections(config.concurrency as u32 + 2)
                .connect_lazy_with(options);
            let consumer = if batch_handler {
                Consumer::with_batch_handler(config, pool, js, typed_batch(worker))
            } else {
                Consumer::new(config, pool, js, typed(worker))
            }
            .map_err(|e| format!("new: {e}"))?;
            consumer
                .run(async move {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| format!("run() returned an error: {e}"))
        });
        Instance {
            name,
            runtime: Some(runtime),
            stop: Some(stop),
            task,
            ended: None,
        }
    }

    /// What `run()` returned, if it returned (once: later calls say nothing).
    fn exited(&mut self) -> Option<String> {
        if self.ended.is_some() || !self.task.is_finished() {
            return None;
        }
        let result = match (&mut self.task).now_or_never() {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(format!("the run task failed: {e}")),
            None => return None,
        };
        self.ended = Some(result.clone());
        Some(format!(
            "{}: run() returned {result:?} though no shutdown was asked",
            self.name
        ))
    }

    /// Asks for shutdown and waits for `run()`: `Ok` is the only acceptable answer.
    async fn stop(mut self) -> Result<(), String> {
        if self.ended.is_some() {
            self.end();
            return Err(format!("{}: it had stopped on its own", self.name));
        }
        drop(self.stop.take());
        let result = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        self.end();
        match result {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("{}: {e}", self.name)),
            Ok(Err(e)) => Err(format!("{}: the run task failed: {e}", self.name)),
            Err(_) => Err(format!("{}: run() did not return within 30 s", self.name)),
        }
    }

    /// Drops the `run()` future mid-flight; the process (runtime, connections) lives on
    /// a moment, then goes.
    async fn abort(mut self) {
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.end();
    }

    /// Drops every task of the instance and ends its database sessions, as a SIGKILL would.
    async fn kill(mut self, admin: &PgPool) {
        self.end();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&self.name)
        .execute(admin)
        .await
        .expect("terminate the killed instance's sessions");
    }

    /// Drops every task of the instance's runtime.
    fn end(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.end();
    }
}

// ---------------------------------------------------------------------------------------
// One scenario: publish, consume with faults, wait for quiescence, check.
// ---------------------------------------------------------------------------------------

const SCHEMA: &str = "
CREATE TABLE effect (
    message_id text NOT NULL,
    n integer NOT NULL,
    key text NOT NULL,
    attempt integer NOT NULL,
    instance text NOT NULL,
    fail_insert boolean NOT NULL,
    fail_commit boolean NOT NULL
);
CREATE FUNCTION effect_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.fail_insert THEN
        RAISE EXCEPTION 'injected insert failure: message % attempt %', NEW.n, NEW.attempt;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER effect_insert BEFORE INSERT ON effect
    FOR EACH ROW EXECUTE FUNCTION effect_insert();
CREATE FUNCTION effect_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.fail_commit THEN
        RAISE EXCEPTION 'injected commit failure: message % attempt %', NEW.n, NEW.attempt;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER effect_commit AFTER INSERT ON effect
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION effect_commit();
CREATE TABLE outage (on_ boolean);
CREATE FUNCTION inbox_outage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outage) THEN
        RAISE EXCEPTION 'inbox_message is unavailable (injected outage)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER inbox_outage BEFORE INSERT ON inbox_message
    FOR EACH ROW EXECUTE FUNCTION inbox_outage();
";

/// One publication: subject, headers, payload.
type Publication = (String, HeaderMap, Bytes);

/// Publishes in order, up to 256 PubAcks outstanding.
async fn publish(js: &jetstream::Context, batch: &[Publication]) -> Result<(), String> {
    for chunk in batch.chunks(256) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (subject, headers, payload) in chunk {
            let ack = js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| format!("publish: {e}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| format!("PubAck: {e}"))?;
        }
    }
    Ok(())
}

/// The waves of publications: each message in its wave, its duplicate right after it or with
/// the next wave (the last wave's late duplicates form a wave of their own).
fn waves(scenario: &Scenario, plans: &[Plan]) -> Vec<Vec<Publication>> {
    let per_wave = scenario.messages.div_ceil(scenario.waves);
    let mut waves: Vec<Vec<Publication>> = vec![Vec::new(); scenario.waves + 1];
    for (n, plan) in plans.iter().enumerate() {
        let wave = n / per_wave;
        let work = Work {
            n: n as u32,
            key: plan.key.clone(),
        };
        let mut envelope = Envelope::from_event(
            HeaderText::new("source", "generative").expect("source"),
            &work,
        )
        .expect("envelope");
        envelope.id = message_id(scenario.seed, n);
        envelope.subject = Subject::new(format!("gen.s{}.work", scenario.seed)).expect("subject");
        let headers = envelope::nats::to_headers(&envelope).expect("headers");
        let subject = envelope.subject.to_string();
        waves[wave].push((subject.clone(), headers.clone(), envelope.payload.clone()));
        let again = match plan.dup {
            Dup::None => continue,
            Dup::SameId => headers,
            Dup::Copy => {
                let mut copy = headers;
                copy.insert(
                    HeaderName::from_str("Nats-Msg-Id").expect("name"),
                    HeaderValue::from_str(&format!("{}-copy", envelope.id)).expect("value"),
                );
                copy
            }
        };
        let at = if plan.late_dup { wave + 1 } else { wave };
        waves[at].push((subject, again, envelope.payload.clone()));
    }
    waves
}

/// Message `n`'s id: the same in every run of a seed.
fn message_id(seed: u64, n: usize) -> MessageId {
    MessageId::from_uuid(Uuid::from_u64_pair(seed, n as u64 + 1))
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

async fn set_outage(pool: &PgPool, on: bool) {
    let sql = if on {
        "INSERT INTO outage VALUES (true)"
    } else {
        "DELETE FROM outage"
    };
    sqlx::query(sql).execute(pool).await.expect("outage switch");
}

/// The broker's view of the durable: (deliveries, ack pending, not yet delivered).
async fn broker_view(js: &jetstream::Context, scenario: &Scenario) -> Option<(u64, usize, u64)> {
    let info = js
        .get_stream(&scenario.config.stream)
        .await
        .ok()?
        .consumer_info(&scenario.config.name)
        .await
        .ok()?;
    Some((
        info.delivered.consumer_sequence,
        info.num_ack_pending,
        info.num_pending,
    ))
}

/// The scheduled events of a run, in time order.
enum Scheduled {
    Wave(usize),
    Restart(Restart),
    Outage(bool),
}

/// Runs one scenario; returns a one-line summary, or what the checker found.
async fn run_scenario(
    pg: &Postgres,
    nats: &NatsServer,
    scenario: Scenario,
) -> Result<String, String> {
    let seed = scenario.seed;
    let started = Instant::now();
    let db_url = pg.fresh_database().await.map_err(|e| e.to_string())?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    migrations::migrate(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    drop(conn);
    sqlx::raw_sql(SCHEMA)
        .execute(&pool)
        .await
        .map_err(|e| format!("schema: {e}"))?;
    let js = jetstream::new(
        async_nats::connect(nats.url())
            .await
            .map_err(|e| e.to_string())?,
    );
    js.create_stream(jetstream::stream::Config {
        name: scenario.config.stream.clone(),
        subjects: vec![format!("gen.s{seed}.>")],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("stream: {e}"))?;

    let plans = scenario.plans();
    let shared = Arc::new(Shared {
        seed,
        plans: plans.clone(),
        slow_rate: scenario.slow_rate,
        slow_ms: scenario.slow_ms,
        ack_wait: scenario.config.ack_wait,
        runs: Mutex::default(),
    });
    let waves = waves(&scenario, &plans);
    let stored: usize = plans.len() + plans.iter().filter(|p| p.dup == Dup::Copy).count();

    // The schedule: waves, restarts and the outage, by time after the consumers start.
    let mut rng = Rng(seed ^ 0x5C4E_D01E);
    let mut schedule: Vec<(Duration, Scheduled)> = Vec::new();
    let first = usize::from(scenario.backlog);
    if scenario.backlog {
        publish(&js, &waves[0]).await?;
    }
    let mut at = Duration::ZERO;
    for wave in first..waves.len() {
        if wave > 0 {
            at += Duration::from_millis(100 + rng.below(500));
        }
        schedule.push((at, Scheduled::Wave(wave)));
    }
    for (at, kind) in &scenario.restarts {
        schedule.push((*at, Scheduled::Restart(*kind)));
    }
    if let Some((at, len)) = scenario.outage {
        schedule.push((at, Scheduled::Outage(true)));
        schedule.push((at + len, Scheduled::Outage(false)));
    }
    schedule.sort_by_key(|(at, _)| *at);

    let mut problems: Vec<String> = Vec::new();
    let mut generation = 0;
    let mut instances: Vec<Instance> = (0..scenario.instances)
        .map(|i| Instance::start(&db_url, nats.url(), &scenario, &shared, format!("c{i}-g0")))
        .collect();
    let t0 = Instant::now();
    for (at, event) in schedule {
        tokio::time::sleep_until(t0 + at).await;
        for instance in &mut instances {
            problems.extend(instance.exited());
        }
        match event {
            Scheduled::Wave(wave) => {
                if let Err(e) = publish(&js, &waves[wave]).await {
                    problems.push(format!("wave {wave}: {e}"));
                }
            }
            Scheduled::Outage(on) => set_outage(&pool, on).await,
            Scheduled::Restart(kind) => {
                let victim = instances.remove(rng.below(instances.len() as u64) as usize);
                match kind {
                    Restart::Graceful => {
                        if let Err(e) = victim.stop().await {
                            problems.push(format!("graceful restart: {e}"));
                        }
                    }
                    Restart::Abort => victim.abort().await,
                    Restart::Kill => victim.kill(&pool).await,
                }
                generation += 1;
                let name = format!("c{}-g{generation}", instances.len());
                instances.push(Instance::start(
                    &db_url,
                    nats.url(),
                    &scenario,
                    &shared,
                    name,
                ));
            }
        }
    }

    // Quiescence: every message in effect or dead_letter, nothing pending at the broker, or
    // an instance that stopped on its own.
    let deadline = Duration::from_secs(90);
    let resolved = || async {
        count(
            &pool,
            "SELECT count(*) FROM (SELECT message_id FROM effect
                 UNION SELECT message_id FROM dead_letter) AS u",
        )
        .await
    };
    let quiet = wait_until(deadline, "quiescence", || async {
        instances.iter().any(|i| i.task.is_finished())
            || (resolved().await >= plans.len() as i64
                && broker_view(&js, &scenario)
                    .await
                    .is_some_and(|(_, ack_pending, pending)| ack_pending == 0 && pending == 0))
    })
    .await;
    for instance in &mut instances {
        problems.extend(instance.exited());
    }
    let view = broker_view(&js, &scenario).await;
    if quiet.is_err() {
        problems.push(format!(
            "no quiescence within {deadline:?}: {} of {} messages resolved, broker (deliveries, ack pending, pending) {view:?}",
            resolved().await,
            plans.len()
        ));
    }
    for instance in instances {
        if let Err(e) = instance.stop().await {
            problems.push(format!("final stop: {e}"));
        }
    }
    let stream_messages = js
        .get_stream(&scenario.config.stream)
        .await
        .map_err(|e| e.to_string())?
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    if stream_messages != stored as u64 {
        problems.push(format!(
            "the stream holds {stream_messages} messages, {stored} were meant to be stored"
        ));
    }
    let stats = check(&scenario, &pool, &shared, &mut problems).await;
    let _ = js.delete_stream(&scenario.config.stream).await;
    pool.close().await;
    let summary = format!(
        "{} | {stats} deliveries={} elapsed_s={:.1}",
        scenario.summary(),
        view.map_or(0, |v| v.0),
        started.elapsed().as_secs_f64()
    );
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}\n  {}", problems.join("\n  ")))
    }
}

/// The history checker (see the module docs). Returns a few counts for the summary.
async fn check(
    scenario: &Scenario,
    pool: &PgPool,
    shared: &Shared,
    problems: &mut Vec<String>,
) -> String {
    let name = scenario.config.name.as_str();
    let max = scenario.config.max_attempts;
    let effects: HashMap<String, (i64, i32, i32, String)> =
        sqlx::query_as::<_, (String, i64, i32, i32, String)>(
            "SELECT message_id, count(*), min(attempt), max(attempt), string_agg(instance, ',')
         FROM effect GROUP BY message_id",
        )
        .fetch_all(pool)
        .await
        .expect("effects")
        .into_iter()
        .map(|(id, c, lo, hi, at)| (id, (c, lo, hi, at)))
        .collect();
    let letters: HashMap<String, (String, i32, String, i32)> =
        sqlx::query_as::<_, (String, String, i32, String, i32)>(
            "SELECT message_id, reason, attempts, status, jsonb_array_length(history)
             FROM dead_letter WHERE consumer = $1",
        )
        .bind(name)
        .fetch_all(pool)
        .await
        .expect("dead letters")
        .into_iter()
        .map(|(id, reason, attempts, status, parked)| (id, (reason, attempts, status, parked)))
        .collect();
    let all_letters = count(pool, "SELECT count(*) FROM dead_letter").await;
    let inbox: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT message_id, outcome FROM inbox_message WHERE consumer = $1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .expect("inbox rows")
    .into_iter()
    .collect();
    let attempt_rows: Vec<String> = sqlx::query_scalar("SELECT message_id FROM inbox_attempt")
        .fetch_all(pool)
        .await
        .expect("attempt rows");

    let strict = std::env::var("INBOX_FUZZ_STRICT").is_ok_and(|v| v == "1");
    let mut copy_resets: HashSet<u32> = HashSet::new();
    let mut reset_ids: HashSet<String> = HashSet::new();
    let mut double_parks = 0;
    let mut bad: Vec<String> = Vec::new();
    let mut known: HashSet<String> = HashSet::new();
    let (mut processed, mut parked) = (0, 0);
    for (n, plan) in shared.plans.iter().enumerate() {
        let id = message_id(scenario.seed, n).to_string();
        let effect = effects.get(&id);
        let letter = letters.get(&id);
        let outcome = inbox.get(&id).map(String::as_str);
        let expect = plan.expect(max);
        match expect {
            Expect::Processed { .. } => processed += 1,
            Expect::Parked { .. } => parked += 1,
        }
        let reset = copy_reset(plan, &shared.runs_of(n as u32));
        if reset {
            copy_resets.insert(n as u32);
            reset_ids.insert(id.clone());
            double_parks += usize::from(letter.is_some_and(|l| l.3 > 1));
        }
        let wrong = if reset && !strict {
            resolved_once(effect, letter, outcome)
        } else {
            judge(expect, effect, letter, outcome)
        };
        known.insert(id.clone());
        if !wrong.is_empty() {
            let runs: Vec<String> = shared
                .runs_of(n as u32)
                .iter()
                .map(|r| {
                    format!(
                        "a{} d{} s{} {} b{}",
                        r.attempt,
                        r.delivered.map_or("-".to_owned(), |d| d.to_string()),
                        r.stream_seq.map_or("-".to_owned(), |d| d.to_string()),
                        r.instance,
                        r.batch
                    )
                })
                .collect();
            bad.push(format!(
                "message {n} ({id}, key {}, script {}, expected {:?}{}): {}; handler runs [{}]",
                plan.key,
                plan.script(),
                plan.expect(max),
                if reset {
                    ", its copy restarted the attempts"
                } else {
                    ""
                },
                wrong.join(", "),
                runs.join("; ")
            ));
        }
    }
    if !bad.is_empty() {
        problems.push(format!(
            "{} messages wrong; first ones:\n    {}",
            bad.len(),
            bad.iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n    ")
        ));
    }
    let unknown_effects = effects.keys().filter(|id| !known.contains(*id)).count();
    if unknown_effects > 0 {
        problems.push(format!(
            "{unknown_effects} effects of message ids never published"
        ));
    }
    if all_letters != letters.len() as i64 || letters.keys().any(|id| !known.contains(id)) {
        problems.push(format!(
            "dead letters nobody meant: {all_letters} in dead_letter, {} expected ids among {} of this consumer",
            letters.keys().filter(|id| known.contains(*id)).count(),
            letters.len()
        ));
    }
    if inbox.len() != shared.plans.len() {
        problems.push(format!(
            "{} inbox rows for {} messages",
            inbox.len(),
            shared.plans.len()
        ));
    }
    let left: Vec<&String> = attempt_rows
        .iter()
        .filter(|id| strict || !reset_ids.contains(*id))
        .collect();
    if !left.is_empty() {
        problems.push(format!(
            "{} inbox_attempt rows left after every message was resolved, e.g. {}",
            left.len(),
            left[0]
        ));
    }

    // What the handler saw.
    let runs = shared.runs.lock().expect("runs").clone();
    if let Some(r) = runs
        .iter()
        .find(|r| (r.attempt == 0 || r.attempt > max) && (strict || !copy_resets.contains(&r.n)))
    {
        problems.push(format!(
            "the handler saw attempt {} of message {} (max_attempts {max}); its runs: {:?}",
            r.attempt,
            r.n,
            shared.runs_of(r.n)
        ));
    }
    if !scenario.restarted() && scenario.outage.is_none() {
        let redelivered: Vec<&Run> = runs
            .iter()
            .filter(|r| {
                shared.plans[r.n as usize].steps.is_empty() && r.delivered.is_some_and(|d| d > 1)
            })
            .collect();
        if let Some(first) = redelivered.first() {
            problems.push(format!(
                "{} runs of always-succeeding messages came from redeliveries though no instance restarted, e.g. message {} ({}): {:?}",
                redelivered.len(),
                first.n,
                shared.plans[first.n as usize].script(),
                shared.runs_of(first.n)
            ));
        }
    }
    format!(
        "processed={processed} parked={parked} runs={} copy_resets={} copy_double_parks={double_parks} copy_stale_attempts={}",
        runs.len(),
        copy_resets.len(),
        attempt_rows.len() - left.len()
    )
}

/// An effect as the checker reads it: (rows, lowest attempt, highest attempt, instances).
type Effect = (i64, i32, i32, String);
/// A dead letter as the checker reads it: (reason, attempts, status, times parked).
type Letter = (String, i32, String, i32);

/// What is wrong with one message's end state, against what its script says.
fn judge(
    expect: Expect,
    effect: Option<&Effect>,
    letter: Option<&Letter>,
    outcome: Option<&str>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    match expect {
        Expect::Processed { attempt } => {
            match effect {
                None => wrong.push("no effect".to_owned()),
                Some((1, a, _, _)) if *a == attempt as i32 => {}
                Some((1, a, _, _)) => wrong.push(format!(
                    "took effect at attempt {a}, its script succeeds at attempt {attempt}"
                )),
                Some((c, lo, hi, at)) => wrong.push(format!(
                    "took effect {c} times (attempts {lo}..{hi}, instances {at})"
                )),
            }
            if let Some((reason, attempts, ..)) = letter {
                wrong.push(format!("also parked ({reason}, attempts {attempts})"));
            }
            if outcome != Some("processed") {
                wrong.push(format!("inbox outcome {outcome:?}"));
            }
        }
        Expect::Parked { reason, attempts } => {
            if let Some((c, lo, hi, at)) = effect {
                wrong.push(format!(
                    "took effect {c} times (attempts {lo}..{hi}, instances {at}) though parked"
                ));
            }
            match letter {
                None => wrong.push("not parked".to_owned()),
                Some((r, a, status, times)) => {
                    if r != reason || *a != attempts as i32 {
                        wrong.push(format!(
                            "parked with ({r}, attempts {a}), expected ({reason}, attempts {attempts})"
                        ));
                    }
                    if status != "dead" || *times != 1 {
                        wrong.push(format!("dead letter status {status}, parked {times} times"));
                    }
                }
            }
            if outcome != Some("dead_lettered") {
                wrong.push(format!("inbox outcome {outcome:?}"));
            }
        }
    }
    wrong
}

/// The weaker check for a message whose copy restarted its attempts (see [`copy_reset`]):
/// processed exactly once, or parked and never processed, whatever the attempt numbers. A
/// second park is allowed: the original and its copy, delivered at once to two instances,
/// can both reach the last attempt and both record the dead letter (`park_in` writes it
/// before its inbox row, whose `ON CONFLICT DO NOTHING` result it ignores), which sums the
/// attempts and appends a second failure to the letter's history.
fn resolved_once(
    effect: Option<&Effect>,
    letter: Option<&Letter>,
    outcome: Option<&str>,
) -> Vec<String> {
    match (effect, letter) {
        (Some((1, ..)), None) if outcome == Some("processed") => Vec::new(),
        (None, Some((_, _, status, 1 | 2)))
            if status == "dead" && outcome == Some("dead_lettered") =>
        {
            Vec::new()
        }
        _ => vec![format!(
            "not resolved exactly once: effect {effect:?}, dead letter {letter:?}, inbox outcome {outcome:?}"
        )],
    }
}

/// Whether a copy of the message (stored under another `Nats-Msg-Id`) had its first delivery
/// after the original failed an attempt: concurrent copies on two instances can each run one
/// attempt beyond `max_attempts` (see the module docs). Unless `INBOX_FUZZ_STRICT=1` the
/// checker only asks such a message to be resolved exactly once.
fn copy_reset(plan: &Plan, runs: &[Run]) -> bool {
    if plan.dup != Dup::Copy || plan.step(1).is_none() {
        return false;
    }
    let first_deliveries: HashSet<Option<u64>> = runs
        .iter()
        .filter(|r| r.delivered == Some(1))
        .map(|r| r.stream_seq)
        .collect();
    first_deliveries.len() > 1
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("INBOX_FUZZ_SEED") {
        return vec![seed.parse().expect("INBOX_FUZZ_SEED is a number")];
    }
    if let Ok(n) = std::env::var("INBOX_FUZZ_SEEDS") {
        let n: u64 = n.parse().expect("INBOX_FUZZ_SEEDS is a number");
        let start = std::env::var("INBOX_FUZZ_START")
            .ok()
            .map(|s| s.parse().expect("INBOX_FUZZ_START is a number"))
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() % 1_000_000 * 1_000)
                    .unwrap_or(1_000)
            });
        println!("inbox fuzz: seeds {start}..{}", start + n);
        return (start..start + n).collect();
    }
    FIXED_SEEDS.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_histories_take_effect_once_and_park_what_must_fail() {
    quiet_injected_panics();
    let (pg, nats) = tokio::join!(Postgres::start(), NatsServer::start());
    let (pg, nats) = (pg.expect("PostgreSQL"), nats.expect("nats-server"));
    let seeds = seeds();
    let mut failed = Vec::new();
    for (i, seed) in seeds.iter().enumerate() {
        match run_scenario(&pg, &nats, Scenario::generate(*seed)).await {
            Ok(summary) => println!("ok {}/{}: {summary}", i + 1, seeds.len()),
            Err(failure) => {
                println!("FAILED {}/{}: {failure}", i + 1, seeds.len());
                failed.push((*seed, failure));
            }
        }
    }
    if let Some((seed, failure)) = failed.first() {
        let all: Vec<String> = failed.iter().map(|(s, _)| s.to_string()).collect();
        panic!(
            "inbox fuzz: {} of {} seeds failed ({}); first: seed {seed} (replay: INBOX_FUZZ_SEED={seed} cargo test -p outbox-toolkit-inbox --test generative -- --nocapture)\n  {failure}",
            failed.len(),
            seeds.len(),
            all.join(", ")
        );
    }
}
