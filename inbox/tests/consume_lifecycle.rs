//! The inbox consumer against real PostgreSQL and nats-server: starting (a pool too small
//! is refused) and shutting down (the handler in progress commits and acks).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::consume::*;
use common::*;
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, typed};
use sqlx::PgConnection;

/// Waits for a go-ahead before succeeding.
struct Gated {
    recorder: Recorder,
    started: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl Handler<OrderPlaced> for Gated {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        self.started.notify_one();
        self.go.notified().await;
        self.recorder.handle(conn, event, delivery).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_handler_in_progress_commit_and_ack() {
    let env = env().await;
    let recorder = Recorder::new("ledger", Behaviour::Succeed);
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let handler = Gated {
        recorder: recorder.clone(),
        started: started.clone(),
        go: go.clone(),
    };
    let mut running = start(
        &env,
        env.js.clone(),
        ConsumerConfig {
            concurrency: 1,
            ack_wait: Duration::from_secs(30),
            ..config("ledger")
        },
        typed(handler),
    );
    publish(&env.js, &order_envelope("o-10")).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("handler started");
    running.ask_to_stop(); // shutdown requested while the handler is in progress
    go.notify_one();
    running.stop().await;
    assert_eq!(
        applied(&env.pool, "ledger").await,
        1,
        "the in-progress handler committed"
    );
    let floor = ack_state(&env.js, "ledger").await.expect("consumer info").0;
    assert_eq!(
        floor, 1,
        "and its ack reached the broker before run() returned"
    );
}

#[tokio::test]
async fn a_pool_smaller_than_the_lanes_need_is_refused() {
    let env = env().await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_lazy_with(env.pool.connect_options().as_ref().clone());
    struct Noop;
    impl Handler<OrderPlaced> for Noop {
        async fn handle(
            &self,
            _: &mut PgConnection,
            _: OrderPlaced,
            _: &Delivery,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let refused = Consumer::new(config("small"), small, env.js.clone(), typed(Noop));
    let Err(inbox::Error::Config(reason)) = refused else {
        panic!("a 5-connection pool for 8 lanes must be refused");
    };
    assert!(reason.contains("needs at least 10"), "{reason}");
    let fits = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_lazy_with(env.pool.connect_options().as_ref().clone());
    Consumer::new(
        ConsumerConfig {
            concurrency: 1,
            ..config("small")
        },
        fits,
        env.js.clone(),
        typed(Noop),
    )
    .expect("one lane fits in three connections");
}
