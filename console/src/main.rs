//! The `console` binary: flags in, [`console::router`] served.
//!
//! Exit codes: 0 stopped (ctrl-c or SIGTERM); 1 could not serve (the address is taken); 2
//! bad flags (one line saying which).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use console::{Access, Config, Database};

/// The operator console: outboxes, relays and dead letters in a browser.
#[derive(Parser, Debug)]
#[command(name = "console", version)]
struct Cli {
    /// A service database as NAME=URL (repeat for several). Without any, DATABASE_URL is
    /// served as "main".
    #[arg(long = "database", value_name = "NAME=URL")]
    databases: Vec<String>,
    /// Where to listen. Anything but a loopback address needs --basic-auth or
    /// --trusted-user-header.
    #[arg(long, env = "CONSOLE_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Allow retry and purge (every action is audited); read-only without it.
    #[arg(long)]
    allow_actions: bool,
    /// Require HTTP basic authentication as this user; the password comes from
    /// CONSOLE_PASSWORD (never a flag: it would show in `ps`).
    #[arg(long, value_name = "USER")]
    basic_auth: Option<String>,
    /// Trust this header (set by an authenticating proxy) to name the user.
    #[arg(long, value_name = "HEADER", conflicts_with = "basic_auth")]
    trusted_user_header: Option<String>,
    /// Show dead-letter payloads (hidden by default: they may hold personal data).
    #[arg(long)]
    show_payloads: bool,
    /// The longest any query may run, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    statement_timeout_ms: u64,
    /// The relays' lease, in seconds (a heartbeat older than this is flagged).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    lease_ttl_secs: u64,
    /// The stream's duplicate window, in seconds (an older unpublished row is flagged).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    duplicate_window_secs: u64,
    /// A host name the console answers to (repeat for several). Without any, a console
    /// without --basic-auth answers to localhost names only (DNS rebinding).
    #[arg(long = "public-host", value_name = "NAME")]
    public_hosts: Vec<String>,
    /// Where the console is reached under a proxy's path (e.g. /console).
    #[arg(long, default_value = "")]
    base_path: String,
    /// The NATS server to read JetStream from: durable consumers on the consumers page,
    /// and the streams' duplicate window (instead of --duplicate-window-secs). Without it,
    /// the console reads the databases only.
    #[arg(long, env = "NATS_URL", value_name = "URL")]
    nats_url: Option<String>,
    /// How long the consumers keep inbox rows (their inbox_retention), in seconds: a
    /// durable that may still be delivered an older message is flagged.
    #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600)]
    inbox_retention_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("console: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let mut config = match config(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("console: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(url) = cli.nats_url.as_deref().filter(|u| !u.is_empty()) {
        // Connects in the background: a broker that is down shows as such on the pages.
        match async_nats::ConnectOptions::new()
            .name("outbox-console")
            .retry_on_initial_connect()
            .connect(url)
            .await
        {
            Ok(client) => config.broker = Some(client),
            Err(e) => {
                eprintln!("console: --nats-url {url:?}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let names: Vec<String> = config.databases.iter().map(|d| d.name.clone()).collect();
    let (read_only, base) = (!config.allow_actions, config.base_path.clone());
    let app = match console::router(config) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("console: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("console: cannot listen on {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(cli.listen);
    tracing::info!(%addr, databases = ?names, read_only, "console serving");
    println!(
        "console: http://{addr}{base}/ ({})",
        if read_only {
            "read-only"
        } else {
            "actions allowed"
        }
    );
    let app = if base.is_empty() {
        app
    } else {
        axum::Router::new().nest(&base, app)
    };
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("console: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn config(cli: &Cli) -> Result<Config, String> {
    let mut specs = cli.databases.clone();
    if specs.is_empty() {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => specs.push(format!("main={url}")),
            _ => {
                return Err("name a database: --database NAME=URL (or set DATABASE_URL)".to_owned());
            }
        }
    }
    let mut databases = Vec::with_capacity(specs.len());
    for spec in &specs {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| format!("--database {:?}: use NAME=URL", redact(spec)))?;
        let options: sqlx::postgres::PgConnectOptions = url
            .parse()
            .map_err(|e| format!("--database {name}: the URL is not valid: {e}"))?;
        // Lazy: a database that is down shows as such on its section, the others still serve.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name("outbox-console"));
        databases.push(Database::new(name, pool));
    }
    let access = match (&cli.basic_auth, &cli.trusted_user_header) {
        (Some(user), _) => {
            let password = std::env::var("CONSOLE_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty())
                .ok_or("--basic-auth needs the password in CONSOLE_PASSWORD")?;
            Access::Basic {
                user: user.clone(),
                password,
            }
        }
        (None, Some(header)) => {
            axum::http::HeaderName::try_from(header.as_str())
                .map_err(|_| format!("--trusted-user-header {header:?} is not a header name"))?;
            Access::TrustedHeader(header.to_ascii_lowercase())
        }
        (None, None) => {
            if !cli.listen.ip().is_loopback() {
                return Err(format!(
                    "listening on {} with no authentication: add --basic-auth USER (CONSOLE_PASSWORD) or --trusted-user-header, or listen on 127.0.0.1",
                    cli.listen
                ));
            }
            Access::Open
        }
    };
    Ok(Config {
        access,
        allow_actions: cli.allow_actions,
        show_payloads: cli.show_payloads,
        statement_timeout: Duration::from_millis(cli.statement_timeout_ms),
        lease_ttl: Duration::from_secs(cli.lease_ttl_secs),
        duplicate_window: Duration::from_secs(cli.duplicate_window_secs),
        inbox_retention: Duration::from_secs(cli.inbox_retention_secs),
        base_path: cli.base_path.clone(),
        allowed_hosts: cli.public_hosts.clone(),
        ..Config::new(databases)
    })
}

/// A `--database` value without its password, for an error message.
fn redact(spec: &str) -> String {
    match (spec.find("://"), spec.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &spec[..scheme], &spec[at..])
        }
        _ => spec.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag the console's table in docs/operations.md names is one the binary has.
    #[test]
    fn the_operations_table_names_real_flags() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ))
        .expect("docs/operations.md");
        let start = docs
            .find("## The operator console")
            .expect("the console section");
        let section = &docs[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
        let cli = Cli::command();
        let mut checked = 0;
        for line in section.lines().filter(|l| l.starts_with("| `--")) {
            let cell = line.split('|').nth(1).unwrap_or_default();
            for flag in cell.split('`').filter_map(|p| p.strip_prefix("--")) {
                let name = flag.split_whitespace().next().unwrap_or_default();
                assert!(
                    cli.get_arguments().any(|a| a.get_long() == Some(name)),
                    "docs name --{name}, which `console` does not have"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 10,
            "the table was found ({checked} flags checked)"
        );
    }
}
