//! `bench`: runs one end-to-end scenario and prints its final line on stdout.
//!
//! ```text
//! cargo run --release -p bench -- relay-drain --events 100000 --payload 1024
//! cargo run --release -p bench -- relay-latency --rate 1000 --seconds 20
//! cargo run --release -p bench -- producer-overhead --seconds 10 --concurrency 8
//! cargo run --release -p bench -- relay-backlog --events 1000000
//! cargo run --release -p bench -- inbox-consume --mode strict|batched --events 100000
//! cargo run --release -p bench -- wal-read --events 100000 --per-txn 1 --rate 1000
//! cargo run --release -p bench -- console --letters 1000000 --backlog 1000000
//! ```
//!
//! Progress and the durability settings go to stderr. On failure it prints one line,
//! `bench: <what went wrong>`, and exits with status 1 (2 for bad flags).

use std::process::ExitCode;

use bench::backlog::BacklogConfig;
use bench::console::ConsoleConfig;
use bench::drain::DrainConfig;
use bench::inbox::InboxConfig;
use bench::latency::LatencyConfig;
use bench::producer::ProducerConfig;
use bench::wal_read::WalReadConfig;
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "End-to-end benchmarks of the outbox toolkit against real PostgreSQL and nats-server"
)]
struct Cli {
    /// Run PostgreSQL with fsync=off and full_page_writes=off (faster, not crash-safe) instead
    /// of its durable defaults. Ignored with DATABASE_URL (that server's settings apply).
    #[arg(long, global = true)]
    fast_unsafe_db: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Relay drain rate against raw pipelined JetStream publishing of the same messages.
    RelayDrain(DrainArgs),
    /// Commit-to-receive latency through the relay at an offered rate.
    RelayLatency(LatencyArgs),
    /// Business transactions per second with and without an outbox enqueue.
    ProducerOverhead(ProducerArgs),
    /// Relay drain rate with a large backlog against a small one.
    RelayBacklog(BacklogArgs),
    /// The inbox consumer against raw pull consumption and single-row commits.
    InboxConsume(InboxArgs),
    /// A logical replication reader streaming emitted messages and table INSERTs, against
    /// raw JetStream publishing, with the walsender's CPU and live commit-to-receive latency.
    WalRead(WalReadArgs),
    /// The operator console's pages (p99) with a million dead letters and a million-row
    /// backlog, against the dead-letter page's raw keyset query.
    Console(ConsoleArgs),
    /// The relay alone, run by `relay-drain` as a child process until its stdin closes.
    #[command(hide = true)]
    RelayProcess(RelayProcessArgs),
}

#[derive(Args)]
struct RelayProcessArgs {
    #[arg(long, value_parser = ["table", "wal"])]
    source: String,
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    nats_url: String,
    #[arg(long)]
    instance: String,
}

#[derive(Args)]
struct ConsoleArgs {
    /// Dead letters in the database.
    #[arg(long, default_value_t = ConsoleConfig::default().letters)]
    letters: usize,
    /// Pending outbox rows.
    #[arg(long, default_value_t = ConsoleConfig::default().backlog)]
    backlog: usize,
    /// Distinct partition keys of the backlog.
    #[arg(long, default_value_t = ConsoleConfig::default().keys)]
    keys: usize,
    /// Requests per page (after a warm-up of 5).
    #[arg(long, default_value_t = ConsoleConfig::default().requests)]
    requests: usize,
}

#[derive(Args)]
struct WalReadArgs {
    /// Messages of the raw, emit and insert phases.
    #[arg(long, default_value_t = WalReadConfig::default().events)]
    events: usize,
    /// Payload bytes per message (at least 8).
    #[arg(long, default_value_t = WalReadConfig::default().payload)]
    payload: usize,
    /// Messages per transaction when filling the slots.
    #[arg(long, default_value_t = WalReadConfig::default().per_txn)]
    per_txn: usize,
    /// PubAcks in flight in the raw baseline (at least 256).
    #[arg(long, default_value_t = WalReadConfig::default().window)]
    window: usize,
    /// Offered transactions per second of the live latency phase.
    #[arg(long, default_value_t = WalReadConfig::default().rate)]
    rate: u32,
    /// How long the live phase's producer runs.
    #[arg(long, default_value_t = WalReadConfig::default().seconds)]
    seconds: u64,
}

