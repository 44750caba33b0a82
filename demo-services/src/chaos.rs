//! The chaos run behind `make chaos`: the demo topology as processes, a steady load of
//! orders, and a seeded schedule of faults (broker SIGKILLs and a pause, relay SIGKILLs and
//! a SIGTERM, consumer services SIGKILLed mid-handler, a PostgreSQL immediate restart, a
//! slowed and cut link between a relay and the broker); then quiescence, the saga's
//! invariants, and the streams checked against the outboxes (every published row in its
//! stream once, each partition key's messages in commit order). The same seed gives the same
//! orders, payments, probe keys and fault schedule (timing still varies with the machine).
//!
//! Besides the orders (each order id is a partition key), a probe workload writes outbox rows
//! straight into order-service's and inventory-service's databases, as a second producer of
//! each service would: thousands of distinct keys written twice each and one hot key written
//! over and over, on subjects the stream captures and no consumer subscribes to. Nothing in
//! the demo's API enqueues many events for one key, and the per-key ordering guarantee is
//! only tested by a key with many events in flight through the faults.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::client;
use crate::order::PaymentSimulation;
use crate::stack::{SEED_PRODUCTS, Stack, StackOptions, Urls};

/// How to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Orders to place.
    pub orders: usize,
    /// Orders per second.
    pub rate: f64,
    /// Seed of the orders, payments and fault schedule.
    pub seed: u64,
    /// Run directory (logs, mail).
    pub dir: PathBuf,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// A 3-node JetStream cluster with an R3 stream, and the cluster schedule (stream
    /// leader SIGKILLed, then a follower) instead of the single-server one.
    pub cluster: bool,
    /// Probe workload: distinct partition keys per outbox, each written twice.
    pub keys: usize,
    /// Probe workload: events on the one hot key of each outbox.
    pub hot: usize,
}

/// A small seeded generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform milliseconds in `[lo, hi)`.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// Which relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// order-service's.
    Order,
    /// inventory-service's.
    Inventory,
}

/// Which consumer service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// inventory-service.
    Inventory,
    /// email-service.
    Email,
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL nats-server, restart it on the same store after `down`.
    KillBroker {
        /// Time down.
        down: Duration,
    },
    /// SIGSTOP nats-server for `hung`, then SIGKILL it (a hung broker killed by a watchdog):
    /// what clients sent during the hang dies in its socket buffers. Restart after `down`.
    HangThenKillBroker {
        /// Time frozen before the kill (longer than the relays' 5 s publish timeout).
        hung: Duration,
        /// Time down.
        down: Duration,
    },
    /// SIGSTOP nats-server for `paused` (longer than the relays' 5 s publish timeout).
    PauseBroker {
        /// Time frozen.
        paused: Duration,
    },
    /// SIGKILL a relay, restart it after `down`.
    KillRelay {
        /// Which.
        relay: Relay,
        /// Time down.
        down: Duration,
    },
    /// SIGTERM a relay while it drains, restart it.
    TermRelay {
        /// Which.
        relay: Relay,
    },
    /// SIGKILL a consumer service (mid-handler under load), restart it after `down`.
    KillService {
        /// Which.
        service: Service,
        /// Time down.
        down: Duration,
    },
    /// PostgreSQL immediate shutdown (no checkpoint), restart after `down`.
    RestartPostgres {
        /// Time down.
        down: Duration,
    },
    /// 200 ms latency each way on order-service's relay link for `during`.
    SlowRelayLink {
        /// How long.
        during: Duration,
    },
    /// Cut order-service's relay link (every connection closed, new ones refused) for `during`.
    CutRelayLink {
        /// How long.
        during: Duration,
    },
    /// SIGKILL the cluster node that leads the saga's stream, restart it after `down`.
    KillStreamLeader {
        /// Time down.
        down: Duration,
    },
    /// SIGKILL a cluster node that follows the saga's stream, restart it after `down`.
    KillStreamFollower {
        /// Time down.
        down: Duration,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillBroker { down } => write!(f, "SIGKILL nats-server, restart after {down:?}"),
            Fault::PauseBroker { paused } => write!(f, "SIGSTOP nats-server for {paused:?}"),
            Fault::HangThenKillBroker { hung, down } => write!(
                f,
                "SIGSTOP nats-server for {hung:?}, then SIGKILL it, restart after {down:?}"
            ),
            Fault::KillRelay { relay, down } => {
                write!(f, "SIGKILL {relay:?} relay, restart after {down:?}")
            }
            Fault::TermRelay { relay } => {
                write!(f, "SIGTERM {relay:?} relay while draining, restart")
            }
            Fault::KillService { service, down } => {
                write!(f, "SIGKILL {service:?} service, restart after {down:?}")
            }
            Fault::RestartPostgres { down } => {
                write!(f, "PostgreSQL immediate shutdown, restart after {down:?}")
            }
            Fault::SlowRelayLink { during } => write!(
                f,
                "200 ms latency on the order relay's broker link for {during:?}"
            ),
            Fault::CutRelayLink { during } => {
                write!(f, "cut the order relay's broker link for {during:?}")
            }
            Fault::KillStreamLeader { down } => {
                write!(f, "SIGKILL the stream leader node, restart after {down:?}")
            }
            Fault::KillStreamFollower { down } => {
                write!(f, "SIGKILL a stream follower node, restart after {down:?}")
            }
        }
    }
}

