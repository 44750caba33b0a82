//! The `relay` command line: the [`Cli`] parser, the flags every subcommand shares
//! ([`Global`]) and the dispatch to one module per subcommand.
//!
//! - `duration`: [`Dur`], the duration flag type (`500ms`, `5s`, `2m`, `1h`, `2d`).
//! - `migrate`: `relay migrate`.
//! - `run`: `relay run`, its flags and their [`relay::RelayConfig`].
//! - `stream`: `relay stream ensure`, and the stream settings `relay run` shares.
//! - `status`: `relay status`.
//! - `notify`: `relay notify`.
//! - `reconcile`: `relay reconcile`.
//! - `slot`: `relay slot create|status|drop`, the slot of `run --source wal`.

mod duration;
mod migrate;
mod notify;
mod reconcile;
mod run;
mod slot;
mod status;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use relay::publisher::jetstream::NatsConfig;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use self::duration::Dur;

/// Publishes the transactional outbox to NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "relay", version, about)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
pub(crate) struct Global {
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
    pub(crate) log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the toolkit's schema (outbox, inbox, dead letters, relay leases).
    Migrate,
    /// Publish the outbox until SIGTERM or Ctrl-C.
    Run(Box<run::RunArgs>),
    /// Manage the JetStream stream.
    #[command(subcommand)]
    Stream(stream::StreamCommand),
    /// Backlog, oldest pending age, instances and partitions, dead letters.
    Status(status::StatusArgs),
    /// Install or remove the NOTIFY trigger used by `run --listen-notify`.
    Notify(notify::NotifyArgs),
    /// Republish rows published since a time that the stream no longer holds.
    Reconcile(reconcile::ReconcileArgs),
    /// Create, show or drop the replication slot of `run --source wal`.
    Slot(slot::SlotArgs),
}

impl Cli {
    /// Runs the parsed subcommand to its end.
    pub(crate) async fn execute(self) -> anyhow::Result<()> {
        let global = &self.global;
        match self.command {
            Command::Migrate => migrate::migrate(global).await,
            Command::Run(args) => run::run(global, *args).await,
            Command::Stream(command) => stream::execute(global, command).await,
            Command::Status(args) => status::status(global, args).await,
            Command::Notify(args) => notify::notify(global, args).await,
            Command::Reconcile(args) => reconcile::reconcile(global, args).await,
            Command::Slot(args) => slot::slot(global, args).await,
        }
    }
}

impl Global {
    /// The NATS connection settings; `name` is the connection name the server shows.
    fn nats_config(&self, name: Option<String>) -> NatsConfig {
        NatsConfig {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_seed: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls_required,
            name,
        }
    }

    /// `--database-url`, or an error naming how to give it.
    fn database_url(&self) -> anyhow::Result<&str> {
        self.database_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("no database: set DATABASE_URL or pass --database-url"))
    }

    /// A lazily connecting pool of up to `connections` connections to `--database-url`.
    fn pool(&self, connections: u32) -> anyhow::Result<PgPool> {
        self.pool_named(connections, "relay")
    }

    /// Like [`Global::pool`], its sessions named `application_name`.
    fn pool_named(&self, connections: u32, application_name: &str) -> anyhow::Result<PgPool> {
        let url = self.database_url()?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
        Ok(PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.application_name(application_name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
        // The relay's settings section (other sections document other binaries' flags).
        let start = docs
            .find("## Settings that matter")
            .expect("the settings section");
        let section = &docs[start..];
        let section = &section[..section[3..]
            .find("\n## ")
            .map_or(section.len(), |end| end + 3)];
        let mut checked = 0;
        for line in section.lines().filter(|l| l.starts_with("| `--")) {
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
