//! Shared pieces of the demo's end-to-end tests: the whole topology as processes.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use std::time::Duration;

use async_nats::jetstream;
use demo_runner::stack::{Stack, StackOptions};
use demo_services::order::PaymentSimulation;

/// The directory of the runner's binaries (`demo`, `chaos`), `target/<profile>/`, where the
/// runner looks for the service binaries and the relay.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_demo"))
        .parent()
        .expect("binary directory")
        .to_path_buf()
}

/// Builds the service binaries (`order-service`, `inventory-service`, `email-service`) and
/// the `relay` binary into [`bin_dir`], once per test process: `cargo test` builds only this
/// package's binaries, and the stack starts those of `demo-services` and `relay`. Returns the
/// `relay` binary.
pub fn relay_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args([
                "build",
                "-p",
                "demo-services",
                "-p",
                "outbox-toolkit-relay",
                "--bins",
            ]);
            if bin_dir().file_name().is_some_and(|d| d == "release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("run cargo build -p demo-services -p outbox-toolkit-relay --bins");
            assert!(
                status.success(),
                "cargo build -p demo-services -p outbox-toolkit-relay --bins failed"
            );
            bin_dir().join("relay")
        })
        .clone()
}

/// A stack in a temporary directory with free ports.
pub async fn start(
    payment: PaymentSimulation,
    smtp_url: Option<String>,
) -> (Stack, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_bin = relay_bin();
    let stack = Stack::start(StackOptions {
        dir: dir.path().to_path_buf(),
        bin_dir: bin_dir(),
        relay_bin,
        ports: None,
        payment,
        smtp_url,
        proxy_order_relay: false,
        cluster: false,
        source: demo_runner::stack::Source::Table,
        duplicate_window: std::time::Duration::from_secs(120),
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
    testkit::wait_for(
        Duration::from_secs(60),
        &format!("{consumer} to ack everything"),
        || {
            let stream = stream.clone();
            async move {
                let info = stream.consumer_info(consumer).await?;
                anyhow::Ok((info.num_pending == 0 && info.num_ack_pending == 0).then_some(()))
            }
        },
    )
    .await
    .expect("consumed");
}