/// The fault schedule for `seed` over a load of `load` duration: every fault the suite
/// promises, in a seeded order, at seeded times spread over the load.
pub fn schedule(seed: u64, load: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = Rng::new(seed ^ 0x00c4_a05f_a017);
    let mut faults = vec![
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::PauseBroker {
            paused: Duration::from_secs(7),
        },
        Fault::HangThenKillBroker {
            hung: Duration::from_secs(6),
            down: rng.millis(500, 2000),
        },
        Fault::KillRelay {
            relay: Relay::Order,
            down: rng.millis(200, 2000),
        },
        Fault::KillRelay {
            relay: Relay::Inventory,
            down: rng.millis(200, 2000),
        },
        Fault::TermRelay {
            relay: if rng.below(2) == 0 {
                Relay::Order
            } else {
                Relay::Inventory
            },
        },
        Fault::KillService {
            service: Service::Inventory,
            down: rng.millis(200, 2000),
        },
        Fault::KillService {
            service: Service::Email,
            down: rng.millis(200, 2000),
        },
        Fault::RestartPostgres {
            down: rng.millis(200, 1500),
        },
        Fault::SlowRelayLink {
            during: Duration::from_secs(4),
        },
        Fault::CutRelayLink {
            during: rng.millis(1000, 3000),
        },
    ];
    for i in (1..faults.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        faults.swap(i, j);
    }
    let n = faults.len() as u32;
    let slot = load / n;
    faults
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let jitter = rng.millis(0, (slot.as_millis() as u64 / 2).max(1));
            (slot * i as u32 + slot / 4 + jitter, fault)
        })
        .collect()
}

/// The cluster schedule for `seed`: the stream leader SIGKILLed at about a third of the load,
/// a follower at about two thirds.
pub fn cluster_schedule(seed: u64, load: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = Rng::new(seed ^ 0x0c1_5e7e);
    vec![
        (
            load / 4 + rng.millis(0, (load.as_millis() as u64 / 8).max(1)),
            Fault::KillStreamLeader {
                down: rng.millis(1000, 4000),
            },
        ),
        (
            load * 3 / 5 + rng.millis(0, (load.as_millis() as u64 / 8).max(1)),
            Fault::KillStreamFollower {
                down: rng.millis(1000, 4000),
            },
        ),
    ]
}

