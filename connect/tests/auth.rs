//! Auth options against a real nats-server that requires them.

use std::time::Duration;

use connect::NatsConfig;
use testkit::{NatsServer, wait_until};

async fn server(args: &[&str]) -> NatsServer {
    NatsServer::start_with(testkit::NatsServerConfig {
        extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
    })
    .await
    .expect("nats-server with auth")
}

/// A publish that comes back to our own subscription within 2 s (a client that is not
/// authenticated buffers and never delivers).
async fn round_trip(client: &async_nats::Client) -> bool {
    let attempt = async {
        let Ok(mut sub) = client.subscribe("auth.check").await else {
            return false;
        };
        if client.publish("auth.check", "ping".into()).await.is_err()
            || client.flush().await.is_err()
        {
            return false;
        }
        futures_next(&mut sub).await.is_some()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(true)
    )
}

async fn futures_next(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    use futures::StreamExt;
    sub.next().await
}

#[tokio::test]
async fn user_and_password_and_token_auth_work_and_wrong_secrets_do_not() {
    let nats = server(&["--user", "relay", "--pass", "s3cret"]).await;
    let good = NatsConfig {
        url: nats.url().to_owned(),
        user: Some("relay".into()),
        password: Some("s3cret".into()),
        ..NatsConfig::default()
    };
    let client = good.connect().await.expect("connect");
    wait_until(Duration::from_secs(10), "authenticated round trip", || {
        round_trip(&client)
    })
    .await
    .expect("user/password accepted");
    let bad = NatsConfig {
        password: Some("wrong".into()),
        ..good.clone()
    };
    let refused = bad
        .connect()
        .await
        .expect("the client starts and keeps retrying");
    assert!(
        !round_trip(&refused).await,
        "a wrong password never gets through"
    );

    let nats = server(&["--auth", "t0ken"]).await;
    let token = NatsConfig {
        url: nats.url().to_owned(),
        token: Some("t0ken".into()),
        ..NatsConfig::default()
    };
    let client = token.connect().await.expect("connect");
    wait_until(Duration::from_secs(10), "token round trip", || {
        round_trip(&client)
    })
    .await
    .expect("token accepted");
}

#[tokio::test]
async fn an_unreadable_creds_file_is_a_clear_error() {
    let config = NatsConfig {
        url: "nats://127.0.0.1:1".into(),
        creds_file: Some("/nonexistent/relay.creds".into()),
        ..NatsConfig::default()
    };
    let err = config.connect().await.expect_err("refused");
    assert!(
        err.to_string()
            .contains("reading creds file /nonexistent/relay.creds"),
        "{err}"
    );
}

#[tokio::test]
async fn connect_errors_show_the_url_without_its_secrets() {
    let port = testkit::free_port().expect("port");
    for (url, shown) in [
        (
            format!("nats://relay:hunter2@127.0.0.1:{port}"),
            format!("nats://relay:***@127.0.0.1:{port}"),
        ),
        (
            format!("nats://hunter2@127.0.0.1:{port}"),
            format!("nats://***@127.0.0.1:{port}"),
        ),
    ] {
        // A closed port alone is no error (the client keeps retrying in the background); an
        // unreadable creds file is, and its message names the URL.
        let config = NatsConfig {
            url,
            creds_file: Some("/nonexistent/relay.creds".into()),
            ..NatsConfig::default()
        };
        let err = config.connect().await.expect_err("refused");
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains("hunter2"), "the password leaks: {text}");
            assert!(text.contains(&shown), "{text} lacks {shown}");
        }
    }
}
