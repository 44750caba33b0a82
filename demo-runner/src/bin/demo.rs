//! `demo run` (what `make demo` calls) and `demo up` (what `make up` calls): the saga's whole
//! topology as local processes. See the README's "The demo" section.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use demo_runner::scenario;
use demo_runner::stack::{Stack, StackOptions};
use demo_services::order::PaymentSimulation;

/// The order / inventory / email saga on the outbox toolkit.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Run directory for logs and mail (emptied at start).
    #[arg(long, global = true, default_value = "target/demo")]
    dir: PathBuf,
    /// Seed of the simulated payments (the same seed gives the same outcomes).
    #[arg(long, env = "PAYMENT_SEED", global = true, default_value_t = scenario::DEMO_PAYMENT_SEED)]
    payment_seed: u64,
    /// Share of payments that succeed, 0 to 1.
    #[arg(
        long,
        env = "PAYMENT_SUCCESS_RATE",
        global = true,
        default_value_t = 0.9
    )]
    payment_success_rate: f64,
    /// Send emails to this SMTP server (`smtp://host:port`) instead of `<dir>/mail`.
    #[arg(long, env = "SMTP_URL", global = true)]
    smtp_url: Option<String>,
    /// The relay binary (default: next to this one).
    #[arg(long, env = "RELAY_BIN", global = true)]
    relay_bin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start everything, run the scenario, print a summary, check the invariants, stop.
    Run,
    /// Start everything on ports 3001-3003 with the demo products, and the operator console
    /// on 3000 (actions allowed), until ctrl-c.
    Up {
        /// The console's port on 127.0.0.1.
        #[arg(long, env = "CONSOLE_PORT", default_value_t = 3000)]
        console_port: u16,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !(0.0..=1.0).contains(&cli.payment_success_rate) {
        eprintln!("demo: --payment-success-rate must be from 0 to 1");
        return ExitCode::from(2);
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let options = StackOptions {
        dir: std::path::absolute(&cli.dir)?,
        relay_bin: cli.relay_bin.unwrap_or_else(|| bin_dir.join("relay")),
        bin_dir,
        ports: match cli.command {
            Command::Up { .. } => Some([3001, 3002, 3003]),
            Command::Run => None,
        },
        payment: PaymentSimulation {
            success_rate: cli.payment_success_rate,
            seed: cli.payment_seed,
        },
        smtp_url: cli.smtp_url,
        proxy_order_relay: false,
        cluster: false,
        source: demo_runner::stack::Source::Table,
        duplicate_window: std::time::Duration::from_secs(120),
    };
    println!(
        "demo: starting PostgreSQL{}, nats-server{}, 3 services and 2 relays (logs in {})",
        if std::env::var_os("DATABASE_URL").is_some() {
            " (DATABASE_URL)"
        } else {
            ""
        },
        if std::env::var_os("NATS_URL").is_some() {
            " (NATS_URL)"
        } else {
            ""
        },
        options.dir.join("logs").display()
    );
    let stack = Stack::start(options).await?;
    println!(
        "demo: order-service {}, email-service {}, inventory-service {}",
        stack.urls.order, stack.urls.email, stack.urls.inventory
    );
    match cli.command {
        Command::Run => {
            let outcome = scenario::run_demo(&stack).await;
            let stopped = stack.stop().await;
            let summary = outcome?;
            print!("{summary}");
            stopped?;
            println!("demo: ok");
        }
        Command::Up { console_port } => {
            let seeded = stack.seed().await;
            if let Err(e) = seeded {
                let _ = stack.stop().await;
                return Err(e);
            }
            let console = match demo_runner::console::serve(&stack, console_port).await {
                Ok(console) => console,
                Err(e) => {
                    let _ = stack.stop().await;
                    return Err(e);
                }
            };
            println!("{}", scenario::curl_examples(&stack.urls));
            println!(
                "demo: the operator console: http://127.0.0.1:{console_port}/ (actions allowed, payloads shown)"
            );
            println!("demo: running; ctrl-c stops everything");
            demo_services::platform::shutdown_signal().await;
            println!("demo: stopping");
            drop(console);
            stack.stop().await?;
            println!("demo: stopped");
        }
    }
    Ok(())
}
