//! The chaos run behind `make chaos`: the demo topology as processes, a steady load of
//! orders, and a seeded schedule of faults (broker SIGKILLs and a pause, relay SIGKILLs and
//! a SIGTERM, consumer services SIGKILLed mid-handler, a PostgreSQL immediate restart, a
//! slowed and cut link between a relay and the broker); then quiescence and the saga's
//! invariants. The same seed gives the same orders, payments and fault schedule (timing
//! still varies with the machine).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

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
    /// The first violated invariant, if any.
    pub violation: Option<String>,
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
        "chaos: seed={} orders={} rate={}/s faults={} (logs in {})",
        options.seed,
        options.orders,
        options.rate,
        faults.len(),
        stack.log_dir.display()
    );

    let urls = stack.urls.clone();
    let (placed, injected) = tokio::join!(
        load(urls, options.clone()),
        run_faults(&mut stack, faults, started)
    );
    let outcome = async {
        report.faults = injected?;
        wait_all_up(&stack).await?;
        check(&stack, &placed, &initial, &mut report).await
    }
    .await;
    if let Err(e) = outcome {
        report.violation = Some(format!("{e:#}"));
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
