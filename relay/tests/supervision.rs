//! A relay whose task panics stops with an error and is not ready: never half alive.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envelope::Envelope;
use outbox::{Message, Outbox};
use relay::RelayConfig;
use relay::publisher::{AckFuture, PublishError, Publisher};
use testkit::Postgres;

/// A publisher that panics on its first publish (a bug in user code behind the seam, or in a
/// client library).
struct Panicking {
    calls: Arc<AtomicUsize>,
}

impl Publisher for Panicking {
    async fn publish(&self, _envelope: &Envelope) -> Result<AckFuture, PublishError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        panic!("publisher bug");
    }

    fn is_connected(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_dispatcher_stops_the_relay_with_an_error() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let (_, pool) = common::migrated_database(&pg).await;
    let outbox = Outbox::new("supervision-test").expect("outbox");
    outbox
        .enqueue_message(
            &mut pool.acquire().await.expect("acquire"),
            Message::raw("test.event", "test.event.v1", "k", "{}"),
        )
        .await
        .expect("enqueue");

    let calls = Arc::new(AtomicUsize::new(0));
    let config = RelayConfig {
        instance_id: "supervised".into(),
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(200),
        ..RelayConfig::default()
    };
    let relay = relay::Relay::new(
        config,
        pool.clone(),
        Panicking {
            calls: calls.clone(),
        },
    )
    .expect("relay");
    let health = relay.health();
    // Never asked to stop: only a failure can end it.
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        relay.run(std::future::pending::<()>()),
    )
    .await
    .expect("the relay ends within 30 s once its dispatcher panicked");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "it published once");
    match outcome {
        Err(relay::Error::TaskFailed { task, reason }) => {
            assert_eq!(task, "dispatcher");
            assert!(reason.contains("publisher bug"), "{reason}");
        }
        other => panic!("expected TaskFailed, got {other:?}"),
    }
    assert!(!health.is_ready(), "a failed relay is not ready");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_message WHERE status = 'pending'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(pending, 1, "the row stays pending for the next relay");
    let owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay_partition_lease WHERE owner IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(owned, 0, "a failed relay gives its partitions up");
}

/// A task that is disabled by its setting idles until stopped: `vacuum_interval = 0` must
/// not read as a task that ended on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_vacuum_is_not_a_failed_task() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let (_, pool) = common::migrated_database(&pg).await;
    let config = RelayConfig {
        instance_id: "no-vacuum".into(),
        vacuum_interval: Duration::ZERO,
        ..RelayConfig::default()
    };
    let publisher = relay::publisher::memory::MemoryPublisher::new("OUTBOX", &["test."]);
    let relay = relay::Relay::new(config, pool.clone(), publisher).expect("relay");
    let health = relay.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    testkit::wait_until(Duration::from_secs(10), "partitions taken", || async {
        health.report().partitions_owned > 0
    })
    .await
    .expect("the relay runs");
    assert!(!task.is_finished(), "the relay is still running");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("stops within 30 s")
        .expect("relay task")
        .expect("a relay without vacuum stops cleanly");
}
