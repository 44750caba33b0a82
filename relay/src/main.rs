//! The `relay` daemon: flags and environment in, `relay::run` out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use relay::publisher::jetstream::{
    JetStreamPublisher, NatsConfig, StreamOutcome, StreamSpec, ensure_stream,
};
use relay::{RelayConfig, http};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

/// Publishes the transactional outbox to NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "relay", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// PostgreSQL URL of the service database (TLS through `sslmode=` in the URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        hide_env_values = true,
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// NATS user (with --nats-password).
    #[arg(long, env = "NATS_USER", global = true)]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, global = true)]
    nats_token: Option<String>,
    /// NATS credentials file (JWT + nkey).
    #[arg(long, env = "NATS_CREDS", global = true)]
    nats_creds: Option<PathBuf>,
    /// NATS nkey seed.
    #[arg(long, env = "NATS_NKEY", hide_env_values = true, global = true)]
    nats_nkey: Option<String>,
    /// CA certificate to trust for NATS TLS.
    #[arg(long, env = "NATS_TLS_CA", global = true)]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate for NATS TLS (with --nats-tls-key).
    #[arg(long, env = "NATS_TLS_CERT", global = true)]
    nats_tls_cert: Option<PathBuf>,
    /// Client key for NATS TLS.
    #[arg(long, env = "NATS_TLS_KEY", global = true)]
    nats_tls_key: Option<PathBuf>,
    /// Refuse a NATS connection without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED", global = true)]
    nats_tls_required: bool,
    /// JetStream stream the outbox publishes to.
    #[arg(long, env = "RELAY_STREAM", default_value = "OUTBOX", global = true)]
    stream: String,
    /// Subjects the stream must capture, comma-separated (e.g. `order.>`).
    #[arg(
        long,
        env = "RELAY_STREAM_SUBJECTS",
        value_delimiter = ',',
        default_value = ">",
        global = true
    )]
    stream_subjects: Vec<String>,
    /// Log format.
    #[arg(
        long,
        env = "RELAY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the toolkit's schema (outbox, inbox, dead letters, relay leases).
    Migrate,
    /// Publish the outbox until SIGTERM or Ctrl-C.
    Run(Box<RunArgs>),
    /// Manage the JetStream stream.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Backlog, oldest pending age, instances and partitions, dead letters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Install or remove the NOTIFY trigger used by `run --listen-notify`.
    Notify {
        #[arg(value_enum)]
        action: NotifyAction,
    },
    /// Republish rows published since a time that the stream no longer holds.
    Reconcile {
        /// RFC 3339 time (2026-11-22T10:00:00Z) or an age (30m, 2h).
        #[arg(long)]
        since: String,
        /// Only report what would be republished.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NotifyAction {
    /// Install the trigger (producers then pay one NOTIFY per transaction).
    Enable,
    /// Remove it (relays poll only).
    Disable,
    /// Say whether it is installed.
    Status,
}

#[derive(Subcommand, Debug)]
enum StreamCommand {
    /// Create the stream if missing, or verify it captures the configured subjects.
    Ensure {
        /// Dedup window (the server default is 2m).
        #[command(flatten)]
        settings: StreamSettings,
    },
}

/// How `relay stream ensure` and `relay run --ensure-stream` create the stream.
#[derive(Args, Debug, Clone, Copy)]
struct StreamSettings {
    /// Dedup window (the server default is 2m).
    #[arg(long, env = "RELAY_DUPLICATE_WINDOW", default_value_t = Dur(DEFAULT_DUPLICATE_WINDOW))]
    duplicate_window: Dur,
    /// Replicas (3 in a cluster).
    #[arg(long, env = "RELAY_STREAM_REPLICAS", default_value_t = 1)]
    replicas: usize,
}

