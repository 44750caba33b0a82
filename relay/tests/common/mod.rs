//! Shared pieces of the relay's integration tests: real servers, enqueueing, reading the
//! stream back, and the `relay` binary as a child process.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use async_nats::jetstream;
use outbox::{Message, MessageId, Outbox};
use relay::RelayConfig;
use relay::publisher::jetstream::{JetStreamPublisher, NatsConfig, StreamSpec, ensure_stream};
use sqlx::PgPool;
use testkit::{NatsServer, Postgres, Process, ProcessSpec, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const STREAM: &str = "OUTBOX";

/// A migrated fresh database and a broker with the `OUTBOX` stream on `test.>`.
pub struct Env {
    pub pg: Postgres,
    pub nats: NatsServer,
    pub db_url: String,
    pub pool: PgPool,
}

pub async fn env() -> Env {
    env_with(testkit::NatsServerConfig::default()).await
}

/// As [`env`], with PostgreSQL at `wal_level=logical` (for `--source wal`).
pub async fn env_logical() -> Env {
    env_of(
        testkit::PostgresConfig {
            logical_decoding: true,
            ..testkit::PostgresConfig::default()
        },
        testkit::NatsServerConfig::default(),
    )
    .await
}

pub async fn env_with(nats_config: testkit::NatsServerConfig) -> Env {
    env_of(testkit::PostgresConfig::default(), nats_config).await
}

pub async fn env_of(
    pg_config: testkit::PostgresConfig,
    nats_config: testkit::NatsServerConfig,
) -> Env {
    let (pg, nats) = tokio::join!(
        Postgres::start_with(pg_config),
        NatsServer::start_with(nats_config)
    );
    let (pg, nats) = (
        pg.expect("start PostgreSQL"),
        nats.expect("start nats-server"),
    );
    let (db_url, pool) = migrated_database(&pg).await;
    let env = Env {
        pg,
        nats,
        db_url,
        pool,
    };
    let client = env.nats_client().await;
    ensure_stream(
        &jetstream::new(client),
        &StreamSpec {
            name: STREAM.into(),
            subjects: vec!["test.>".into()],
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        },
    )
    .await
    .expect("create stream");
    env
}

/// A fresh database of `pg`, migrated: its URL and a pool of up to 12 connections.
pub async fn migrated_database(pg: &Postgres) -> (String, PgPool) {
    let db_url = pg.fresh_database().await.expect("fresh database");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&db_url)
        .await
        .expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    (db_url, pool)
}

impl Env {
    pub fn nats_config(&self) -> NatsConfig {
        NatsConfig {
            url: self.nats.url().to_owned(),
            ..NatsConfig::default()
        }
    }

    pub async fn nats_client(&self) -> async_nats::Client {
        self.nats_config().connect().await.expect("connect to NATS")
    }

    pub async fn publisher(&self, config: &RelayConfig) -> JetStreamPublisher {
        JetStreamPublisher::new(
            self.nats_client().await,
            config.publish_timeout,
            config.max_in_flight,
        )
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect(sql)
    }

    pub async fn published(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox_message WHERE status = 'published'")
            .await
    }

    pub async fn unpublished(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox_message WHERE status <> 'published'")
            .await
    }
}

/// Enqueues `n` messages on `test.event` spread over `keys` keys, in batches; returns the
/// ids with their key in enqueue order.
pub async fn enqueue(pool: &PgPool, n: usize, keys: usize) -> Vec<(MessageId, String)> {
    enqueue_on(pool, n, keys, "test.event").await
}

