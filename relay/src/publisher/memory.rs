//! An in-memory publisher with JetStream's dedup semantics, for narrow unit tests of relay
//! logic. Integration tests use the real broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use envelope::Envelope;
use futures::FutureExt;

use super::{Ack, AckFuture, PublishError, PublishErrorKind, Publisher};

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Stream sequence, from 1.
    pub sequence: u64,
    /// The envelope as published.
    pub envelope: Envelope,
}

#[derive(Debug, Default)]
struct Inner {
    stored: Vec<Stored>,
    ids: HashSet<envelope::MessageId>,
}

/// Stores messages whose subject starts with one of its prefixes, deduplicating by id
/// forever (an infinite duplicate window); refuses other subjects with `NoStream` and
/// everything with `Unavailable` while [`MemoryPublisher::set_down`] is on.
#[derive(Debug, Clone)]
pub struct MemoryPublisher {
    stream: String,
    prefixes: Vec<String>,
    inner: Arc<Mutex<Inner>>,
    down: Arc<AtomicBool>,
}

impl MemoryPublisher {
    /// A publisher whose stream `stream` captures subjects starting with any of `prefixes`.
    pub fn new(stream: &str, prefixes: &[&str]) -> Self {
        MemoryPublisher {
            stream: stream.to_owned(),
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            inner: Arc::default(),
            down: Arc::default(),
        }
    }

    /// Makes every publish fail as if the broker were unreachable.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Everything stored, in sequence order.
    pub fn stored(&self) -> Vec<Stored> {
        self.inner
            .lock()
            .map(|i| i.stored.clone())
            .unwrap_or_default()
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, envelope: &Envelope) -> Result<AckFuture, PublishError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PublishError::new(
                PublishErrorKind::Unavailable,
                "memory broker is down",
            ));
        }
        if !self
            .prefixes
            .iter()
            .any(|p| envelope.subject.as_str().starts_with(p.as_str()))
        {
            let error = PublishError::new(PublishErrorKind::NoStream, "no stream for subject");
            return Ok(async move { Err(error) }.boxed());
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| PublishError::new(PublishErrorKind::Unavailable, "poisoned"))?;
        let duplicate = !inner.ids.insert(envelope.id);
        let sequence = if duplicate {
            inner
                .stored
                .iter()
                .find(|s| s.envelope.id == envelope.id)
                .map_or(0, |s| s.sequence)
        } else {
            let sequence = inner.stored.len() as u64 + 1;
            inner.stored.push(Stored {
                sequence,
                envelope: envelope.clone(),
            });
            sequence
        };
        let ack = Ack {
            stream: self.stream.clone(),
            sequence,
            duplicate,
        };
        Ok(async move { Ok(ack) }.boxed())
    }

    fn is_connected(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }
}
