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
//!
//! With `--source wal` the services write their outboxes to the write-ahead log, the probes
//! alternate between the log and `outbox_message` rows, the relays stream replication slots,
//! the stream's duplicate window is [`WAL_DUPLICATE_WINDOW`], and the schedule also keeps a
//! relay down longer than that window. What was committed comes from a witness slot per
//! database, and the copies the long-down relay re-sends are counted apart (`resends=`).
//!
//! Layout:
//! - this module: [`ChaosOptions`], [`run`], [`Report`]
//! - `schedule` (private): [`Fault`], the seeded [`schedule`] and [`cluster_schedule`], [`Rng`]
//! - `inject` (private): injecting a fault into the running stack, on the schedule's clock
//! - `load` (private): the orders placed at a steady rate, and the probe workload
//!   ([`ProbeTarget`], [`probe_plan`])
//! - `check` (private): quiescence and the saga check (no order lost, no effect twice)
//! - `streams` (private): the stream check ([`check_stream_contents`], [`StreamFindings`],
//!   [`ResendAllowance`])
//! - `witness` (private): what a WAL run committed, from a second slot per database

mod check;
mod inject;
mod load;
mod schedule;
mod streams;
mod witness;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use demo_services::order::PaymentSimulation;

pub use self::load::{PROBE_TYPE, ProbeTarget, probe_plan};
pub use self::schedule::{Fault, Relay, Rng, Service, cluster_schedule, schedule};
pub use self::streams::{
    OutboxRow, ResendAllowance, StreamEntry, StreamFindings, check_stream_contents,
};
pub use self::witness::decode as decode_witness;
use crate::stack::{Source, Stack, StackOptions};

/// The saga stream's duplicate window in a WAL run: short, so that the relay the schedule
/// keeps down longer than it is down for less than a minute.
pub const WAL_DUPLICATE_WINDOW: Duration = Duration::from_secs(20);

/// The stream's duplicate window in a table run: the server's default.
pub const TABLE_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

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
    /// Where the outboxes write and the relays read.
    pub source: Source,
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
    /// Where the outboxes wrote and the relays read.
    pub source: Source,
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
        )?;
        write!(f, " source={} resends={}", self.source.name(), s.resends)
    }
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
        source: options.source,
        ..Report::default()
    };
    let window = match options.source {
        Source::Table => TABLE_DUPLICATE_WINDOW,
        Source::Wal => WAL_DUPLICATE_WINDOW,
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
        source: options.source,
        duplicate_window: window,
    })
    .await?;
    if options.source == Source::Wal {
        witness::create(&stack).await?;
    }
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
        let past_window = (options.source == Source::Wal).then_some(window);
        schedule(options.seed, load_time, past_window)
    };
    println!(
        "chaos: seed={} source={} orders={} rate={}/s faults={} probe keys={}x2 hot={} per outbox, duplicate window {window:?} (logs in {})",
        options.seed,
        options.source.name(),
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
        load::load(urls, options.clone()),
        load::probes(pools, options.clone(), load_time),
        inject::run_faults(&mut stack, faults, started)
    );
    println!(
        "chaos: t={:>5.1}s load and faults done, waiting for quiescence",
        started.elapsed().as_secs_f64()
    );
    let mut committed = Vec::new();
    let mut resends = None;
    let outcome = async {
        let (faults, allowed) = injected?;
        report.faults = faults;
        resends = allowed;
        committed = probed.context("probe workload")?;
        report.probes = committed.len();
        check::wait_all_up(&stack).await?;
        check::check(&stack, &placed, &initial, &mut report, started).await
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
    match streams::check_streams(&stack, &committed, resends).await {
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
