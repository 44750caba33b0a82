//! nats-server processes started by the kit: JetStream survives kill/restart, pause stalls.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use testkit::{NatsServer, NatsServerConfig, wait_until};
use tokio::time::timeout;

async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(url)
        .await
        .expect("connect to nats-server")
}

fn stream_config(name: &str, subject: &str) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_killed_server_restarts_with_its_jetstream_streams() {
    let mut nats = NatsServer::start().await.expect("start nats-server");
    let js = jetstream::new(client(nats.url()).await);
    let mut orders = js
        .create_stream(stream_config("ORDERS", "orders.>"))
        .await
        .expect("create ORDERS");
    for i in 0..5 {
        js.publish(format!("orders.{i}"), "order".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    assert_eq!(orders.info().await.expect("stream info").state.messages, 5);

    nats.kill().expect("kill");
    tokio::net::TcpStream::connect(nats.addr())
        .await
        .expect_err("a killed server is gone");
    assert!(
        nats.store_dir()
            .expect("managed")
            .join("jetstream")
            .is_dir()
    );

    nats.restart().await.expect("restart");
    wait_until(
        Duration::from_secs(20),
        "ORDERS to report 5 messages after restart",
        || {
            let js = js.clone();
            async move {
                match js.get_stream("ORDERS").await {
                    Ok(mut stream) => stream
                        .info()
                        .await
                        .is_ok_and(|info| info.state.messages == 5),
                    Err(_) => false,
                }
            }
        },
    )
    .await
    .expect("stream intact after restart");
}

#[tokio::test]
async fn a_publish_to_a_paused_server_is_acked_only_after_resume() {
    let nats = NatsServer::start().await.expect("start nats-server");
    let js = jetstream::new(client(nats.url()).await);
    js.create_stream(stream_config("EVENTS", "events.>"))
        .await
        .expect("create EVENTS");
    js.publish("events.0", "before".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    nats.pause().expect("pause");
    let paused_js = js.clone();
    let mut publish =
        tokio::spawn(async move { paused_js.publish("events.1", "paused".into()).await?.await });
    assert!(
        timeout(Duration::from_millis(500), &mut publish)
            .await
            .is_err(),
        "a paused server acknowledged a publish"
    );

    nats.resume().expect("resume");
    let ack = timeout(Duration::from_secs(10), publish)
        .await
        .expect("ack after resume")
        .expect("publish task")
        .expect("publish");
    assert_eq!(ack.stream, "EVENTS");
    assert_eq!(ack.sequence, 2);
}

#[tokio::test]
async fn config_sets_max_payload() {
    let config = NatsServerConfig {
        max_payload: Some(4096),
        ..NatsServerConfig::default()
    };
    let nats = NatsServer::start_with(config)
        .await
        .expect("start nats-server");
    let client = client(nats.url()).await;
    assert_eq!(client.server_info().max_payload, 4096);
}
