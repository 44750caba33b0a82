//! One conformance suite for the `Publisher` seam, run against every implementation.

mod common;

use envelope::{Envelope, HeaderText, MessageId};
use relay::publisher::memory::MemoryPublisher;
use relay::publisher::{PublishErrorKind, Publisher};

fn envelope(subject: &str) -> Envelope {
    let mut env = Envelope::from_event(
        HeaderText::new("source", "conformance").expect("valid"),
        &Ping { n: 1 },
    )
    .expect("valid");
    env.subject = envelope::Subject::new(subject).expect("valid subject");
    env
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    n: u32,
}

impl envelope::Event for Ping {
    const NAME: &'static str = "test.ping";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        "k".into()
    }
}

/// The contract of `Publisher`, as the relay relies on it.
async fn conformance<P: Publisher>(publisher: &P) {
    // A publisher may connect in the background: it must report it once connected.
    testkit::wait_until(
        std::time::Duration::from_secs(10),
        "publisher connected",
        || async { publisher.is_connected() },
    )
    .await
    .expect("connected");
    let first = envelope("test.ping.v1");
    let ack = publisher
        .publish(&first)
        .await
        .expect("sent")
        .await
        .expect("acked");
    assert!(!ack.duplicate, "a new id is stored");
    assert!(ack.sequence > 0);

    // The same id again is a duplicate, acknowledged with the original sequence.
    let again = publisher
        .publish(&first)
        .await
        .expect("sent")
        .await
        .expect("acked");
    assert!(again.duplicate, "the same id is deduplicated");
    assert_eq!(again.sequence, ack.sequence);

    let second = Envelope {
        id: MessageId::new(),
        ..first.clone()
    };
    let next = publisher
        .publish(&second)
        .await
        .expect("sent")
        .await
        .expect("acked");
    assert_eq!(
        next.sequence,
        ack.sequence + 1,
        "a new id gets the next sequence"
    );

    // A subject no stream captures is a permanent NoStream error, never a panic or a hang.
    let stray = envelope("stray.subject");
    let error = match publisher.publish(&stray).await {
        Err(e) => e,
        Ok(pending) => pending.await.expect_err("no stream"),
    };
    assert_eq!(error.kind, PublishErrorKind::NoStream, "{error}");
    assert!(error.kind.is_permanent());
}

#[tokio::test]
async fn memory_publisher_conforms() {
    let memory = MemoryPublisher::new("OUTBOX", &["test."]);
    conformance(&memory).await;
    assert_eq!(memory.stored().len(), 2, "the duplicate was stored once");
    memory.set_down(true);
    let down = memory
        .publish(&envelope("test.ping.v1"))
        .await
        .err()
        .expect("down");
    assert_eq!(down.kind, PublishErrorKind::Unavailable);
    assert!(!memory.is_connected());
}

#[tokio::test]
async fn jetstream_publisher_conforms() {
    let env = common::env().await;
    let config = relay::RelayConfig::default();
    let publisher = env.publisher(&config).await;
    conformance(&publisher).await;
    assert_eq!(
        common::stream_count(&env.nats_client().await).await,
        2,
        "the duplicate was stored once"
    );
}
