//! Provisioning the durable: [`Consumer::ensure`] creates it or checks an existing one.

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

use super::{Consumer, PullConsumer};
use crate::config::ConsumerConfig;
use crate::error::Error;

impl Consumer {
    /// Creates the durable JetStream consumer if missing, or checks an existing one.
    ///
    /// A consumer it creates has explicit acks, the configured subjects and `ack_wait`,
    /// unlimited deliveries (`max_deliver` -1) and no broker-side `backoff`: the broker never
    /// gives up on a message, the inbox decides when it is dead-lettered (after
    /// `max_attempts`, with the consumer's own NAK delays).
    ///
    /// An existing durable (created by an operator, another tool or an older version) is
    /// never changed: it is shared by every instance of the service and may be managed by
    /// someone else, and rewriting it at start-up would let two instances with different
    /// settings overwrite each other. It is refused with [`Error::JetStream`] if any of
    /// these differ, the reason naming each setting, the value found and the value required,
    /// and the `nats consumer edit` command that fixes it:
    /// - the ack policy (must be explicit) or the filter subjects (must be the configured
    ///   ones; fix by deleting or renaming the consumer);
    /// - `max_deliver` (must be -1, unlimited): with a limit the broker stops redelivering a
    ///   failing message, NAKs for shutdown and database failures included, possibly before
    ///   the inbox dead-letters it, and the message is then gone without a dead letter;
    /// - `backoff` (must be empty): it replaces `ack_wait` as the wait before redelivering an
    ///   unacknowledged message (the inbox retries with its own NAK delays), so the
    ///   redelivery horizon `inbox_retention` was validated against no longer holds;
    /// - `ack_wait` (must equal the configured one): a shorter one redelivers messages whose
    ///   handler is still running, a longer one delays redeliveries beyond the horizon
    ///   `inbox_retention` was validated against. Changing `ack_wait` in the configuration of
    ///   an existing consumer therefore needs the same edit at the broker.
    /// - `headers_only` (must be off): no payloads would be delivered, and every message
    ///   parked as undecodable without its bytes;
    /// - `inactive_threshold` (must be 0): the broker would delete the durable after a
    ///   quiet spell, and the one created anew starts at the stream's first message,
    ///   running handlers again for messages whose inbox rows were cleaned meanwhile.
    ///
    /// The last two cannot be edited: the reason says how to recreate the durable so that it
    /// resumes after its ack floor.
    ///
    /// [`Consumer::run`] calls this first and returns its error.
    pub async fn ensure(&self) -> Result<PullConsumer, Error> {
        let name = &self.config.name;
        let fail = |reason: String| Error::JetStream {
            consumer: name.clone(),
            reason,
        };
        let stream = self
            .jetstream
            .get_stream(&self.config.stream)
            .await
            .map_err(|source| Error::Stream {
                consumer: name.clone(),
                stream: self.config.stream.clone(),
                source,
            })?;
        let (filter_subject, filter_subjects) = match self.config.filter_subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let wanted = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject,
            filter_subjects,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: -1,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: self.max_ack_pending() as i64,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(name, wanted.clone())
            .await
            .map_err(|source| Error::CreateConsumer {
                consumer: name.clone(),
                source,
            })?;
        let info = consumer
            .info()
            .await
            .map_err(|source| Error::ConsumerInfo {
                consumer: name.clone(),
                source,
            })?;
        let have = &info.config;
        let mut have_subjects: Vec<String> = have.filter_subjects.clone();
        if !have.filter_subject.is_empty() {
            have_subjects.push(have.filter_subject.clone());
        }
        let mut want_subjects = self.config.filter_subjects.clone();
        have_subjects.sort();
        want_subjects.sort();
        if have.ack_policy != AckPolicy::Explicit || have_subjects != want_subjects {
            return Err(fail(format!(
                "exists with ack policy {:?} and subjects {have_subjects:?}; expected explicit acks and {want_subjects:?} (delete or rename the consumer)",
                have.ack_policy
            )));
        }
        if let Some(reason) =
            redelivery_mismatch(&self.config, have, info.ack_floor.stream_sequence)
        {
            return Err(fail(reason));
        }
        Ok(consumer)
    }
}

