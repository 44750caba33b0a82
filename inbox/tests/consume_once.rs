//! The inbox consumer against real PostgreSQL and nats-server: a message takes effect once,
//! however often the broker delivers it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::consume::*;
use common::*;
use inbox::{Delivery, Handler, HandlerError, typed};
use sqlx::PgConnection;
use testkit::{TcpProxy, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_runs_its_handler_once() {
    let env = env().await;
    let handler = Recorder::new("billing", Behaviour::Succeed);
    let running = start(
        &env,
        env.js.clone(),
        config("billing"),
        typed(handler.clone()),
    );
    let envelope = order_envelope("o-1");
    publish(&env.js, &envelope).await;
    // The same message again under another broker id: what a republish after the duplicate
    // window looks like. JetStream stores it; the inbox must skip it.
    publish_copy(&env.js, &envelope, "another-broker-id").await;
    wait_until(
        Duration::from_secs(10),
        "both deliveries acknowledged",
        || async { ack_state(&env.js, "billing").await == Some((2, 0)) },
    )
    .await
    .expect("acked");
    running.stop().await;
    assert_eq!(handler.calls(), 1, "the handler ran once");
    assert_eq!(
        applied(&env.pool, "billing").await,
        1,
        "its effect applied once"
    );
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM inbox_message").await,
        1
    );
}

/// Runs the recorder, then cuts the consumer's link to the broker: the transaction still
/// commits (PostgreSQL is reached directly) but the ack that follows cannot arrive.
struct CutAfterHandling {
    recorder: Recorder,
    proxy: Arc<TcpProxy>,
}

impl Handler<OrderPlaced> for CutAfterHandling {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let result = self.recorder.handle(conn, event, delivery).await;
        self.proxy.cut();
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_commit_and_ack_does_not_apply_twice() {
    let env = env().await;
    let proxy = Arc::new(TcpProxy::start(env.nats.addr()).await.expect("proxy"));
    let proxied = jetstream::new(
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(format!("nats://{}", proxy.addr()))
            .await
            .expect("connect through proxy"),
    );
    let recorder = Recorder::new("shipping", Behaviour::Succeed);
    let cutting = CutAfterHandling {
        recorder: recorder.clone(),
        proxy: proxy.clone(),
    };
    let first = start(&env, proxied, config("shipping"), typed(cutting));
    publish(&env.js, &order_envelope("o-7")).await;
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "the effect is committed",
        || async { applied(&pool, "shipping").await == 1 },
    )
    .await
    .expect("committed");
    // The consumer goes away with its ack undelivered.
    first.stop().await;
    let floor = ack_state(&env.js, "shipping")
        .await
        .expect("consumer info")
        .0;
    assert_eq!(floor, 0, "the broker never got the ack");

    let second = start(
        &env,
        env.js.clone(),
        config("shipping"),
        typed(recorder.clone()),
    );
    wait_until(
        Duration::from_secs(15),
        "the redelivery is acknowledged",
        || async {
            ack_state(&env.js, "shipping")
                .await
                .is_some_and(|(floor, _)| floor == 1)
        },
    )
    .await
    .expect("acked");
    second.stop().await;
    assert_eq!(
        applied(&env.pool, "shipping").await,
        1,
        "the effect is applied once"
    );
    assert_eq!(recorder.calls(), 1, "the handler did not run again");
}