/// The stream's duplicate window unless configured: the server's default.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
struct RunArgs {
    /// Unique name of this instance (default: relay-<host>-<pid>-<random>).
    #[arg(long, env = "RELAY_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Address for /health, /health/ready and /metrics.
    #[arg(long, env = "RELAY_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    http_addr: SocketAddr,
    /// Rows per claim.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = RelayConfig::default().batch_size)]
    batch_size: usize,
    /// PubAcks in flight at most.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = RelayConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// Claim transactions open at once, each holding a database connection.
    #[arg(long, env = "RELAY_MAX_OPEN_CLAIMS", default_value_t = RelayConfig::default().max_open_claims)]
    max_open_claims: usize,
    /// PubAck timeout.
    #[arg(long, env = "RELAY_PUBLISH_TIMEOUT", default_value_t = Dur(RelayConfig::default().publish_timeout))]
    publish_timeout: Dur,
    /// Longest a claim transaction stays open (idle_in_transaction_session_timeout).
    #[arg(long, env = "RELAY_CLAIM_TTL", default_value_t = Dur(RelayConfig::default().claim_ttl))]
    claim_ttl: Dur,
    /// Longest wait for the database in one step (claim, commit, lease renewal) before it
    /// counts as unreachable.
    #[arg(long, env = "RELAY_DB_TIMEOUT", default_value_t = Dur(RelayConfig::default().db_timeout))]
    db_timeout: Dur,
    /// Permanent failures before a row is dead-lettered.
    #[arg(long, env = "RELAY_MAX_PERMANENT_ATTEMPTS", default_value_t = RelayConfig::default().max_permanent_attempts)]
    max_permanent_attempts: u32,
    /// First retry delay.
    #[arg(long, env = "RELAY_RETRY_MIN_DELAY", default_value_t = Dur(RelayConfig::default().retry_min_delay))]
    retry_min_delay: Dur,
    /// Largest retry delay.
    #[arg(long, env = "RELAY_RETRY_MAX_DELAY", default_value_t = Dur(RelayConfig::default().retry_max_delay))]
    retry_max_delay: Dur,
    /// Shortest idle poll interval.
    #[arg(long, env = "RELAY_POLL_MIN", default_value_t = Dur(RelayConfig::default().poll_min_interval))]
    poll_min: Dur,
    /// Longest idle poll interval.
    #[arg(long, env = "RELAY_POLL_MAX", default_value_t = Dur(RelayConfig::default().poll_max_interval))]
    poll_max: Dur,
    /// Also wake on LISTEN/NOTIFY.
    #[arg(long, env = "RELAY_LISTEN_NOTIFY")]
    listen_notify: bool,
    /// Partition lease / liveness TTL.
    #[arg(long, env = "RELAY_LEASE_TTL", default_value_t = Dur(RelayConfig::default().lease_ttl))]
    lease_ttl: Dur,
    /// Lease renewal interval.
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", default_value_t = Dur(RelayConfig::default().heartbeat_interval))]
    heartbeat_interval: Dur,
    /// How long published rows are kept (0 deletes on PubAck).
    #[arg(long, env = "RELAY_RETENTION", default_value_t = Dur(RelayConfig::default().retention))]
    retention: Dur,
    /// How often to vacuum outbox_message (0 disables).
    #[arg(long, env = "RELAY_VACUUM_INTERVAL", default_value_t = Dur(RelayConfig::default().vacuum_interval))]
    vacuum_interval: Dur,
    /// Apply migrations before starting.
    #[arg(long, env = "RELAY_MIGRATE")]
    migrate: bool,
    /// Create or verify the stream before starting (with --duplicate-window, --replicas).
    #[arg(long, env = "RELAY_ENSURE_STREAM")]
    ensure_stream: bool,
    #[command(flatten)]
    stream: StreamSettings,
}

/// A duration flag: parsed by [`parse_duration`], shown in `--help` in the same units, so
/// that the defaults come from [`RelayConfig::default`] alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dur(Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_duration(text).map(Dur)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        match s {
            _ if s.is_multiple_of(86_400) => write!(f, "{}d", s / 86_400),
            _ if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a unit is required: ms, s, m, h or d")?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m, 1h"))?;
    let seconds = |s: u64| Duration::from_secs(n.saturating_mul(s));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(seconds(1)),
        "m" => Ok(seconds(60)),
        "h" => Ok(seconds(3600)),
        "d" => Ok(seconds(86_400)),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn nats_config(global: &Global, name: Option<String>) -> NatsConfig {
    NatsConfig {
        url: global.nats_url.clone(),
        user: global.nats_user.clone(),
        password: global.nats_password.clone(),
        token: global.nats_token.clone(),
        creds_file: global.nats_creds.clone(),
        nkey_seed: global.nats_nkey.clone(),
        tls_ca: global.nats_tls_ca.clone(),
        tls_cert: global.nats_tls_cert.clone(),
        tls_key: global.nats_tls_key.clone(),
        tls_required: global.nats_tls_required,
        name,
    }
}