pub async fn enqueue_on(
    pool: &PgPool,
    n: usize,
    keys: usize,
    subject: &str,
) -> Vec<(MessageId, String)> {
    let outbox = Outbox::new("relay-test").expect("outbox");
    let mut out = Vec::with_capacity(n);
    let mut conn = pool.acquire().await.expect("acquire");
    for chunk_start in (0..n).step_by(500) {
        let chunk: Vec<(Message, String)> = (chunk_start..n.min(chunk_start + 500))
            .map(|i| {
                let key = format!("key-{}", i % keys);
                let msg = Message::json(
                    subject,
                    "test.event.v1",
                    key.clone(),
                    &serde_json::json!({ "i": i }),
                )
                .expect("json");
                (msg, key)
            })
            .collect();
        let keys: Vec<String> = chunk.iter().map(|(_, k)| k.clone()).collect();
        let ids = outbox
            .enqueue_many(&mut conn, chunk.into_iter().map(|(m, _)| m))
            .await
            .expect("enqueue");
        out.extend(ids.into_iter().zip(keys));
    }
    out
}

/// Every message in the stream, in stream order: (sequence, Nats-Msg-Id, partition key).
pub async fn stream_messages(client: &async_nats::Client) -> Vec<(u64, String, String)> {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(STREAM).await.expect("stream");
    let info = stream.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    if info.messages == 0 {
        return out;
    }
    for seq in info.first_sequence..=info.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                let id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let key = m
                    .headers
                    .get("ce-partitionkey")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                out.push((seq, id, key));
            }
            Err(e) => panic!("reading stream message {seq}: {e}"),
        }
    }
    out
}

/// The stream holds exactly `expected`, each once, and each key's messages in enqueue order.
pub fn assert_exactly_once_in_key_order(
    expected: &[(MessageId, String)],
    stored: &[(u64, String, String)],
) {
    let mut seen = HashSet::new();
    for (seq, id, _) in stored {
        assert!(
            seen.insert(id.clone()),
            "message {id} is stored twice (second copy at sequence {seq})"
        );
    }
    let wanted: HashSet<String> = expected.iter().map(|(id, _)| id.to_string()).collect();
    let missing: Vec<&String> = wanted.difference(&seen).collect();
    let extra: Vec<&String> = seen.difference(&wanted).collect();
    assert!(
        missing.is_empty(),
        "{} enqueued messages are not in the stream, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(
        extra.is_empty(),
        "{} unexpected messages in the stream, e.g. {:?}",
        extra.len(),
        extra.first()
    );

    let mut want_by_key: HashMap<&str, Vec<String>> = HashMap::new();
    for (id, key) in expected {
        want_by_key.entry(key).or_default().push(id.to_string());
    }
    let mut got_by_key: HashMap<&str, Vec<String>> = HashMap::new();
    for (_, id, key) in stored {
        got_by_key.entry(key).or_default().push(id.clone());
    }
    for (key, want) in &want_by_key {
        assert_eq!(
            got_by_key.get(key),
            Some(want),
            "messages of {key} are out of order in the stream"
        );
    }
}

/// A fast-reacting test configuration.
pub fn test_config(instance: &str) -> RelayConfig {
    RelayConfig {
        instance_id: instance.to_owned(),
        publish_timeout: Duration::from_millis(1000),
        claim_ttl: Duration::from_secs(4),
        retry_min_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        stats_interval: Duration::from_millis(200),
        poll_max_interval: Duration::from_millis(20),
        ..RelayConfig::default()
    }
}

/// Runs the relay library in this process until the returned sender fires.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), relay::Error>>,
    pub health: relay::Health,
}

pub async fn start_in_process(env: &Env, config: RelayConfig) -> InProcess {
    let publisher = env.publisher(&config).await;
    let relay = relay::Relay::new(config, env.pool.clone(), publisher).expect("valid config");
    let health = relay.health();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async move {
        let _ = rx.await;
    }));
    InProcess {
        stop: Some(tx),
        task,
        health,
    }
}

impl InProcess {
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("relay stops within 30s")
            .expect("relay task")
            .expect("relay run");
    }
}

