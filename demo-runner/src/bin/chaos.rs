//! `chaos` (what `make chaos` runs): the demo topology under a seeded fault schedule; see the
//! README's "What we guarantee and how we test it".

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use demo_runner::chaos::{self, ChaosOptions};
use demo_runner::stack::Source;

/// Kill the broker, relays, services and PostgreSQL mid-flow; prove nothing is lost or
/// applied twice, and that the streams hold every published outbox row once, in commit order
/// per key.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Cli {
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Orders per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seed of the orders, payments and faults (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Run directory for logs and mail (emptied at start).
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
    /// The relay binary (default: next to this one).
    #[arg(long, env = "RELAY_BIN")]
    relay_bin: Option<PathBuf>,
    /// A 3-node JetStream cluster with an R3 stream; kill the stream leader, then a follower.
    #[arg(long)]
    cluster: bool,
    /// Probe workload: distinct partition keys written straight into each of the two
    /// outboxes (orders, inventory), each twice, spread over the load (default: 1.5 per
    /// order, so 1500 for 1000 orders; `--keys 0 --hot 0` turns the workload off).
    #[arg(long)]
    keys: Option<usize>,
    /// Probe workload: rows of one hot partition key per outbox, spread over the load
    /// (default: 1.5 per order).
    #[arg(long)]
    hot: Option<usize>,
    /// Where the outboxes write and the relays read: `table` (rows, polling relays) or
    /// `wal` (log storage, probes on both storages, relays streaming replication slots, a
    /// 20 s duplicate window and a relay kept down longer than it).
    #[arg(long, value_enum, default_value = "table")]
    source: CliSource,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CliSource {
    Table,
    Wal,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.orders == 0 || !(cli.rate > 0.0 && cli.rate <= 1000.0) {
        eprintln!("chaos: --orders must be at least 1 and --rate between 0 and 1000");
        return ExitCode::from(2);
    }
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(1)
    });
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let dir = match std::path::absolute(&cli.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("chaos: --dir: {e}");
            return ExitCode::from(2);
        }
    };
    let options = ChaosOptions {
        orders: cli.orders,
        rate: cli.rate,
        seed,
        dir,
        relay_bin: cli.relay_bin.unwrap_or_else(|| bin_dir.join("relay")),
        cluster: cli.cluster,
        keys: cli.keys.unwrap_or(cli.orders * 3 / 2),
        hot: cli.hot.unwrap_or(cli.orders * 3 / 2),
        source: match cli.source {
            CliSource::Table => Source::Table,
            CliSource::Wal => Source::Wal,
        },
        bin_dir,
    };
    println!("chaos: seed {seed} (reproduce with --seed {seed})");
    match chaos::run(options).await {
        Ok(report) => {
            println!("{report}");
            match report.violation {
                None => ExitCode::SUCCESS,
                Some(v) => {
                    eprintln!("chaos: VIOLATION: {v}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("chaos: could not run: {e:#}");
            ExitCode::FAILURE
        }
    }
}
