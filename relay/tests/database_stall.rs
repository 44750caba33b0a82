//! A database that stops answering (the connection stays open, nothing comes back) must not
//! hang the relay: readiness turns false within seconds, publishing resumes once it answers
//! again, and a stop while it is silent ends within a bound, losing nothing.

mod common;

use std::time::Duration;

use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use testkit::{TcpProxy, wait_until};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_turns_the_relay_unready_and_publishing_resumes() {
    let env = env().await;
    let proxy = TcpProxy::start(env.pg.addr()).await.expect("proxy");
    let options: PgConnectOptions = env.db_url.parse().expect("url");
    let config = relay::RelayConfig {
        db_timeout: Duration::from_secs(1),
        ..test_config("relay-stalled")
    };
    let pool = PgPoolOptions::new()
        .max_connections(config.min_connections() + 2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.port(proxy.addr().port()));
    let mut expected = enqueue(&env.pool, 20_000, 50).await;
    let claim_ttl = config.claim_ttl;
    let db_timeout = config.db_timeout;
    let publisher = env.publisher(&config).await;
    let relay = relay::Relay::new(config, pool, publisher).expect("relay");
    let health = relay.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    wait_until(Duration::from_secs(30), "some published", || async {
        env.published().await >= 1_000
    })
    .await
    .expect("progress before the stall");
    proxy.stall();
    let stalled_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "readiness turns false while the database is silent",
        || async { !health.is_ready() },
    )
    .await
    .expect("not ready while the database does not answer");
    println!("unready {:?} after the stall", stalled_at.elapsed());
    let during = env.published().await;
    assert!(
        during < expected.len() as i64,
        "the stall happened mid-drain ({during} marked)"
    );
    proxy.unstall();
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(90)).await;
    wait_until(Duration::from_secs(10), "ready again", || async {
        health.is_ready()
    })
    .await
    .expect("ready after the database answers again");

    // A stop while the database is silent mid-drain ends within a bound.
    expected.extend(enqueue(&env.pool, 20_000, 50).await);
    wait_until(Duration::from_secs(30), "more published", || async {
        env.published().await >= 21_000
    })
    .await
    .expect("progress before the second stall");
    proxy.stall();
    let asked = Instant::now();
    let _ = stop.send(());
    // A claim or commit waits db_timeout at most, the wait for unmarked rows claim_ttl, the
    // lease release 5 s.
    let bound = claim_ttl + db_timeout * 2 + Duration::from_secs(6);
    assert!(bound < Duration::from_secs(20), "{bound:?}");
    let outcome = tokio::time::timeout(bound, &mut task).await;
    let took = asked.elapsed();
    assert!(
        outcome.is_ok(),
        "the relay did not stop within {bound:?} while the database was silent"
    );
    outcome
        .expect("stopped")
        .expect("relay task")
        .expect("relay run");
    println!("stopped {took:?} after being asked, database silent");
    proxy.unstall();

    // Nothing lost: another relay finishes the drain, each message once and in key order.
    let relay = start_in_process(&env, test_config("relay-after")).await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(90)).await;
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}
