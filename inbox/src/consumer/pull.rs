//! The reader: pulls messages from the durable and routes each to a lane by partition key.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::lane::Queued;
use super::supervised::Supervised;
use super::{Consumer, PullConsumer};
use crate::config::{ConsumerConfig, Mode};

/// Pulls messages from `durable` and hands each to its lane's channel in `senders`, until
/// `shutdown` completes (`None`) or a task of `lanes` or `background` ends or a lane stops
/// taking messages (`Some` with why). A failed pull request is retried every second.
pub(super) async fn read_until_stopped(
    this: &Consumer,
    durable: &PullConsumer,
    senders: &[mpsc::Sender<Queued>],
    lanes: &mut Supervised,
    background: &mut Supervised,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<String> {
    // Capped by the durable's own limit, which the broker enforces on each pull.
    let pull_size = match usize::try_from(durable.cached_info().config.max_batch) {
        Ok(limit) if limit > 0 => pull_size(&this.config).min(limit),
        _ => pull_size(&this.config),
    };
    'outer: loop {
        let mut messages = match durable
            .stream()
            .max_messages_per_batch(pull_size)
            .messages()
            .await
        {
            Ok(messages) => {
                this.health.set_pulling(true);
                messages
            }
            Err(e) => {
                this.health.set_pulling(false);
                tracing::warn!(consumer = %this.config.name, error = %e, "cannot pull messages; retrying");
                tokio::select! {
                    _ = &mut shutdown => {
                        return None;
                    }
                    Some(ended) = lanes.next() => {
                        return Some(ended.before_shutdown());
                    }
                    Some(ended) = background.next() => {
                        return Some(ended.before_shutdown());
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                }
            }
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    return None;
                }
                Some(ended) = lanes.next() => {
                    return Some(ended.before_shutdown());
                }
                Some(ended) = background.next() => {
                    return Some(ended.before_shutdown());
                }
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        let lane = lane_of(&message, senders.len());
                        let queued = Queued { message, touched: Instant::now() };
                        if senders[lane].send(queued).await.is_err() {
                            // The lane is gone; joining it below says why. The message
                            // is not acked and will be redelivered.
                            return Some(format!("lane {lane} stopped taking messages"));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %this.config.name, error = %e, "pull failed; continuing");
                    }
                    None => continue 'outer,
                }
            }
        }
    }
}

/// Messages asked for per pull request: at least 128, since a pull is a round trip to the
/// server and small ones (strict mode has batches of one) left lanes waiting for messages.
fn pull_size(config: &ConsumerConfig) -> usize {
    let batch = match config.mode {
        Mode::Strict => 1,
        Mode::Batched { max_messages } => max_messages,
    };
    (config.concurrency * batch * 2).max(128)
}

fn lane_of(message: &jetstream::Message, lanes: usize) -> usize {
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get(envelope::nats::CE_PARTITIONKEY))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| message.subject.to_string());
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}