#[derive(Args)]
struct DrainArgs {
    /// Messages published by the baseline and by the relay.
    #[arg(long, default_value_t = DrainConfig::default().events)]
    events: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = DrainConfig::default().payload)]
    payload: usize,
    /// Distinct partition keys (round-robin).
    #[arg(long, default_value_t = DrainConfig::default().keys)]
    keys: usize,
    /// PubAcks in flight in the raw baseline (at least 256).
    #[arg(long, default_value_t = DrainConfig::default().window)]
    window: usize,
    /// The relay's source: table (polling) or wal (a replication slot; producers on log
    /// storage).
    #[arg(long, value_parser = ["table", "wal"], default_value = "table")]
    source: String,
    /// With --source wal: write outbox_message rows (read from the log as INSERTs) instead
    /// of log messages.
    #[arg(long)]
    table_rows: bool,
}

#[derive(Args)]
struct LatencyArgs {
    /// Offered transactions per second, one message each.
    #[arg(long, default_value_t = LatencyConfig::default().rate)]
    rate: u32,
    /// How long the producer runs.
    #[arg(long, default_value_t = LatencyConfig::default().seconds)]
    seconds: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = LatencyConfig::default().payload)]
    payload: usize,
    /// Distinct partition keys (round-robin).
    #[arg(long, default_value_t = LatencyConfig::default().keys)]
    keys: usize,
    /// Connections shared by the producer's transactions.
    #[arg(long, default_value_t = LatencyConfig::default().connections)]
    connections: u32,
    /// Wake the relay with LISTEN/NOTIFY as well as polling.
    #[arg(long)]
    listen_notify: bool,
    /// The relay's source: table (polling) or wal (a replication slot; producers on log
    /// storage).
    #[arg(long, value_parser = ["table", "wal"], default_value = "table")]
    source: String,
}

#[derive(Args)]
struct InboxArgs {
    /// strict (one transaction per message) or batched (many per transaction).
    #[arg(long, value_parser = ["strict", "batched"], default_value = "strict")]
    mode: String,
    /// Messages consumed.
    #[arg(long, default_value_t = InboxConfig::default().events)]
    events: usize,
    /// Messages per transaction in batched mode.
    #[arg(long, default_value_t = InboxConfig::default().batch)]
    batch: usize,
    /// Consumer lanes.
    #[arg(long, default_value_t = InboxConfig::default().concurrency)]
    concurrency: usize,
    /// per-message (a `Handler`, one INSERT per message) or batch (a `BatchHandler`, one
    /// multi-row INSERT per batch; the same rows).
    #[arg(long, value_parser = ["per-message", "batch"], default_value = "per-message")]
    handler: String,
}

#[derive(Args)]
struct ProducerArgs {
    /// Measured seconds per mode (plain, outbox).
    #[arg(long, default_value_t = ProducerConfig::default().seconds)]
    seconds: u64,
    /// Concurrent workers, one connection each.
    #[arg(long, default_value_t = ProducerConfig::default().concurrency)]
    concurrency: usize,
    /// Where the outbox writes: table rows or wal (log storage).
    #[arg(long, value_parser = ["table", "wal"], default_value = "table")]
    storage: String,
    /// statement (Outbox::enqueue, a statement of its own) or with-commit
    /// (OutboxTransaction: sent with COMMIT).
    #[arg(long, value_parser = ["statement", "with-commit"], default_value = "statement")]
    enqueue: String,
}

