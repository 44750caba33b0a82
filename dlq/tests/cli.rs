//! The `dlq` binary against a real PostgreSQL: every command and every error path.

use std::process::{Command, Stdio};

use dlq::{DeadLetter, Source};
use envelope::{Envelope, HeaderText};
use sqlx::PgPool;
use testkit::Postgres;

struct Db {
    _pg: Postgres,
    url: String,
    pool: PgPool,
}

async fn db() -> Db {
    let pg = Postgres::start().await.expect("PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let pool = PgPool::connect(&url).await.expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    Db { _pg: pg, url, pool }
}

/// Runs `dlq` with `args` against `url` (or none); returns (exit code, stdout, stderr).
fn dlq(url: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlq"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null());
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    let out = cmd.output().expect("run dlq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    n: u32,
}

impl envelope::Event for Ping {
    const NAME: &'static str = "test.ping";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        format!("k-{}", self.n)
    }
}

fn letter(
    source: Source,
    consumer: &str,
    subject: &str,
    reason: &str,
    payload: &[u8],
) -> DeadLetter {
    let env = Envelope::from_event(HeaderText::new("s", "svc").expect("valid"), &Ping { n: 1 })
        .expect("valid");
    let headers = envelope::nats::to_headers(&env)
        .expect("headers")
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v[0].as_str().to_owned()),
            )
        })
        .collect();
    DeadLetter {
        source,
        consumer: consumer.into(),
        message_id: env.id.to_string(),
        subject: subject.into(),
        partition_key: Some("k-1".into()),
        headers,
        payload: payload.to_vec(),
        reason: reason.into(),
        error_chain: vec!["outer".into(), "inner cause".into()],
        attempts: 3,
        stream: None,
        stream_seq: None,
    }
}

async fn seed(pool: &PgPool) -> (i64, i64, i64) {
    let mut conn = pool.acquire().await.expect("acquire");
    let email = dlq::store::record(
        &mut conn,
        &letter(
            Source::Consumer,
            "email",
            "test.ping.v1",
            "attempts_exhausted",
            br#"{"n":1}"#,
        ),
    )
    .await
    .expect("record");
    let billing = dlq::store::record(
        &mut conn,
        &letter(
            Source::Consumer,
            "billing",
            "orders.paid.v1",
            "decode",
            b"\xff\x00raw",
        ),
    )
    .await
    .expect("record");
    let relay = dlq::store::record(
        &mut conn,
        &letter(
            Source::Relay,
            "relay",
            "test.ping.v1",
            "no_stream",
            br#"{"n":1}"#,
        ),
    )
    .await
    .expect("record");
    (email, billing, relay)
}

