//! Shared pieces of the demo's end-to-end tests: the whole topology as processes.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use std::time::Duration;

use async_nats::jetstream;
use demo_services::order::PaymentSimulation;
use demo_services::stack::{Stack, StackOptions, wait_for};

/// The directory of this package's binaries (order-service, ..., demo).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_order-service"))
        .parent()
        .expect("binary directory")
        .to_path_buf()
}

/// The `relay` binary next to ours, built first if this test run did not build it (as when
/// running `cargo test -p demo-services` alone).
pub fn relay_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let relay = bin_dir().join("relay");
            if !relay.exists() {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let status = Command::new(cargo)
                    .args(["build", "-p", "relay", "--bin", "relay"])
                    .status()
                    .expect("run cargo build -p relay");
                assert!(status.success(), "cargo build -p relay failed");
            }
            relay
        })
        .clone()
}

/// A stack in a temporary directory with free ports.
pub async fn start(
    payment: PaymentSimulation,
    smtp_url: Option<String>,
) -> (Stack, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = Stack::start(StackOptions {
        dir: dir.path().to_path_buf(),
        bin_dir: bin_dir(),
        relay_bin: relay_bin(),
        ports: None,
        payment,
        smtp_url,
        proxy_order_relay: false,
        cluster: false,
    })
    .await
    .expect("start the demo stack");
    (stack, dir)
}

/// Every payment succeeds.
pub fn always_pay() -> PaymentSimulation {
    PaymentSimulation {
        success_rate: 1.0,
        seed: 1,
    }
}

/// A JetStream context on the stack's broker.
pub async fn jetstream(stack: &Stack) -> jetstream::Context {
    jetstream::new(
        async_nats::connect(stack.nats.url())
            .await
            .expect("connect"),
    )
}

/// Waits until `consumer` has been handed and has acknowledged everything in the saga's
/// stream (call it after the publishes it must see were acknowledged).
pub async fn wait_consumed(js: &jetstream::Context, consumer: &str) {
    let stream = js
        .get_stream(demo_services::events::STREAM)
        .await
        .expect("stream");
    wait_for(
        Duration::from_secs(60),
        &format!("{consumer} to ack everything"),
        || {
            let stream = stream.clone();
            async move {
                let info = stream.consumer_info(consumer).await?;
                Ok(info.num_pending == 0 && info.num_ack_pending == 0)
            }
        },
    )
    .await
    .expect("consumed");
}