/// Why an existing durable's redelivery settings are refused (see [`Consumer::ensure`]), or
/// `None` if they are the ones the inbox requires.
fn redelivery_mismatch(
    config: &ConsumerConfig,
    have: &async_nats::jetstream::consumer::Config,
    ack_floor: u64,
) -> Option<String> {
    let mut problems = Vec::new();
    let mut flags = Vec::new();
    // The server reports an unlimited max_deliver as -1 (0 when set by an old client).
    if have.max_deliver > 0 {
        problems.push(format!(
            "max_deliver is {} but must be -1 (unlimited): the inbox dead-letters a failing message itself after max_attempts ({}), and a broker that stops redelivering first (NAKs for shutdown and database failures count too) drops the message without a dead letter",
            have.max_deliver, config.max_attempts
        ));
        flags.push("--max-deliver=-1".to_owned());
    }
    if !have.backoff.is_empty() {
        problems.push(format!(
            "backoff is {:?} but must be empty: a broker-side backoff replaces ack_wait as the wait before redelivering an unacknowledged message (and delays the immediate redelivery asked for at shutdown), so the redelivery horizon inbox_retention was validated against no longer holds",
            have.backoff
        ));
        flags.push("--backoff=none".to_owned());
    }
    if have.ack_wait != config.ack_wait {
        problems.push(format!(
            "ack_wait is {:?} but must be {:?}, the configured ack_wait: a shorter one redelivers messages whose handler is still running, a longer one delays redeliveries beyond the horizon inbox_retention was validated against",
            have.ack_wait, config.ack_wait
        ));
        flags.push(format!("--wait={:?}", config.ack_wait));
    }
    // Settings `nats consumer edit` cannot undo: the durable must be recreated.
    let mut recreate = Vec::new();
    if have.headers_only {
        recreate.push("headers_only is set: the broker would deliver no payloads, and every message would be parked as undecodable without its bytes".to_owned());
    }
    if !have.inactive_threshold.is_zero() {
        recreate.push(format!(
            "inactive_threshold is {:?} but must be 0: the broker deletes the durable after a quiet spell, and a new one starts again from the stream's first message, running handlers again for messages whose inbox rows were cleaned",
            have.inactive_threshold
        ));
    }
    if problems.is_empty() && recreate.is_empty() {
        return None;
    }
    let all: Vec<String> = problems.iter().chain(&recreate).cloned().collect();
    let mut reason = format!(
        "exists with settings that let the broker give up on, drop or redeliver messages behind the inbox's back: {}. An existing consumer is not changed; ",
        all.join("; ")
    );
    if recreate.is_empty() {
        reason.push_str(&format!(
            "fix it with `nats consumer edit {} {} {}`",
            config.stream,
            config.name,
            flags.join(" ")
        ));
    } else {
        reason.push_str(&format!(
            "recreate it where it stands: `nats consumer rm {stream} {name}`, then `nats consumer add {stream} {name} --pull --deliver {next} --ack explicit --wait {wait:?} --max-deliver=-1` with its filter subjects, so that it resumes after its ack floor (stream sequence {floor}); one created by the consumer itself would start again from the stream's first message, and run handlers again for messages older than inbox_retention",
            stream = config.stream,
            name = config.name,
            next = ack_floor + 1,
            floor = ack_floor,
            wait = config.ack_wait,
        ));
    }
    if have.ack_wait != config.ack_wait {
        reason.push_str(&format!(
            " (or configure ack_wait = {:?} if the consumer's value is the intended one)",
            have.ack_wait
        ));
    }
    Some(reason)
}