#[derive(Args)]
struct BacklogArgs {
    /// Rows of the large backlog.
    #[arg(long, default_value_t = BacklogConfig::default().events)]
    events: usize,
    /// Rows of the small backlog (all measured).
    #[arg(long, default_value_t = BacklogConfig::default().small_events)]
    small_events: usize,
    /// Rows of the large backlog the rate is measured over (the first published).
    #[arg(long, default_value_t = BacklogConfig::default().measure)]
    measure: usize,
    /// Payload bytes per row.
    #[arg(long, default_value_t = BacklogConfig::default().payload)]
    payload: usize,
    /// Distinct partition keys (round-robin).
    #[arg(long, default_value_t = BacklogConfig::default().keys)]
    keys: usize,
    /// Longest measurement window per phase, in seconds (the rate is then over the rows
    /// published so far).
    #[arg(long, default_value_t = BacklogConfig::default().max_seconds)]
    max_seconds: u64,
    /// The relay's source: table (rows, polling) or wal (a replication slot; the backlog is
    /// log messages written by `outbox_emit`).
    #[arg(long, value_parser = ["table", "wal"], default_value = "table")]
    source: String,
}

/// The relay runs in this process (or a child of it): it allocates as the `relay` daemon
/// does (mimalloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, or no scenario: clap prints the help itself.
        Err(e)
            if !e.use_stderr()
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, as for every other failure.
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad usage");
            eprintln!(
                "bench: {} (see bench --help)",
                first.trim().trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(cli) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Not waiting for blocking reads still under way (the relay process's stdin).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let fast = cli.fast_unsafe_db;
    match cli.scenario {
        Scenario::RelayDrain(a) => {
            let config = DrainConfig {
                events: a.events,
                payload: a.payload,
                keys: a.keys,
                window: a.window,
                source: source(&a.source),
                table_rows: a.table_rows,
            };
            bench::drain::run(&config, fast).await
        }
        Scenario::RelayLatency(a) => {
            let config = LatencyConfig {
                rate: a.rate,
                seconds: a.seconds,
                payload: a.payload,
                keys: a.keys,
                connections: a.connections,
                listen_notify: a.listen_notify,
                source: source(&a.source),
            };
            bench::latency::run(&config, fast).await
        }
        Scenario::InboxConsume(a) => {
            let config = InboxConfig {
                batched: a.mode == "batched",
                batch: a.batch,
                events: a.events,
                concurrency: a.concurrency,
                batch_handler: a.handler == "batch",
            };
            bench::inbox::run(&config, fast).await
        }
        Scenario::ProducerOverhead(a) => {
            let config = ProducerConfig {
                seconds: a.seconds,
                concurrency: a.concurrency,
                storage: if a.storage == "wal" {
                    outbox::Storage::Log
                } else {
                    outbox::Storage::Table
                },
                with_commit: a.enqueue == "with-commit",
            };
            bench::producer::run(&config, fast).await
        }
        Scenario::WalRead(a) => {
            let config = WalReadConfig {
                events: a.events,
                payload: a.payload,
                per_txn: a.per_txn,
                window: a.window,
                rate: a.rate,
                seconds: a.seconds,
            };
            bench::wal_read::run(&config, fast).await
        }
        Scenario::RelayBacklog(a) => {
            let config = BacklogConfig {
                events: a.events,
                small_events: a.small_events,
                measure: a.measure,
                payload: a.payload,
                keys: a.keys,
                max_seconds: a.max_seconds,
                source: source(&a.source),
            };
            bench::backlog::run(&config, fast).await
        }
        Scenario::Console(a) => {
            let config = ConsoleConfig {
                letters: a.letters,
                backlog: a.backlog,
                keys: a.keys,
                requests: a.requests,
            };
            bench::console::run(&config, fast).await
        }
        Scenario::RelayProcess(a) => {
            bench::relay_process::serve(
                source(&a.source),
                &a.nats_url,
                &a.database_url,
                &a.instance,
            )
            .await
        }
    }
}

fn source(flag: &str) -> bench::env::Source {
    if flag == "wal" {
        bench::env::Source::Wal
    } else {
        bench::env::Source::Table
    }
}

/// Prints `bench: <error chain>` on one line and returns the failure status.
fn fail(e: &anyhow::Error) -> ExitCode {
    let text = format!("{e:#}");
    let one_line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("bench: {}", one_line.join(" | "));
    ExitCode::FAILURE
}