fn pool(global: &Global, connections: u32) -> anyhow::Result<PgPool> {
    let url = global
        .database_url
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("no database: set DATABASE_URL or pass --database-url"))?;
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("relay")))
}

fn stream_spec(global: &Global, duplicate_window: Duration, replicas: usize) -> StreamSpec {
    StreamSpec {
        name: global.stream.clone(),
        subjects: global.stream_subjects.clone(),
        duplicate_window,
        replicas,
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let global = &cli.global;
    match cli.command {
        Command::Migrate => {
            let pool = pool(global, 1)?;
            let report = migrations::migrate(&mut *pool.acquire().await?).await?;
            if report.applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied migrations {:?}", report.applied);
            }
            Ok(())
        }
        Command::Stream(StreamCommand::Ensure { settings }) => {
            let client = nats_config(global, None).connect().await?;
            let publisher = JetStreamPublisher::new(client, Duration::from_secs(5), 1);
            let spec = stream_spec(global, settings.duplicate_window.0, settings.replicas);
            let outcome = tokio::time::timeout(
                Duration::from_secs(30),
                ensure_stream(publisher.context(), &spec),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "NATS at {} did not answer within 30s",
                    connect::redact_url(&global.nats_url)
                )
            })??;
            match outcome {
                StreamOutcome::Created => {
                    println!("created stream {} for {:?}", spec.name, spec.subjects)
                }
                StreamOutcome::Verified => {
                    println!("stream {} captures {:?}", spec.name, spec.subjects)
                }
            }
            Ok(())
        }
        Command::Status { json } => status(global, json).await,
        Command::Notify { action } => {
            let pool = pool(global, 1)?;
            let mut conn = pool.acquire().await?;
            match action {
                NotifyAction::Enable => {
                    relay::store::enable_notify(&mut conn).await?;
                    println!("notify trigger installed: run relays with --listen-notify");
                }
                NotifyAction::Disable => {
                    relay::store::disable_notify(&mut conn).await?;
                    println!("notify trigger removed");
                }
                NotifyAction::Status => {
                    let on = relay::store::notify_enabled(&mut conn).await?;
                    println!(
                        "notify trigger {}",
                        if on { "installed" } else { "not installed" }
                    );
                }
            }
            Ok(())
        }
        Command::Reconcile { since, dry_run } => {
            let since = parse_since(&since)?;
            let pool = pool(global, 2)?;
            let client = nats_config(global, None).connect().await?;
            let publisher = JetStreamPublisher::new(client, Duration::from_secs(5), 1);
            let report = relay::reconcile::reconcile(
                &pool,
                publisher.context(),
                &global.stream,
                since,
                dry_run,
            )
            .await?;
            println!(
                "checked={} present={} {}={}",
                report.checked,
                report.present,
                if dry_run {
                    "would_republish"
                } else {
                    "republished"
                },
                report.republished
            );
            Ok(())
        }
        Command::Run(args) => run(global, *args).await,
    }
}

fn parse_since(text: &str) -> anyhow::Result<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(at) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let age = parse_duration(text)
        .map_err(|e| anyhow::anyhow!("--since: {e}; or give an RFC 3339 time"))?;
    Ok(time::OffsetDateTime::now_utc() - age)
}

