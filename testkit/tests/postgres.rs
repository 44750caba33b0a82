//! PostgreSQL servers started by the kit: isolation, kill/restart, stop, pause.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use testkit::{Postgres, PostgresConfig};
use tokio::time::timeout;

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect")
}

#[tokio::test]
async fn fresh_databases_are_distinct_and_committed_rows_survive_a_kill() {
    let mut pg = Postgres::start().await.expect("start postgres");
    let a = pg.fresh_database().await.expect("first database");
    let b = pg.fresh_database().await.expect("second database");
    assert_ne!(a, b);

    let mut conn_a = connect(&a).await;
    sqlx::query("CREATE TABLE item (id int PRIMARY KEY)")
        .execute(&mut conn_a)
        .await
        .expect("write");
    sqlx::query("INSERT INTO item VALUES (1), (2)")
        .execute(&mut conn_a)
        .await
        .expect("write");
    let mut conn_b = connect(&b).await;
    let error = sqlx::query("SELECT count(*) FROM item")
        .fetch_one(&mut conn_b)
        .await
        .expect_err("the table exists only in the first database");
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(
        code.as_deref(),
        Some("42P01"),
        "undefined_table expected, got {error}"
    );

    pg.kill().expect("kill");
    sqlx::query("SELECT 1")
        .execute(&mut conn_a)
        .await
        .expect_err("a query on a killed server fails");
    PgConnection::connect(&a)
        .await
        .expect_err("connecting to a killed server fails");

    pg.restart().await.expect("restart after kill");
    let mut conn = connect(&a).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM item")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(
        count, 2,
        "committed rows survive SIGKILL of every server process"
    );
}

#[tokio::test]
async fn a_paused_server_answers_nothing_until_resumed() {
    let pg = Postgres::start().await.expect("start postgres");
    let url = pg.fresh_database().await.expect("database");
    let mut conn = connect(&url).await;

    pg.pause().expect("pause");
    let mut query = tokio::spawn(async move {
        sqlx::query_scalar::<_, i32>("SELECT 42")
            .fetch_one(&mut conn)
            .await
    });
    let connect_url = url.clone();
    let mut new_connection =
        tokio::spawn(async move { PgConnection::connect(&connect_url).await.map(|_| ()) });
    assert!(
        timeout(Duration::from_millis(300), &mut query)
            .await
            .is_err(),
        "a query completed on a paused server"
    );
    assert!(
        timeout(Duration::from_millis(100), &mut new_connection)
            .await
            .is_err(),
        "a connection was accepted by a paused server"
    );

    pg.resume().expect("resume");
    let answer = timeout(Duration::from_secs(10), query)
        .await
        .expect("the query completes after resume")
        .expect("query task")
        .expect("query");
    assert_eq!(answer, 42);
    timeout(Duration::from_secs(10), new_connection)
        .await
        .expect("the connection completes after resume")
        .expect("connect task")
        .expect("connect");
}

#[tokio::test]
async fn stopped_servers_restart_with_their_data_and_drop_frees_the_port() {
    let mut pg = Postgres::start().await.expect("start postgres");
    let url = pg.fresh_database().await.expect("database");
    let mut conn = connect(&url).await;
    sqlx::query("CREATE TABLE item (id int)")
        .execute(&mut conn)
        .await
        .expect("write");
    sqlx::query("INSERT INTO item VALUES (1)")
        .execute(&mut conn)
        .await
        .expect("write");
    drop(conn);

    pg.stop().await.expect("fast stop");
    PgConnection::connect(&url)
        .await
        .expect_err("a stopped server refuses connections");
    pg.pause()
        .expect_err("pausing a stopped server is an error");
    pg.restart().await.expect("restart after stop");
    let mut conn = connect(&url).await;
    sqlx::query("INSERT INTO item VALUES (2)")
        .execute(&mut conn)
        .await
        .expect("write");
    drop(conn);

    pg.stop_immediate().await.expect("immediate stop");
    pg.restart()
        .await
        .expect("restart after immediate stop (crash recovery)");
    let mut conn = connect(&url).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM item")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(count, 2);
    drop(conn);

    let addr = pg.addr();
    drop(pg);
    tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("nothing listens after drop");
}

#[tokio::test]
async fn a_durable_server_keeps_fsync_and_full_page_writes_on() {
    let (durable, fast) = tokio::join!(
        Postgres::start_with(PostgresConfig {
            durable: true,
            ..PostgresConfig::default()
        }),
        Postgres::start()
    );
    let (durable, fast) = (
        durable.expect("start durable postgres"),
        fast.expect("start postgres"),
    );
    let show = |url: String, setting: &'static str| async move {
        let mut conn = connect(&url).await;
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
            .fetch_one(&mut conn)
            .await
            .expect(setting)
    };
    for setting in ["fsync", "full_page_writes"] {
        assert_eq!(
            show(durable.url().to_owned(), setting).await,
            "on",
            "{setting}"
        );
        assert_eq!(
            show(fast.url().to_owned(), setting).await,
            "off",
            "{setting}"
        );
    }
}

#[tokio::test]
async fn a_logical_decoding_server_decodes_committed_messages_only() {
    let (logical, plain) = tokio::join!(
        Postgres::start_with(PostgresConfig {
            logical_decoding: true,
            ..PostgresConfig::default()
        }),
        Postgres::start()
    );
    let (logical, plain) = (
        logical.expect("start postgres with wal_level=logical"),
        plain.expect("start postgres"),
    );
    let mut conn = connect(&logical.fresh_database().await.expect("database")).await;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut conn)
        .await
        .expect("wal_level");
    assert_eq!(level, "logical");
    // Temporary: dropped with the session, also on an external server.
    let slot = format!("kit_{}", uuid::Uuid::now_v7().simple());
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)")
        .bind(&slot)
        .execute(&mut conn)
        .await
        .expect("a logical slot");
    for (content, commit) in [("kept", true), ("rolled back", false)] {
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1)")
            .bind(content)
            .execute(&mut *tx)
            .await
            .expect("emit");
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
    let changes: Vec<String> =
        sqlx::query_scalar("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
            .bind(&slot)
            .fetch_all(&mut conn)
            .await
            .expect("changes");
    let messages: Vec<&String> = changes
        .iter()
        .filter(|c| c.starts_with("message:"))
        .collect();
    assert_eq!(messages.len(), 1, "{changes:?}");
    assert!(messages[0].ends_with("content:kept"), "{changes:?}");

    let mut conn = connect(plain.url()).await;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut conn)
        .await
        .expect("wal_level");
    assert_eq!(level, "replica", "the default keeps PostgreSQL's wal_level");
}