#[tokio::test]
async fn list_show_stats() {
    let db = db().await;
    let (email, billing, _relay) = seed(&db.pool).await;
    let url = Some(db.url.as_str());

    let (code, out, err) = dlq(url, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rows.len(), 3);
    let (code, out, _) = dlq(url, &["list", "--json", "--consumer", "billing"]);
    assert_eq!(code, 0);
    let only: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(only["id"], billing);
    assert_eq!(only["reason"], "decode");
    assert_eq!(
        only["payload"]["hex"], "ff00726177",
        "binary payloads are shown as hex"
    );
    let (_, out, _) = dlq(url, &["list", "--json", "--reason", "no_stream"]);
    assert_eq!(out.lines().count(), 1);
    let (_, out, _) = dlq(
        url,
        &[
            "list",
            "--json",
            "--since",
            "1h",
            "--subject",
            "test.ping.v1",
        ],
    );
    assert_eq!(out.lines().count(), 2);
    let (code, out, _) = dlq(url, &["list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("    ID  CONSUMER"), "{out}");
    assert_eq!(out.lines().count(), 4);

    let (code, out, err) = dlq(url, &["show", &email.to_string()]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "subject:      test.ping.v1",
        "reason:       attempts_exhausted",
        "0: outer",
        "1: inner cause",
        "\"n\": 1",
        "ce-type: test.ping.v1",
    ] {
        assert!(out.contains(expected), "show lacks {expected:?}:\n{out}");
    }
    let (code, out, _) = dlq(url, &["show", &email.to_string(), "--json"]);
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(shown["payload"]["n"], 1);
    assert_eq!(shown["attempts"], 3);

    let (code, out, _) = dlq(url, &["stats", "--json"]);
    assert_eq!(code, 0);
    let stats: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        stats
            .iter()
            .map(|s| s["count"].as_i64().unwrap_or(0))
            .sum::<i64>(),
        3
    );
    let (code, out, _) = dlq(url, &["stats"]);
    assert_eq!(code, 0);
    assert!(out.contains("total: 3"), "{out}");
}

#[tokio::test]
async fn retry_consumer_and_relay_dead_letters() {
    let db = db().await;
    let (email, billing, relay) = seed(&db.pool).await;
    let url = Some(db.url.as_str());

    let (code, out, _) = dlq(url, &["retry", &email.to_string(), "--dry-run"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("would retry 1 dead letters (1 by consumers, 0 back to the outbox)"),
        "{out}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM dead_letter WHERE id = $1")
        .bind(email)
        .fetch_one(&db.pool)
        .await
        .expect("status");
    assert_eq!(status, "dead", "a dry run changes nothing");

    let (code, out, err) = dlq(url, &["retry", &email.to_string(), &relay.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 dead letters (1 re-run by their consumers, 1 back to the outbox)"),
        "{out}"
    );
    let statuses: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, status FROM dead_letter ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("statuses");
    assert_eq!(
        statuses,
        [
            (email, "retry_requested".into()),
            (billing, "dead".into()),
            (relay, "retried".into())
        ]
    );
    let relay_message: String =
        sqlx::query_scalar("SELECT message_id FROM dead_letter WHERE id = $1")
            .bind(relay)
            .fetch_one(&db.pool)
            .await
            .expect("id");
    let back: (String, String) = sqlx::query_as("SELECT id::text, status FROM outbox_message")
        .fetch_one(&db.pool)
        .await
        .expect("the relay dead letter is back in the outbox");
    assert_eq!(
        back,
        (relay_message, "pending".into()),
        "with its original id"
    );

    // Retrying what is not dead any more, an unknown id, or nothing: clear errors.
    let (code, _, err) = dlq(url, &["retry", &email.to_string()]);
    assert_eq!(code, 3);
    assert!(
        err.trim()
            .ends_with("is retry_requested, not dead: nothing to retry"),
        "{err}"
    );
    let (code, _, err) = dlq(url, &["retry", "999999"]);
    assert_eq!(
        (code, err.trim()),
        (3, "dlq: no dead letter with id 999999")
    );
    let (code, _, err) = dlq(url, &["retry"]);
    assert_eq!(code, 2);
    assert!(err.contains("say what to retry"), "{err}");
    let (code, out, _) = dlq(url, &["retry", "--consumer", "billing"]);
    assert_eq!(code, 0);
    assert!(out.contains("retry requested for 1 dead letters"), "{out}");
}

#[tokio::test]
async fn purge_asks_for_confirmation() {
    let db = db().await;
    seed(&db.pool).await;
    let url = Some(db.url.as_str());
    let (code, _, err) = dlq(url, &["purge", "--consumer", "email"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "dlq: purge would delete 1 dead letters; pass --yes to confirm"
    );
    let (code, out, _) = dlq(url, &["purge", "--consumer", "email", "--yes"]);
    assert_eq!((code, out.trim()), (0, "purged 1 dead letters"));
    let (code, out, _) = dlq(url, &["purge", "--older-than", "1d", "--yes"]);
    assert_eq!(
        (code, out.trim()),
        (0, "no dead letters match"),
        "nothing is a day old"
    );
    let (code, out, _) = dlq(url, &["purge", "--yes"]);
    assert_eq!((code, out.trim()), (0, "purged 2 dead letters"));
}

#[test]
fn database_errors_are_one_line_with_an_exit_code() {
    let (code, _, err) = dlq(None, &["list"]);
    assert_eq!(
        (code, err.trim()),
        (
            2,
            "dlq: no database: set DATABASE_URL or pass --database-url"
        )
    );
    let unreachable = format!(
        "postgres://postgres@127.0.0.1:{}/nothing",
        testkit::free_port().expect("port")
    );
    let (code, _, err) = dlq(Some(&unreachable), &["stats"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("dlq: cannot connect to the database"),
        "{err}"
    );
    let (code, _, err) = dlq(Some(&unreachable), &["list", "--status", "lost"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = dlq(Some(&unreachable), &["list", "--since", "yesterday"]);
    assert_eq!(code, 2, "{err}");
}

/// Control characters a hostile message can carry: clear screen, set the window title (OSC
/// ended by BEL), carriage return (overwrites the line), an 8-bit CSI (U+009B) and a
/// right-to-left override.
const CLEAR: &str = "\x1b[2J";
const TITLE: &str = "\x1b]0;pwned\x07";

#[tokio::test]
async fn text_output_escapes_control_characters_and_json_keeps_them() {
    let db = db().await;
    let url = Some(db.url.as_str());
    let subject = format!("evil{CLEAR}.v1");
    let header = format!("x{TITLE}y");
    let errors = vec![
        format!("boom\r{CLEAR}fake prompt$ "),
        "cause \u{202e}txt.exe\u{9b}31m".to_owned(),
    ];
    let payload = format!("line one{CLEAR}\r\nline two \u{9b}2J end");
    let mut hostile = letter(
        Source::Consumer,
        &format!("mailer{TITLE}"),
        &subject,
        "handler",
        payload.as_bytes(),
    );
    hostile
        .headers
        .insert("x-evil".into(), serde_json::Value::String(header.clone()));
    hostile.error_chain = errors.clone();
    let id = {
        let mut conn = db.pool.acquire().await.expect("acquire");
        dlq::store::record(&mut conn, &hostile)
            .await
            .expect("record")
    };

    let raw = |out: &str| -> Vec<String> {
        let mut found = Vec::new();
        for (name, bad) in [
            ("ESC", "\x1b"),
            ("BEL", "\x07"),
            ("CR", "\r"),
            ("CSI", "\u{9b}"),
            ("RLO", "\u{202e}"),
        ] {
            if out.contains(bad) {
                found.push(name.to_owned());
            }
        }
        if let Some(c) = out.chars().find(|c| c.is_control() && *c != '\n') {
            found.push(format!("{c:?}"));
        }
        found
    };

    // JSON stays exact: decoding gives back the original strings.
    let (code, out, err) = dlq(url, &["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let (code, out, err) = dlq(url, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    for value in [&shown, &listed] {
        assert_eq!(value["subject"], subject.as_str());
        assert_eq!(value["consumer"], format!("mailer{TITLE}").as_str());
        assert_eq!(value["headers"]["x-evil"], header.as_str());
        assert_eq!(value["error_chain"], serde_json::json!(errors));
        assert_eq!(value["payload"], payload.as_str());
    }
    assert_eq!(shown, listed);

    let (code, out, err) = dlq(url, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        raw(&out),
        Vec::<String>::new(),
        "raw control characters in list:\n{out:?}"
    );
    for escaped in [r"evil\x1b[2J.v1", r"mailer\x1b]0;pwned\x07"] {
        assert!(out.contains(escaped), "list lacks {escaped:?}:\n{out}");
    }

    let (code, out, err) = dlq(url, &["show", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        raw(&out),
        Vec::<String>::new(),
        "raw control characters in show:\n{out:?}"
    );
    for escaped in [
        r"subject:      evil\x1b[2J.v1",
        r"x-evil: x\x1b]0;pwned\x07y",
        r"0: boom\r\x1b[2Jfake prompt$ ",
        r"1: cause \u{202e}txt.exe\u{9b}31m",
        r"line one\x1b[2J\r",
        r"line two \u{9b}2J end",
    ] {
        assert!(out.contains(escaped), "show lacks {escaped:?}:\n{out}");
    }
}

#[tokio::test]
async fn absurd_ages_are_one_line_errors_and_change_nothing() {
    let db = db().await;
    seed(&db.pool).await;
    let url = Some(db.url.as_str());
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letter")
            .fetch_one(&db.pool)
            .await
            .expect("count")
    };
    for (flag, args) in [
        // Representable by `time` (year -6200) but not by PostgreSQL.
        (
            "--older-than",
            &["purge", "--yes", "--older-than", "3000000d"][..],
        ),
        (
            "--older-than",
            &["purge", "--yes", "--older-than", "999999999999d"],
        ),
        (
            "--older-than",
            &["purge", "--yes", "--older-than", "300000000000000d"],
        ),
        (
            "--older-than",
            &["purge", "--yes", "--older-than", "99999999999999999999999d"],
        ),
        ("--older-than", &["purge", "--yes", "--older-than=-5d"]),
        ("--since", &["purge", "--yes", "--since", "99999999999h"]),
        ("--since", &["list", "--since", "99999999999h"]),
        ("--since", &["list", "--since", "999999999999999999m"]),
        ("--since", &["list", "--since=-1h"]),
        ("--since", &["list", "--since", "yesterday"]),
    ] {
        let (code, out, err) = dlq(url, args);
        assert_eq!(
            code, 2,
            "{args:?}: exit {code} (101 is a panic)\nstderr: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("dlq: ") && err.contains(flag),
            "{args:?}: stderr does not name {flag}: {err}"
        );
        assert_eq!(out, "", "{args:?}");
        assert_eq!(count().await, 3, "{args:?} changed nothing");
    }
    // A large but representable age is fine: nothing is that old.
    let (code, out, err) = dlq(url, &["purge", "--yes", "--older-than", "700000d"]);
    assert_eq!((code, out.trim()), (0, "no dead letters match"), "{err}");
    assert_eq!(count().await, 3);
}

/// A database that does not answer (here: a purge waits on a row lock held elsewhere) ends
/// the command after `--timeout` with one line and exit 1, and changes nothing.
#[tokio::test]
async fn a_database_that_does_not_answer_times_out_and_changes_nothing() {
    let db = db().await;
    seed(&db.pool).await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    let mut holder = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM dead_letter FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock the dead letters");
    let started = std::time::Instant::now();
    let (code, out, err) = dlq(
        Some(db.url.as_str()),
        &["purge", "--consumer", "email", "--yes", "--timeout", "2"],
    );
    let took = started.elapsed();
    assert_eq!(code, 1, "stdout: {out} stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("did not answer within 2s"),
        "one readable line: {err}"
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "gave up after {took:?}"
    );
    holder.rollback().await.expect("release the locks");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(after, before, "nothing was purged");
}
