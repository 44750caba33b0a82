//! What the console reads from JetStream: every stream's settings and every durable
//! consumer's progress, within a deadline (a broker that does not answer makes a page say
//! so, not hang).

use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt as _;
use time::OffsetDateTime;

/// One stream, as the console shows it.
#[derive(Debug, Clone)]
pub(crate) struct StreamView {
    pub(crate) name: String,
    pub(crate) subjects: Vec<String>,
    pub(crate) messages: u64,
    pub(crate) duplicate_window: Duration,
    /// Zero: kept until other limits remove them.
    pub(crate) max_age: Duration,
}

/// One durable consumer.
#[derive(Debug, Clone)]
pub(crate) struct DurableView {
    pub(crate) stream: String,
    pub(crate) name: String,
    /// Messages not yet delivered.
    pub(crate) pending: u64,
    /// Delivered, not yet acknowledged.
    pub(crate) ack_pending: usize,
    /// Delivered more than once, not yet acknowledged.
    pub(crate) redelivered: usize,
    /// Every message up to this stream sequence is acknowledged.
    pub(crate) ack_floor: u64,
    pub(crate) max_deliver: i64,
    pub(crate) ack_wait: Duration,
    /// When the oldest message the broker may still deliver to it (the first after the ack
    /// floor) was stored; `None` when it is fully acknowledged or that message could not be
    /// read (`horizon_unknown`). With a filter subject, the first message after the floor
    /// may be another subject's, so this can be older than the oldest it may really get.
    pub(crate) horizon: Option<OffsetDateTime>,
    /// Behind, but the message after its ack floor could not be read (deleted from the
    /// middle of the stream, or the broker refused).
    pub(crate) horizon_unknown: bool,
}

/// Everything the broker shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerView {
    pub(crate) streams: Vec<StreamView>,
    pub(crate) durables: Vec<DurableView>,
}

impl BrokerView {
    /// The smallest duplicate window of the streams an outbox may publish to (not the
    /// key-value and object store buckets'): an unpublished row older than it is no longer
    /// deduplicated when it is published at last.
    pub(crate) fn duplicate_window(&self) -> Option<Duration> {
        self.streams
            .iter()
            .filter(|s| !s.name.starts_with("KV_") && !s.name.starts_with("OBJ_"))
            .map(|s| s.duplicate_window)
            .min()
    }

    /// The duplicate window of the stream that stores `subject`; the smallest of all
    /// ([`BrokerView::duplicate_window`]) when none does or no subject is given.
    pub(crate) fn duplicate_window_for(&self, subject: Option<&str>) -> Option<Duration> {
        subject
            .and_then(|subject| {
                self.streams
                    .iter()
                    .find(|s| s.subjects.iter().any(|f| subject_matches(f, subject)))
            })
            .map(|s| s.duplicate_window)
            .or_else(|| self.duplicate_window())
    }
}

/// Whether NATS subject filter `filter` (`*` one token, `>` the rest) matches `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in filter.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// What [`read`] looks up beyond the listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Horizons {
    /// Each durable's redelivery horizon: one message read per durable that is behind.
    Read,
    /// None (the overview, which shows counts only).
    Skip,
}

/// Reads every stream and durable within `deadline`.
pub(crate) async fn read(
    client: &async_nats::Client,
    deadline: Duration,
    horizons: Horizons,
) -> Result<BrokerView, String> {
    match tokio::time::timeout(deadline, read_all(client, horizons)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the broker did not answer within {deadline:?} (state: {})",
            client.connection_state()
        )),
    }
}

async fn read_all(client: &async_nats::Client, horizons: Horizons) -> Result<BrokerView, String> {
    let js = jetstream::new(client.clone());
    let infos: Vec<jetstream::stream::Info> = js
        .streams()
        .try_collect()
        .await
        .map_err(|e| format!("listing streams: {e}"))?;
    let mut view = BrokerView::default();
    for info in infos {
        let stream = js
            .get_stream_no_info(&info.config.name)
            .await
            .map_err(|e| format!("stream {}: {e}", info.config.name))?;
        let consumers: Vec<jetstream::consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| format!("consumers of {}: {e}", info.config.name))?;
        for c in consumers {
            if c.config.durable_name.is_none() {
                continue;
            }
            let next = c.ack_floor.stream_sequence + 1;
            let behind = c.num_pending > 0 || c.num_ack_pending > 0;
            let horizon =
                if horizons == Horizons::Read && behind && next <= info.state.last_sequence {
                    // The first message after the floor may have been removed (limits, purge):
                    // then the stream's first message is the oldest that can come.
                    let seq = next.max(info.state.first_sequence);
                    Some(stream.get_raw_message(seq).await.ok().map(|m| m.time))
                } else {
                    None
                };
            let horizon_unknown = matches!(horizon, Some(None));
            let horizon = horizon.flatten();
            view.durables.push(DurableView {
                stream: info.config.name.clone(),
                name: c.name.clone(),
                pending: c.num_pending,
                ack_pending: c.num_ack_pending,
                redelivered: c.num_redelivered,
                ack_floor: c.ack_floor.stream_sequence,
                max_deliver: c.config.max_deliver,
                ack_wait: c.config.ack_wait,
                horizon,
                horizon_unknown,
            });
        }
        view.streams.push(StreamView {
            name: info.config.name.clone(),
            subjects: info.config.subjects.clone(),
            messages: info.state.messages,
            duplicate_window: info.config.duplicate_window,
            max_age: info.config.max_age,
        });
    }
    view.streams.sort_by(|a, b| a.name.cmp(&b.name));
    view.durables
        .sort_by(|a, b| (&a.stream, &a.name).cmp(&(&b.stream, &b.name)));
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, window: u64) -> StreamView {
        StreamView {
            name: name.to_owned(),
            subjects: Vec::new(),
            messages: 0,
            duplicate_window: Duration::from_secs(window),
            max_age: Duration::ZERO,
        }
    }

    #[test]
    fn the_duplicate_window_is_the_smallest_of_the_message_streams() {
        let view = BrokerView {
            streams: vec![
                stream("ORDERS", 120),
                stream("KV_locks", 5),
                stream("EMAIL", 30),
            ],
            durables: Vec::new(),
        };
        assert_eq!(view.duplicate_window(), Some(Duration::from_secs(30)));
        assert_eq!(BrokerView::default().duplicate_window(), None);
    }

    #[test]
    fn a_subject_takes_its_own_streams_window() {
        let mut orders = stream("ORDERS", 120);
        orders.subjects = vec!["orders.>".to_owned()];
        let mut email = stream("EMAIL", 30);
        email.subjects = vec!["email.*.sent".to_owned()];
        let view = BrokerView {
            streams: vec![orders, email],
            durables: Vec::new(),
        };
        let window = |s| view.duplicate_window_for(Some(s)).map(|d| d.as_secs());
        assert_eq!(window("orders.created"), Some(120));
        assert_eq!(window("email.o-1.sent"), Some(30));
        assert_eq!(
            window("email.o-1.sent.late"),
            Some(30),
            "no stream: the smallest"
        );
        assert_eq!(
            view.duplicate_window_for(None).map(|d| d.as_secs()),
            Some(30)
        );
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a", "a"));
    }
}
