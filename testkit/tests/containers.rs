//! The container backend (feature `containers`, run by `make test-containers`): servers chosen
//! per call really run in Docker, their controls act on the container, and dropping them
//! removes it. The other suites of this crate run on it too with `TESTKIT_BACKEND=containers`.
#![cfg(feature = "containers")]

use std::process::Command;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use testkit::{Backend, NatsServer, NatsServerConfig, Postgres, PostgresConfig};
use tokio::time::timeout;

/// The names of the running containers that publish host port `port`.
fn containers_publishing(port: u16) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "--format", "{{.Names}} {{.Ports}}"])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&format!(":{port}->")))
        .map(|line| line.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

fn in_containers() -> PostgresConfig {
    PostgresConfig {
        backend: Some(Backend::Containers),
        ..PostgresConfig::default()
    }
}

#[tokio::test]
async fn a_postgres_container_keeps_its_data_through_kill_and_restart_and_goes_on_drop() {
    let mut pg = Postgres::start_with(in_containers())
        .await
        .expect("start a postgres container");
    let names = containers_publishing(pg.port());
    assert!(
        names.len() == 1 && names[0].starts_with("testkit-postgres."),
        "one testkit container publishes port {}: {names:?}",
        pg.port()
    );
    let url = pg.fresh_database().await.expect("database");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("CREATE TABLE item (id int); INSERT INTO item VALUES (1), (2)")
        .execute(&mut conn)
        .await
        .expect("write");

    pg.kill().expect("kill");
    assert!(
        containers_publishing(pg.port()).is_empty(),
        "a killed container is not running"
    );
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect_err("a query on a killed container fails");

    pg.restart().await.expect("restart after kill");
    let url = url.replace(
        &format!(":{}/", url_port(&url)),
        &format!(":{}/", pg.port()),
    );
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("connect after restart, on the port looked up again");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM item")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(count, 2, "committed rows survive SIGKILL of the container");

    pg.pause().expect("pause");
    let mut query = tokio::spawn(async move {
        sqlx::query_scalar::<_, i32>("SELECT 7")
            .fetch_one(&mut conn)
            .await
    });
    assert!(
        timeout(Duration::from_millis(300), &mut query)
            .await
            .is_err(),
        "a query completed in a frozen container"
    );
    pg.resume().expect("resume");
    let seven = timeout(Duration::from_secs(10), query)
        .await
        .expect("the query completes after resume")
        .expect("query task")
        .expect("query");
    assert_eq!(seven, 7);

    let port = pg.port();
    drop(pg);
    assert!(
        containers_publishing(port).is_empty(),
        "dropping the server removes its container"
    );
}

fn url_port(url: &str) -> u16 {
    let after_host = url.rsplit_once(':').expect("port").1;
    after_host
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the URL")
}

#[tokio::test]
async fn a_nats_container_serves_jetstream_and_honours_max_payload() {
    let nats = NatsServer::start_with(NatsServerConfig {
        max_payload: Some(4096),
        backend: Some(Backend::Containers),
        ..NatsServerConfig::default()
    })
    .await
    .expect("start a nats container");
    let names = containers_publishing(nats.port());
    assert!(
        names.len() == 1 && names[0].starts_with("testkit-nats."),
        "one testkit container publishes port {}: {names:?}",
        nats.port()
    );
    let client = async_nats::connect(nats.url()).await.expect("connect");
    assert_eq!(client.server_info().max_payload, 4096);
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "C".into(),
        subjects: vec!["c.>".into()],
        ..Default::default()
    })
    .await
    .expect("a JetStream stream in the container");
    assert!(
        nats.store_dir()
            .expect("store on the host")
            .join("jetstream")
            .is_dir(),
        "the container's store is the host directory"
    );
}