/// Waits until the stream holds `n` messages and no row is unpublished.
pub async fn wait_drained(env: &Env, client: &async_nats::Client, n: usize, deadline: Duration) {
    let js = jetstream::new(client.clone());
    wait_until(
        deadline,
        &format!("{n} messages published and marked"),
        || async {
            let Ok(mut stream) = js.get_stream(STREAM).await else {
                return false;
            };
            let Ok(info) = stream.info().await else {
                return false;
            };
            info.state.messages as usize >= n && env.unpublished().await == 0
        },
    )
    .await
    .expect("drained");
}

/// The `relay` binary as a child process ([`testkit::Process`]), SIGKILLed on drop. Its
/// output goes to a log file in the test's scratch directory, printed when a test fails.
pub struct RelayProcess {
    process: Process,
    pub http: SocketAddr,
    pub instance: String,
    log: PathBuf,
}

pub fn spawn_relay(env: &Env, instance: &str, extra: &[&str]) -> RelayProcess {
    spawn_relay_with_url(env, &env.db_url, instance, extra)
}

/// [`spawn_relay`] on the database URL `db_url` (another role, say).
pub fn spawn_relay_with_url(
    env: &Env,
    db_url: &str,
    instance: &str,
    extra: &[&str],
) -> RelayProcess {
    let port = testkit::free_port().expect("port");
    let http = SocketAddr::from(([127, 0, 0, 1], port));
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let log = scratch.join(format!(
        "relay-{instance}-{}-{port}.log",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&log);
    let http_addr = http.to_string();
    let args = [
        "run",
        "--instance-id",
        instance,
        "--http-addr",
        &http_addr,
        "--publish-timeout",
        "1s",
        "--claim-ttl",
        "4s",
        "--lease-ttl",
        "2s",
        "--heartbeat-interval",
        "300ms",
        "--retry-min-delay",
        "20ms",
        "--retry-max-delay",
        "500ms",
        "--poll-max",
        "20ms",
    ]
    .iter()
    .chain(extra)
    .map(OsString::from)
    .collect();
    let vars = [
        ("DATABASE_URL", db_url),
        ("NATS_URL", env.nats.url()),
        ("RELAY_STREAM", STREAM),
        ("RELAY_STREAM_SUBJECTS", "test.>"),
        ("RUST_LOG", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect();
    let process = Process::spawn(ProcessSpec {
        name: "relay",
        program: env!("CARGO_BIN_EXE_relay").into(),
        args,
        env: vars,
        cwd: scratch,
        log: log.clone(),
    })
    .expect("spawn relay binary");
    RelayProcess {
        process,
        http,
        instance: instance.to_owned(),
        log,
    }
}

impl RelayProcess {
    /// SIGKILL, and waits until it is gone.
    pub fn sigkill(&mut self) {
        self.process.kill().expect("SIGKILL the relay");
    }

    /// Waits (up to `deadline`) for the process to exit on its own.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let process = &mut self.process;
        let mut status = None;
        wait_until(deadline, "the relay exits", || {
            status = status.or_else(|| process.exit_status());
            let done = status.is_some();
            async move { done }
        })
        .await
        .expect("the relay exits");
        status.expect("exited")
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// SIGTERM, then waits (up to `deadline`) for the process to exit.
    pub async fn sigterm(&mut self, deadline: Duration) -> ExitStatus {
        self.process
            .terminate_with_status(deadline)
            .await
            .expect("relay exits after SIGTERM")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        if std::thread::panicking() {
            eprintln!(
                "relay {} log ({}), last lines:\n{}",
                self.instance,
                self.log.display(),
                self.process.log_tail()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// GET over plain HTTP/1.0: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, body))
}

/// Messages in the stream now (0 if it cannot be read).
pub async fn stream_count(client: &async_nats::Client) -> u64 {
    let js = jetstream::new(client.clone());
    let Ok(mut stream) = js.get_stream(STREAM).await else {
        return 0;
    };
    stream.info().await.map(|i| i.state.messages).unwrap_or(0)
}

/// Runs the relay binary with arguments and environment; returns (exit code, stdout, stderr).
pub fn relay_cli(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env("RUST_LOG", "error");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