async fn status(global: &Global, json: bool) -> anyhow::Result<()> {
    let pool = pool(global, 1)?;
    let mut conn = pool.acquire().await?;
    let backlog = outbox::store::backlog(&mut conn).await?;
    let instances = relay::store::instances(&mut conn).await?;
    let dead = dlq::store::count_dead(&mut conn, dlq::Source::Relay).await?;
    if json {
        let value = serde_json::json!({
            "backlog": backlog.unpublished,
            "retrying": backlog.retrying,
            "oldest_pending_age_seconds": backlog.oldest_age_seconds,
            "dead_letters": dead,
            "instances": instances.iter().map(|i| serde_json::json!({
                "instance_id": i.instance_id,
                "heartbeat_age_seconds": i.heartbeat_age_seconds,
                "partitions": i.partitions,
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        println!(
            "backlog:           {} unpublished ({} retrying)",
            backlog.unpublished, backlog.retrying
        );
        println!("oldest pending:    {:.1}s", backlog.oldest_age_seconds);
        println!("dead letters:      {dead} (relay)");
        println!("instances:         {}", instances.len());
        for i in &instances {
            println!(
                "  {:<40} {:>3} partitions, heartbeat {:.1}s ago",
                i.instance_id, i.partitions, i.heartbeat_age_seconds
            );
        }
    }
    Ok(())
}

async fn run(global: &Global, args: RunArgs) -> anyhow::Result<()> {
    let config = RelayConfig {
        instance_id: args
            .instance_id
            .unwrap_or_else(relay::config::default_instance_id),
        batch_size: args.batch_size,
        max_in_flight: args.max_in_flight,
        max_open_claims: args.max_open_claims,
        publish_timeout: args.publish_timeout.0,
        claim_ttl: args.claim_ttl.0,
        max_permanent_attempts: args.max_permanent_attempts,
        retry_min_delay: args.retry_min_delay.0,
        retry_max_delay: args.retry_max_delay.0,
        poll_min_interval: args.poll_min.0,
        poll_max_interval: args.poll_max.0,
        listen_notify: args.listen_notify,
        lease_ttl: args.lease_ttl.0,
        heartbeat_interval: args.heartbeat_interval.0,
        retention: args.retention.0,
        vacuum_interval: args.vacuum_interval.0,
        db_timeout: args.db_timeout.0,
        ..RelayConfig::default()
    };
    config.validate()?;
    let pool = pool(global, config.min_connections() + 2)?;
    if args.migrate {
        migrations::migrate(&mut *pool.acquire().await?).await?;
    }
    let client = nats_config(global, Some(config.instance_id.clone()))
        .connect()
        .await?;
    let publisher = JetStreamPublisher::new(client, config.publish_timeout, config.max_in_flight);
    if args.ensure_stream {
        let spec = stream_spec(global, args.stream.duplicate_window.0, args.stream.replicas);
        ensure_stream(publisher.context(), &spec).await?;
    }
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(relay::metrics::PUBLISH_LATENCY.to_owned()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(relay::metrics::BATCH_SIZE.to_owned()),
            &[1.0, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0],
        )?
        .install_recorder()?;
    let relay = relay::Relay::new(config, pool, publisher)?;
    let stop = CancellationToken::new();
    let listener = http::bind(args.http_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /health, /health/ready, /metrics");
    let server = tokio::spawn(http::serve(
        listener,
        relay.health(),
        Some(prometheus),
        stop.clone(),
    ));
    relay.run(shutdown_signal()).await?;
    stop.cancel();
    server.await??;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations_show_in_the_units_they_parse_from() {
        for text in [
            "0", "1ms", "100ms", "1500ms", "5s", "90s", "2m", "1h", "36h", "2d",
        ] {
            let parsed: Dur = text.parse().expect(text);
            let shown = parsed.to_string();
            let again: Dur = shown.parse().expect(&shown);
            assert_eq!(again, parsed, "{text} -> {shown}");
        }
        assert_eq!(Dur(Duration::from_secs(90)).to_string(), "90s");
        assert_eq!(Dur(Duration::from_secs(3600)).to_string(), "1h");
    }

    /// The settings table of docs/operations.md gives the defaults `relay run` has.
    #[test]
    fn the_operations_table_shows_the_defaults() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ))
        .expect("docs/operations.md");
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run");
        let default_of = |flag: &str| {
            let arg = run
                .get_arguments()
                .chain(cli.get_arguments())
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("docs name --{flag}, which `relay run` does not have"));
            let values: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            match values.as_slice() {
                [] => "off".to_owned(),
                [v] if v == "false" => "off".to_owned(),
                [v] => v.clone(),
                many => many.join(","),
            }
        };
        let mut checked = 0;
        for line in docs.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let flags: Vec<&str> = cells[1]
                .split('`')
                .filter_map(|part| part.strip_prefix("--"))
                .collect();
            let defaults: Vec<&str> = cells[2].split(" / ").map(str::trim).collect();
            assert_eq!(
                flags.len(),
                defaults.len(),
                "one default per flag in: {line}"
            );
            for (flag, documented) in flags.iter().zip(&defaults) {
                assert_eq!(
                    &default_of(flag),
                    documented,
                    "--{flag}: docs/operations.md says {documented}"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 15,
            "the table was found ({checked} flags checked)"
        );
    }
}
