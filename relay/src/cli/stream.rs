//! `relay stream ensure`, and the stream settings that `relay run --ensure-stream` shares.

use std::time::Duration;

use clap::{Args, Subcommand};
use relay::publisher::jetstream::{JetStreamPublisher, StreamOutcome, StreamSpec, ensure_stream};

use super::{Dur, Global};

#[derive(Subcommand, Debug)]
pub(super) enum StreamCommand {
    /// Create the stream if missing, or verify it captures the configured subjects.
    Ensure {
        /// Dedup window (the server default is 2m).
        #[command(flatten)]
        settings: StreamSettings,
    },
}

/// How `relay stream ensure` and `relay run --ensure-stream` create the stream.
#[derive(Args, Debug, Clone, Copy)]
pub(super) struct StreamSettings {
    /// Dedup window (the server default is 2m).
    #[arg(long, env = "RELAY_DUPLICATE_WINDOW", default_value_t = Dur(DEFAULT_DUPLICATE_WINDOW))]
    duplicate_window: Dur,
    /// Replicas (3 in a cluster).
    #[arg(long, env = "RELAY_STREAM_REPLICAS", default_value_t = 1)]
    replicas: usize,
}

/// The stream's duplicate window unless configured: the server's default.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl StreamSettings {
    /// The stream to create or verify: the global `--stream` and `--stream-subjects` with
    /// these settings.
    pub(super) fn spec(&self, global: &Global) -> StreamSpec {
        StreamSpec {
            name: global.stream.clone(),
            subjects: global.stream_subjects.clone(),
            duplicate_window: self.duplicate_window.0,
            replicas: self.replicas,
        }
    }
}

/// Runs a `relay stream` subcommand.
pub(super) async fn execute(global: &Global, command: StreamCommand) -> anyhow::Result<()> {
    match command {
        StreamCommand::Ensure { settings } => ensure(global, settings).await,
    }
}

/// Creates the stream or verifies it, and says which; gives up after 30 s without an answer.
async fn ensure(global: &Global, settings: StreamSettings) -> anyhow::Result<()> {
    let client = global.nats_config(None).connect().await?;
    let publisher = JetStreamPublisher::new(client, Duration::from_secs(5), 1);
    let spec = settings.spec(global);
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        ensure_stream(publisher.context(), &spec),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "NATS at {} did not answer within 30s",
            connect::redact_url(&global.nats_url)
        )
    })??;
    match outcome {
        StreamOutcome::Created => {
            println!("created stream {} for {:?}", spec.name, spec.subjects)
        }
        StreamOutcome::Verified => {
            println!("stream {} captures {:?}", spec.name, spec.subjects)
        }
    }
    Ok(())
}