/// The names of the saga stream's leader and followers, as the cluster reports them
/// (asking again for up to 30 s while a new leader is being elected).
async fn stream_placement(stack: &Stack) -> anyhow::Result<(String, Vec<String>)> {
    let start = Instant::now();
    loop {
        match try_stream_placement(stack).await {
            Ok(placement) => return Ok(placement),
            Err(e) if start.elapsed() > Duration::from_secs(30) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn try_stream_placement(stack: &Stack) -> anyhow::Result<(String, Vec<String>)> {
    let client = crate::platform::NatsConfig {
        url: stack.nats_url.clone(),
        ..crate::platform::NatsConfig::default()
    }
    .connect()
    .await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(crate::events::STREAM).await?;
    let info = stream.info().await?;
    let cluster = info
        .cluster
        .clone()
        .context("the stream has no cluster info")?;
    let leader = cluster.leader.context("the stream has no leader")?;
    let followers = cluster.replicas.iter().map(|r| r.name.clone()).collect();
    Ok((leader, followers))
}

/// The cluster node called `name`.
fn node<'a>(stack: &'a mut Stack, name: &str) -> anyhow::Result<&'a mut testkit::NatsServer> {
    if stack.nats.server_name().as_deref() == Some(name) {
        return Ok(&mut stack.nats);
    }
    stack
        .nats_peers
        .iter_mut()
        .find(|n| n.server_name().as_deref() == Some(name))
        .with_context(|| format!("no cluster node named {name}"))
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Orders acknowledged with 201.
    pub orders: usize,
    /// Orders in the database (acknowledged, plus any whose 201 was lost to a fault) that
    /// reached CONFIRMED or CANCELLED.
    pub terminal: usize,
    /// Acknowledged orders missing or never final.
    pub lost: usize,
    /// Effects that happened twice (an event published or handled twice for one order).
    pub duplicate_effects: usize,
    /// Emails sent.
    pub emails: i64,
    /// Faults injected.
    pub faults: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Probe events committed (both outboxes).
    pub probes: usize,
    /// What the stream check found.
    pub stream: StreamFindings,
    /// The first violated invariant, if any.
    pub violation: Option<String>,
}

impl Report {
    fn add_violation(&mut self, text: String) {
        self.violation = Some(match self.violation.take() {
            Some(v) => format!("{v}; also {text}"),
            None => text,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos seed={} orders={} terminal={} lost={} duplicate_effects={} emails={} faults={} elapsed_s={:.1}",
            self.seed,
            self.orders,
            self.terminal,
            self.lost,
            self.duplicate_effects,
            self.emails,
            self.faults,
            self.elapsed.as_secs_f64()
        )?;
        let s = &self.stream;
        write!(
            f,
            " probes={} stream_msgs={} stream_keys={} stream_missing={} stream_dups={} stream_unknown={} stream_mismatch={} key_order_violations={}",
            self.probes,
            s.msgs,
            s.keys,
            s.missing,
            s.dups,
            s.unknown,
            s.mismatch,
            s.key_order_violations
        )
    }
}

/// The items of the `n`-th order: mostly mice, some laptops.
fn order_items(rng: &mut Rng) -> Vec<(&'static str, i64)> {
    if rng.below(10) < 3 {
        let mut items = vec![("prod-001", 1)];
        if rng.below(2) == 0 {
            items.push(("prod-002", 1));
        }
        items
    } else {
        vec![("prod-002", 1 + rng.below(3) as i64)]
    }
}

/// One order placement: retried through faults (a 5xx or a dropped connection) until it
/// gets its 201 or `deadline` passes. A 4xx is a bug in the run, reported as such.
async fn place(
    urls: &Urls,
    user: String,
    items: Vec<(&'static str, i64)>,
    deadline: Instant,
) -> anyhow::Result<String> {
    let body = json!({
        "userId": user,
        "items": items.iter().map(|(product, quantity)| {
            let (_, name, _, price) = SEED_PRODUCTS.iter().find(|p| p.0 == *product).copied().unwrap_or_default();
            json!({ "productId": product, "productName": name, "quantity": quantity, "price": price })
        }).collect::<Vec<_>>(),
    });
    let url = format!("{}/orders", urls.order);
    loop {
        match client::post_json(&url, &body).await {
            Ok(r) if r.status == 201 => {
                return r.json["orderId"]
                    .as_str()
                    .map(str::to_owned)
                    .context("201 without orderId");
            }
            Ok(r) if (400..500).contains(&r.status) => {
                bail!("order of {user} refused: {} {}", r.status, r.text)
            }
            _ if Instant::now() > deadline => {
                bail!("order of {user} not accepted before the deadline")
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn load(urls: Urls, options: ChaosOptions) -> Vec<(String, anyhow::Result<String>)> {
    let mut rng = Rng::new(options.seed);
    let start = tokio::time::Instant::now();
    let deadline = Instant::now()
        + Duration::from_secs_f64(options.orders as f64 / options.rate)
        + Duration::from_secs(120);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.orders {
        let at = start + Duration::from_secs_f64(i as f64 / options.rate);
        tokio::time::sleep_until(at).await;
        let user = format!("chaos-{}-{i}", options.seed);
        let items = order_items(&mut rng);
        let urls = urls.clone();
        tasks.spawn(async move {
            let placed = place(&urls, user.clone(), items, deadline).await;
            (user, placed)
        });
    }
    let mut placed = Vec::with_capacity(options.orders);
    while let Some(done) = tasks.join_next().await {
        if let Ok(result) = done {
            placed.push(result);
        }
    }
    placed
}

/// The event type of the probe workload's rows.
pub const PROBE_TYPE: &str = "chaos.probe.v1";

/// An outbox the probe workload writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTarget {
    /// order-service's (published by the order relay, the one behind the faulty link).
    Orders,
    /// inventory-service's.
    Inventory,
}

impl ProbeTarget {
    /// Both, in the order they are reported.
    pub const ALL: [ProbeTarget; 2] = [ProbeTarget::Orders, ProbeTarget::Inventory];

    /// Short name, used in keys and reports.
    pub fn name(self) -> &'static str {
        match self {
            ProbeTarget::Orders => "orders",
            ProbeTarget::Inventory => "inventory",
        }
    }

    /// The subject of its probe rows: captured by the saga's stream (`order.>`,
    /// `inventory.>`), filtered out by every consumer (they subscribe to exact subjects).
    pub fn subject(self) -> &'static str {
        match self {
            ProbeTarget::Orders => "order.chaos_probe.v1",
            ProbeTarget::Inventory => "inventory.chaos_probe.v1",
        }
    }

    /// Its hot key.
    pub fn hot_key(self) -> String {
        format!("probe-{}-hot", self.name())
    }

    fn pool(self, stack: &Stack) -> PgPool {
        match self {
            ProbeTarget::Orders => stack.db.orders.clone(),
            ProbeTarget::Inventory => stack.db.inventory.clone(),
        }
    }
}

/// The partition keys of `target`'s probe rows in write order, for `seed`: `keys` distinct
/// keys twice each and the hot key `hot` times, shuffled.
pub fn probe_plan(seed: u64, target: ProbeTarget, keys: usize, hot: usize) -> Vec<String> {
    let salt = match target {
        ProbeTarget::Orders => 0x0050_2be0,
        ProbeTarget::Inventory => 0x0050_2be1,
    };
    let mut rng = Rng::new(seed ^ salt);
    let mut plan: Vec<String> = (0..keys)
        .flat_map(|k| {
            let key = format!("probe-{}-{k:05}", target.name());
            [key.clone(), key]
        })
        .chain(std::iter::repeat_n(target.hot_key(), hot))
        .collect();
    for i in (1..plan.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        plan.swap(i, j);
    }
    plan
}

/// One probe row in its own transaction, as a producer writes one.
async fn write_probe(
    pool: &PgPool,
    outbox: &outbox::Outbox,
    target: ProbeTarget,
    key: &str,
    n: usize,
) -> Result<Uuid, outbox::Error> {
    let message = outbox::Message::json(
        target.subject(),
        PROBE_TYPE,
        key,
        &json!({ "key": key, "n": n }),
    )?;
    let mut tx = pool.begin().await.map_err(outbox::Error::Database)?;
    let id = outbox.enqueue_message(&mut tx, message).await?;
    tx.commit().await.map_err(outbox::Error::Database)?;
    Ok(id.into())
}

/// Writes `plan` into `target`'s outbox, evenly spread over `over`, one row per transaction
/// and one transaction at a time (so one key's rows commit in `seq` order, as the aggregate's
/// row lock makes a service's do), retrying through faults until `deadline`. Returns the ids
/// whose commit succeeded (a commit cut by a fault may or may not have happened; it is
/// retried as a new row).
async fn write_probes(
    pool: PgPool,
    target: ProbeTarget,
    plan: Vec<String>,
    over: Duration,
    deadline: Instant,
) -> anyhow::Result<Vec<Uuid>> {
    let outbox = outbox::Outbox::new("chaos-probe")?;
    let start = tokio::time::Instant::now();
    let total = plan.len().max(1);
    let mut committed = Vec::with_capacity(plan.len());
    for (n, key) in plan.iter().enumerate() {
        tokio::time::sleep_until(start + over.mul_f64(n as f64 / total as f64)).await;
        loop {
            match write_probe(&pool, &outbox, target, key, n).await {
                Ok(id) => {
                    committed.push(id);
                    break;
                }
                Err(e) if e.kind() == outbox::ErrorKind::InvalidInput => {
                    bail!("probe {n} ({key}) refused by the outbox: {e}")
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "probe {n} ({key}) of the {} outbox not committed before the deadline: {e}",
                        target.name()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(committed)
}

/// The probe workload on both outboxes at once.
async fn probes(
    pools: Vec<(ProbeTarget, PgPool)>,
    options: ChaosOptions,
    over: Duration,
) -> anyhow::Result<Vec<Uuid>> {
    let deadline = Instant::now() + over + Duration::from_secs(120);
    let mut tasks = tokio::task::JoinSet::new();
    for (target, pool) in pools {
        let plan = probe_plan(options.seed, target, options.keys, options.hot);
        tasks.spawn(write_probes(pool, target, plan, over, deadline));
    }
    let mut committed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        committed.extend(done.context("a probe writer panicked")??);
    }
    Ok(committed)
}

/// One row of a service's `outbox_message`, as the stream check reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Which database.
    pub outbox: &'static str,
    /// The message id (`Nats-Msg-Id`).
    pub id: Uuid,
    /// Commit-ordered position.
    pub seq: i64,
    /// The partition key (`ce-partitionkey`).
    pub partition_key: String,
    /// `pending` or `published`.
    pub status: String,
    /// The stream of its PubAck.
    pub stream: Option<String>,
    /// The stream sequence of its PubAck.
    pub stream_seq: Option<i64>,
}

/// One message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The stream.
    pub stream: String,
    /// Its sequence there.
    pub seq: u64,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// Its `ce-partitionkey` header.
    pub partition_key: Option<String>,
}

/// What the stream check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamFindings {
    /// Messages read from the streams.
    pub msgs: usize,
    /// Distinct partition keys among them.
    pub keys: usize,
    /// Published rows (and committed probes) whose id is not in their stream.
    pub missing: usize,
    /// Extra copies of an id in the streams (after JetStream's dedup, a copy means a publish
    /// was retried after the duplicate window).
    pub dups: usize,
    /// Messages whose id no outbox row (nor committed probe) has.
    pub unknown: usize,
    /// Rows whose stream message disagrees with them: partition key header, or the stream
    /// and sequence of the PubAck recorded on the row.
    pub mismatch: usize,
    /// First occurrences of a key's ids out of the `seq` (commit) order of that outbox's
    /// rows: each id that first appears after an id of the same key and outbox with a
    /// higher `seq`.
    pub key_order_violations: usize,
    /// An example of each kind of problem, readable.
    pub problems: Vec<String>,
}

impl StreamFindings {
    /// Whether everything held.
    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.dups == 0
            && self.unknown == 0
            && self.mismatch == 0
            && self.key_order_violations == 0
    }
}

/// Checks the streams' messages (`entries`, any order) against the outbox rows of every
/// service and the ids of committed probes (whose rows must be there too, or at least their
/// messages).
pub fn check_stream_contents(
    rows: &[OutboxRow],
    committed: &[Uuid],
    entries: &[StreamEntry],
) -> StreamFindings {
    let mut entries: Vec<&StreamEntry> = entries.iter().collect();
    entries.sort_by(|a, b| (&a.stream, a.seq).cmp(&(&b.stream, b.seq)));
    let by_id: HashMap<Uuid, &OutboxRow> = rows.iter().map(|r| (r.id, r)).collect();
    let committed: HashSet<Uuid> = committed.iter().copied().collect();
    let mut findings = StreamFindings {
        msgs: entries.len(),
        keys: entries
            .iter()
            .filter_map(|e| e.partition_key.as_deref())
            .collect::<HashSet<_>>()
            .len(),
        ..StreamFindings::default()
    };
    let first = |kind: &str, text: String, problems: &mut Vec<String>| {
        if !problems.iter().any(|p| p.starts_with(kind)) {
            problems.push(format!("{kind}: {text}"));
        }
    };
    let mut problems = Vec::new();

    // Where each id is, in stream order.
    let mut occurrences: HashMap<Uuid, Vec<&StreamEntry>> = HashMap::new();
    for entry in &entries {
        match entry.msg_id.as_deref().map(Uuid::parse_str) {
            Some(Ok(id)) => {
                if !by_id.contains_key(&id) && !committed.contains(&id) {
                    findings.unknown += 1;
                    first(
                        "unknown",
                        format!(
                            "{}:{} has id {id}, which no outbox row has",
                            entry.stream, entry.seq
                        ),
                        &mut problems,
                    );
                }
                occurrences.entry(id).or_default().push(entry);
            }
            _ => {
                findings.unknown += 1;
                first(
                    "unknown",
                    format!(
                        "{}:{} has Nats-Msg-Id {:?}, not an outbox id",
                        entry.stream, entry.seq, entry.msg_id
                    ),
                    &mut problems,
                );
            }
        }
    }
    let mut duplicated: Vec<(&Uuid, &Vec<&StreamEntry>)> =
        occurrences.iter().filter(|(_, at)| at.len() > 1).collect();
    duplicated.sort_by_key(|(_, at)| (&at[0].stream, at[0].seq));
    for (id, at) in &duplicated {
        findings.dups += at.len() - 1;
        let row = by_id.get(id).map_or_else(
            || "no row".to_owned(),
            |r| format!("{} outbox seq {} key {}", r.outbox, r.seq, r.partition_key),
        );
        first(
            "duplicate",
            format!(
                "id {id} ({row}) is stored {} times: {}",
                at.len(),
                at.iter()
                    .map(|e| format!("{}:{}", e.stream, e.seq))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &mut problems,
        );
    }

    // Every published row in its stream, agreeing with the row.
    let mut rows_sorted: Vec<&OutboxRow> = rows.iter().collect();
    rows_sorted.sort_by_key(|r| (r.outbox, r.seq));
    for row in rows_sorted.iter().filter(|r| r.status == "published") {
        let stream = row.stream.as_deref().unwrap_or(crate::events::STREAM);
        let at: Vec<&&StreamEntry> = occurrences
            .get(&row.id)
            .into_iter()
            .flatten()
            .filter(|e| e.stream == stream)
            .collect();
        if at.is_empty() {
            findings.missing += 1;
            first(
                "missing",
                format!(
                    "{} outbox row {} (seq {}, key {}) is published (stream {:?} seq {:?}) but not in {stream}",
                    row.outbox, row.id, row.seq, row.partition_key, row.stream, row.stream_seq
                ),
                &mut problems,
            );
            continue;
        }
        let recorded = row
            .stream_seq
            .is_some_and(|s| at.iter().any(|e| e.seq as i64 == s));
        if row.stream.is_none() || !recorded {
            findings.mismatch += 1;
            first(
                "mismatch",
                format!(
                    "{} outbox row {} records PubAck {:?}:{:?} but is at {}",
                    row.outbox,
                    row.id,
                    row.stream,
                    row.stream_seq,
                    at.iter()
                        .map(|e| format!("{}:{}", e.stream, e.seq))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &mut problems,
            );
        }
        if let Some(e) = at
            .iter()
            .find(|e| e.partition_key.as_deref() != Some(row.partition_key.as_str()))
        {
            findings.mismatch += 1;
            first(
                "mismatch",
                format!(
                    "{} outbox row {} has key {} but {}:{} has ce-partitionkey {:?}",
                    row.outbox, row.id, row.partition_key, e.stream, e.seq, e.partition_key
                ),
                &mut problems,
            );
        }
    }
    // A committed probe whose row is gone must at least be in the stream.
    let mut gone: Vec<&Uuid> = committed
        .iter()
        .filter(|id| !by_id.contains_key(id) && !occurrences.contains_key(id))
        .collect();
    gone.sort();
    findings.missing += gone.len();
    if let Some(id) = gone.first() {
        first(
            "missing",
            format!(
                "probe {id} was committed but is neither in its outbox nor in the stream ({} such)",
                gone.len()
            ),
            &mut problems,
        );
    }

    // Per key (and outbox: one order's events come from two), first occurrences in seq order.
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut last: HashMap<(&str, &str, &str), (&OutboxRow, &StreamEntry)> = HashMap::new();
    for entry in &entries {
        let Some(Ok(id)) = entry.msg_id.as_deref().map(Uuid::parse_str) else {
            continue;
        };
        let Some(row) = by_id.get(&id) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let key = entry
            .partition_key
            .as_deref()
            .unwrap_or(row.partition_key.as_str());
        let group = (entry.stream.as_str(), key, row.outbox);
        match last.get(&group) {
            Some((before, at)) if before.seq > row.seq => {
                findings.key_order_violations += 1;
                first(
                    "key order",
                    format!(
                        "key {key} ({} outbox): seq {} ({}) first appears at {}:{}, after seq {} ({}) at {}:{}",
                        row.outbox,
                        row.seq,
                        row.id,
                        entry.stream,
                        entry.seq,
                        before.seq,
                        before.id,
                        at.stream,
                        at.seq
                    ),
                    &mut problems,
                );
            }
            _ => {
                last.insert(group, (row, entry));
            }
        }
    }
    findings.problems = problems;
    findings
}

/// `id, seq, partition_key, status, stream, stream_seq` of an `outbox_message` row.
type RawOutboxRow = (Uuid, i64, String, String, Option<String>, Option<i64>);

/// Every `outbox_message` row of the service databases (none for a database without the
/// table).
async fn outbox_rows(stack: &Stack) -> anyhow::Result<Vec<OutboxRow>> {
    let mut rows = Vec::new();
    for (outbox, pool) in [
        ("orders", &stack.db.orders),
        ("inventory", &stack.db.inventory),
        ("email", &stack.db.email),
    ] {
        let mut conn = pool.acquire().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('outbox_message')::text")
                .fetch_one(&mut *conn)
                .await?;
        if exists.is_none() {
            continue;
        }
        let found: Vec<RawOutboxRow> = sqlx::query_as(
            "SELECT id, seq, partition_key, status, stream, stream_seq
                 FROM outbox_message ORDER BY seq",
        )
        .fetch_all(&mut *conn)
        .await
        .with_context(|| format!("reading the {outbox} outbox"))?;
        rows.extend(found.into_iter().map(
            |(id, seq, partition_key, status, stream, stream_seq)| OutboxRow {
                outbox,
                id,
                seq,
                partition_key,
                status,
                stream,
                stream_seq,
            },
        ));
    }
    Ok(rows)
}

/// Every message of the stream `name`, read by sequence (8 readers at once).
async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<Vec<StreamEntry>> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("opening the stream {name}"))?;
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let (first, last) = (state.first_sequence, state.last_sequence);
    const READERS: u64 = 8;
    let mut readers = tokio::task::JoinSet::new();
    for r in 0..READERS {
        let stream = stream.clone();
        let name = name.to_owned();
        readers.spawn(async move {
            let mut out = Vec::new();
            let mut seq = first + r;
            while seq <= last {
                let mut attempt = 0;
                let message = loop {
                    match stream.get_raw_message(seq).await {
                        Ok(m) => break m,
                        Err(e) if attempt >= 10 => {
                            return Err(
                                anyhow!(e).context(format!("reading {name} sequence {seq}"))
                            );
                        }
                        Err(_) => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                let header = |h: &str| message.headers.get(h).map(|v| v.as_str().to_owned());
                out.push(StreamEntry {
                    stream: name.clone(),
                    seq: message.sequence,
                    msg_id: header("Nats-Msg-Id"),
                    partition_key: header("ce-partitionkey"),
                });
                seq += READERS;
            }
            anyhow::Ok(out)
        });
    }
    let mut entries = Vec::with_capacity(state.messages as usize);
    while let Some(done) = readers.join_next().await {
        entries.extend(done.context("a stream reader panicked")??);
    }
    Ok(entries)
}

/// The stream check, after quiescence: every stream the outboxes published to (and the
/// saga's), read completely, against every outbox row.
async fn check_streams(stack: &Stack, committed: &[Uuid]) -> anyhow::Result<StreamFindings> {
    let rows = outbox_rows(stack).await?;
    let mut streams: Vec<String> = rows.iter().filter_map(|r| r.stream.clone()).collect();
    streams.push(crate::events::STREAM.to_owned());
    streams.sort();
    streams.dedup();
    let client = crate::platform::NatsConfig {
        url: stack.nats_url.clone(),
        ..crate::platform::NatsConfig::default()
    }
    .connect()
    .await
    .context("connecting to NATS for the stream check")?;
    let js = async_nats::jetstream::new(client);
    let mut entries = Vec::new();
    for name in &streams {
        entries.extend(read_stream(&js, name).await?);
    }
    Ok(check_stream_contents(&rows, committed, &entries))
}

fn process(stack: &mut Stack, relay: Relay) -> &mut testkit::Process {
    match relay {
        Relay::Order => &mut stack.order_relay,
        Relay::Inventory => &mut stack.inventory_relay,
    }
}

async fn inject(stack: &mut Stack, fault: Fault) -> anyhow::Result<()> {
    match fault {
        Fault::KillBroker { down } => {
            stack.nats.kill()?;
            tokio::time::sleep(down).await;
            stack.nats.restart().await?;
        }
        Fault::PauseBroker { paused } => {
            stack.nats.pause()?;
            tokio::time::sleep(paused).await;
            stack.nats.resume()?;
        }
        Fault::HangThenKillBroker { hung, down } => {
            stack.nats.pause()?;
            tokio::time::sleep(hung).await;
            stack.nats.kill()?;
            tokio::time::sleep(down).await;
            stack.nats.restart().await?;
        }
        Fault::KillRelay { relay, down } => {
            process(stack, relay).kill()?;
            tokio::time::sleep(down).await;
            process(stack, relay).restart()?;
        }
        Fault::TermRelay { relay } => {
            process(stack, relay)
                .terminate(Duration::from_secs(40))
                .await?;
            process(stack, relay).restart()?;
        }
        Fault::KillService { service, down } => {
            let p = match service {
                Service::Inventory => &mut stack.inventory,
                Service::Email => &mut stack.email,
            };
            p.kill()?;
            tokio::time::sleep(down).await;
            p.restart()?;
        }
        Fault::RestartPostgres { down } => {
            stack.postgres.stop_immediate().await?;
            tokio::time::sleep(down).await;
            stack.postgres.restart().await?;
        }
        Fault::SlowRelayLink { during } => {
            let proxy = stack.order_relay_proxy.as_ref().context("no relay proxy")?;
            proxy.set_latency(Duration::from_millis(200));
            tokio::time::sleep(during).await;
            proxy.set_latency(Duration::ZERO);
        }
        Fault::KillStreamLeader { down } | Fault::KillStreamFollower { down } => {
            let (leader, followers) = stream_placement(stack).await?;
            let name = match fault {
                Fault::KillStreamLeader { .. } => leader,
                _ => followers
                    .first()
                    .cloned()
                    .context("the stream has no follower")?,
            };
            println!("chaos:   node {name}");
            let victim = node(stack, &name)?;
            victim.kill()?;
            tokio::time::sleep(down).await;
            node(stack, &name)?.restart().await?;
        }
        Fault::CutRelayLink { during } => {
            let proxy = stack.order_relay_proxy.as_ref().context("no relay proxy")?;
            proxy.cut();
            tokio::time::sleep(during).await;
            proxy.restore();
        }
    }
    Ok(())
}

async fn run_faults(
    stack: &mut Stack,
    faults: Vec<(Duration, Fault)>,
    started: Instant,
) -> anyhow::Result<usize> {
    let mut done = 0;
    for (at, fault) in faults {
        let now = started.elapsed();
        if at > now {
            tokio::time::sleep(at - now).await;
        }
        println!(
            "chaos: t={:>5.1}s fault {}: {fault}",
            started.elapsed().as_secs_f64(),
            done + 1
        );
        inject(stack, fault)
            .await
            .with_context(|| format!("injecting {fault}"))?;
        done += 1;
    }
    Ok(done)
}

/// Every processes is up again (a restarted service answers `/health`).
async fn wait_all_up(stack: &Stack) -> anyhow::Result<()> {
    for url in [
        &stack.urls.order,
        &stack.urls.inventory,
        &stack.urls.email,
        &stack.urls.order_relay,
        &stack.urls.inventory_relay,
    ] {
        let health = format!("{url}/health");
        crate::stack::wait_for(
            Duration::from_secs(60),
            &format!("{url} to answer"),
            || async { Ok(client::get(&health).await.is_ok_and(|r| r.status == 200)) },
        )
        .await?;
    }
    Ok(())
}

/// Runs the whole thing; the report's `violation` says what broke, if anything.
pub async fn run(options: ChaosOptions) -> anyhow::Result<Report> {
    if std::env::var_os("DATABASE_URL").is_some() || std::env::var_os("NATS_URL").is_some() {
        bail!(
            "chaos kills and restarts PostgreSQL and nats-server: unset DATABASE_URL and NATS_URL"
        );
    }
    let started = Instant::now();
    let mut report = Report {
        seed: options.seed,
        ..Report::default()
    };
    let mut stack = Stack::start(StackOptions {
        dir: options.dir.clone(),
        bin_dir: options.bin_dir.clone(),
        relay_bin: options.relay_bin.clone(),
        ports: None,
        payment: PaymentSimulation {
            success_rate: 0.9,
            seed: options.seed,
        },
        smtp_url: None,
        proxy_order_relay: !options.cluster,
        cluster: options.cluster,
    })
    .await?;
    let laptops = (options.orders as i64 / 5).max(5);
    let mice = options.orders as i64 * 3;
    stack
        .seed_with(&[
            ("prod-001", "Laptop", laptops, 999.99),
            ("prod-002", "Mouse", mice, 29.99),
        ])
        .await?;
    let initial = [("prod-001", laptops), ("prod-002", mice)];
    let load_time = Duration::from_secs_f64(options.orders as f64 / options.rate);
    let faults = if options.cluster {
        cluster_schedule(options.seed, load_time)
    } else {
        schedule(options.seed, load_time)
    };
    println!(
        "chaos: seed={} orders={} rate={}/s faults={} probe keys={}x2 hot={} per outbox (logs in {})",
        options.seed,
        options.orders,
        options.rate,
        faults.len(),
        options.keys,
        options.hot,
        stack.log_dir.display()
    );

    let urls = stack.urls.clone();
    let pools = if options.keys + options.hot > 0 {
        ProbeTarget::ALL
            .iter()
            .map(|t| (*t, t.pool(&stack)))
            .collect()
    } else {
        Vec::new()
    };
    let (placed, probed, injected) = tokio::join!(
        load(urls, options.clone()),
        probes(pools, options.clone(), load_time),
        run_faults(&mut stack, faults, started)
    );
    println!(
        "chaos: t={:>5.1}s load and faults done, waiting for quiescence",
        started.elapsed().as_secs_f64()
    );
    let mut committed = Vec::new();
    let outcome = async {
        report.faults = injected?;
        committed = probed.context("probe workload")?;
        report.probes = committed.len();
        wait_all_up(&stack).await?;
        check(&stack, &placed, &initial, &mut report, started).await
    }
    .await;
    if let Err(e) = outcome {
        report.violation = Some(format!("{e:#}"));
    }
    println!(
        "chaos: t={:>5.1}s saga checked, reading the streams",
        started.elapsed().as_secs_f64()
    );
    // The streams, whatever the saga check found (it waited for quiescence): a second
    // explanation is worth having when the first check already failed.
    match check_streams(&stack, &committed).await {
        Ok(findings) => {
            println!(
                "chaos: t={:>5.1}s streams checked: {} messages, {} keys",
                started.elapsed().as_secs_f64(),
                findings.msgs,
                findings.keys
            );
            if !findings.clean() {
                report.add_violation(format!("streams: {}", findings.problems.join("; ")));
            }
            report.stream = findings;
        }
        Err(e) => report.add_violation(format!("stream check: {e:#}")),
    }
    if let Err(e) = stack.stop().await
        && report.violation.is_none()
    {
        report.violation = Some(format!("stopping: {e:#}"));
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn check(
    stack: &Stack,
    placed: &[(String, anyhow::Result<String>)],
    initial: &[(&str, i64)],
    report: &mut Report,
    started: Instant,
) -> anyhow::Result<()> {
    let mut acknowledged = Vec::new();
    for (user, result) in placed {
        match result {
            Ok(id) => acknowledged.push((user.clone(), id.clone())),
            Err(e) => bail!("load: {e:#}"),
        }
    }
    report.orders = acknowledged.len();
    // Every order in the database: the acknowledged ones, and any committed whose response a
    // fault swallowed (the client retried, so a user may have two).
    let mut orders: BTreeMap<String, Value> = BTreeMap::new();
    // Wait while orders keep reaching a final state; give up after a minute without progress.
    let stall_limit = Duration::from_secs(60);
    let mut last_progress = (0, Instant::now());
    loop {
        orders.clear();
        for (user, _) in &acknowledged {
            let r = client::get(&format!("{}/orders/user/{user}", stack.urls.order)).await?;
            for order in r.json["orders"].as_array().into_iter().flatten() {
                orders.insert(
                    order["orderId"].as_str().unwrap_or_default().to_owned(),
                    order.clone(),
                );
            }
        }
        let terminal = orders
            .values()
            .filter(|o| o["status"] == "CONFIRMED" || o["status"] == "CANCELLED")
            .count();
        report.terminal = terminal;
        if terminal == orders.len() {
            break;
        }
        if terminal > last_progress.0 {
            last_progress = (terminal, Instant::now());
        } else if last_progress.1.elapsed() > stall_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "chaos: t={:>5.1}s {} of {} orders final",
        started.elapsed().as_secs_f64(),
        report.terminal,
        orders.len()
    );
    let missing: Vec<&String> = acknowledged
        .iter()
        .map(|(_, id)| id)
        .filter(|id| !orders.contains_key(*id))
        .collect();
    let stuck: Vec<&Value> = orders
        .values()
        .filter(|o| o["status"] != "CONFIRMED" && o["status"] != "CANCELLED")
        .collect();
    report.lost = missing.len() + stuck.len();
    if let Some(id) = missing.first() {
        bail!("lost: order {id} was acknowledged with 201 but does not exist");
    }
    if let Some(o) = stuck.first() {
        bail!(
            "lost: {} orders not final ({stall_limit:?} without progress), e.g. {} is {} (its history: {:?})",
            stuck.len(),
            o["orderId"],
            o["status"],
            stack
                .history(o["orderId"].as_str().unwrap_or_default())
                .await
                .unwrap_or_default()
        );
    }

    // Each order's history: one creation, one outcome matching its state, no event twice.
    let mut first_problem = None;
    for (id, order) in &orders {
        let history = stack.history(id).await?;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in &history {
            *counts.entry(entry.as_str()).or_default() += 1;
        }
        let twice = counts.values().filter(|c| **c > 1).count();
        report.duplicate_effects += twice;
        let count = |e: &str| counts.get(e).copied().unwrap_or(0);
        let consistent = count("published order.created.v1") == 1
            && match order["status"].as_str() {
                Some("CONFIRMED") => {
                    count("published order.confirmed.v1") == 1
                        && count("published order.cancelled.v1") == 0
                        && count("received payment.processed.v1") == 1
                }
                Some("CANCELLED") => {
                    count("published order.cancelled.v1") == 1
                        && count("published order.confirmed.v1") == 0
                }
                _ => false,
            };
        if (twice > 0 || !consistent) && first_problem.is_none() {
            first_problem = Some(format!(
                "order {id} is {} but its history is {history:?}",
                order["status"]
            ));
        }
    }
    if let Some(problem) = first_problem {
        bail!("{problem}");
    }
    let orders: Vec<Value> = orders.into_values().collect();
    let invariants = stack.check_invariants(&orders, initial).await?;
    report.emails = invariants.emails_sent;
    if invariants.mail_files.len() != orders.len() {
        bail!(
            "emails: {} .eml files for {} orders",
            invariants.mail_files.len(),
            orders.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_plan_has_distinct_keys_twice_and_a_hot_key_and_follows_the_seed() {
        let plan = probe_plan(3, ProbeTarget::Orders, 1500, 1500);
        assert_eq!(plan.len(), 4500);
        assert_eq!(plan, probe_plan(3, ProbeTarget::Orders, 1500, 1500));
        assert_ne!(plan, probe_plan(4, ProbeTarget::Orders, 1500, 1500));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for key in &plan {
            *counts.entry(key).or_default() += 1;
        }
        assert_eq!(counts.len(), 1501, "1500 distinct keys and the hot one");
        assert_eq!(counts["probe-orders-hot"], 1500);
        assert!(
            counts
                .iter()
                .all(|(k, n)| *n == 2 || *k == "probe-orders-hot")
        );
        let hot_first_half = plan[..2250].iter().filter(|k| k.ends_with("-hot")).count();
        assert!(
            (500..1000).contains(&hot_first_half),
            "the hot key is spread out"
        );
        let other = probe_plan(3, ProbeTarget::Inventory, 10, 0);
        assert!(other.iter().all(|k| k.starts_with("probe-inventory-")));
    }

    fn row(outbox: &'static str, seq: i64, key: &str, stream_seq: i64) -> OutboxRow {
        OutboxRow {
            outbox,
            id: Uuid::from_u128(seq as u128 + if outbox == "orders" { 0 } else { 1 << 64 }),
            seq,
            partition_key: key.to_owned(),
            status: "published".to_owned(),
            stream: Some("DEMO".to_owned()),
            stream_seq: Some(stream_seq),
        }
    }

    fn entry(seq: u64, row: &OutboxRow) -> StreamEntry {
        StreamEntry {
            stream: "DEMO".to_owned(),
            seq,
            msg_id: Some(row.id.to_string()),
            partition_key: Some(row.partition_key.clone()),
        }
    }

    #[test]
    fn the_stream_check_passes_a_faithful_stream() {
        // Two outboxes share key "o1" (an order's events come from both): each outbox's
        // rows are in seq order, interleaved with the other's.
        let rows = vec![
            row("orders", 1, "o1", 1),
            row("orders", 2, "hot", 3),
            row("inventory", 1, "o1", 2),
            row("orders", 3, "o1", 4),
            row("inventory", 2, "o1", 5),
            row("orders", 4, "hot", 6),
        ];
        let entries: Vec<StreamEntry> = rows
            .iter()
            .map(|r| entry(r.stream_seq.expect("recorded") as u64, r))
            .rev()
            .collect();
        let found = check_stream_contents(&rows, &[rows[0].id], &entries);
        assert!(found.clean(), "{found:?}");
        assert_eq!((found.msgs, found.keys), (6, 2));
    }

    #[test]
    fn the_stream_check_finds_missing_duplicated_unknown_and_reordered_messages() {
        let rows = vec![
            row("orders", 1, "hot", 2),
            row("orders", 2, "hot", 1),
            row("orders", 3, "k", 3),
            row("orders", 4, "k", 4),
            row("orders", 5, "k2", 9),
        ];
        let mut entries: Vec<StreamEntry> = rows[..4]
            .iter()
            .map(|r| entry(r.stream_seq.expect("recorded") as u64, r))
            .collect();
        // The second copy of seq 3 (published again after the dedup window) is not a
        // reordering: first occurrences count.
        entries.push(entry(5, &rows[2]));
        entries.push(StreamEntry {
            stream: "DEMO".to_owned(),
            seq: 6,
            msg_id: Some(Uuid::from_u128(99).to_string()),
            partition_key: Some("x".to_owned()),
        });
        let found = check_stream_contents(&rows, &[], &entries);
        assert_eq!(found.missing, 1, "{found:?}");
        assert_eq!(found.dups, 1, "{found:?}");
        assert_eq!(found.unknown, 1, "{found:?}");
        assert_eq!(found.key_order_violations, 1, "{found:?}");
        assert_eq!(found.mismatch, 0, "{found:?}");
        assert_eq!(found.problems.len(), 4, "{:?}", found.problems);
        assert!(!found.clean());

        // A wrong PubAck sequence or key header is a mismatch; a committed probe that is
        // neither in its outbox nor in the stream is missing.
        let mut bad = rows[..1].to_vec();
        bad[0].stream_seq = Some(7);
        let mut wrong_key = entry(2, &bad[0]);
        wrong_key.partition_key = Some("other".to_owned());
        let found = check_stream_contents(&bad, &[Uuid::from_u128(42)], &[wrong_key]);
        assert_eq!((found.mismatch, found.missing), (2, 1), "{found:?}");
    }

    #[test]
    fn the_schedule_holds_every_promised_fault_and_follows_the_seed() {
        let load = Duration::from_secs(50);
        let a = schedule(5, load);
        assert_eq!(a, schedule(5, load), "same seed, same schedule");
        assert_ne!(a, schedule(6, load), "another seed, another schedule");
        let count = |f: fn(&Fault) -> bool| a.iter().filter(|(_, x)| f(x)).count();
        assert_eq!(count(|f| matches!(f, Fault::KillBroker { .. })), 3);
        assert_eq!(
            count(
                |f| matches!(f, Fault::PauseBroker { paused } if *paused > Duration::from_secs(5))
            ),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::HangThenKillBroker { .. })), 1);
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillRelay {
                    relay: Relay::Order,
                    ..
                }
            )),
            1
        );
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillRelay {
                    relay: Relay::Inventory,
                    ..
                }
            )),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::TermRelay { .. })), 1);
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillService {
                    service: Service::Inventory,
                    ..
                }
            )),
            1
        );
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillService {
                    service: Service::Email,
                    ..
                }
            )),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::RestartPostgres { .. })), 1);
        assert_eq!(count(|f| matches!(f, Fault::SlowRelayLink { .. })), 1);
        assert_eq!(count(|f| matches!(f, Fault::CutRelayLink { .. })), 1);
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        assert!(a.iter().all(|(at, _)| *at < load), "all during the load");
    }
}
