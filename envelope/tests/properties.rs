//! Property tests for subject validation and the NATS header codec, including hostile input.

use std::str::FromStr;

use async_nats::{HeaderName, HeaderValue};
use bytes::Bytes;
use envelope::nats::{from_message, to_headers};
use envelope::{
    Envelope, EventType, HeaderText, Headers, MessageId, PartitionKey, Subject, TraceContext,
};
use proptest::prelude::*;
use time::OffsetDateTime;

/// Strings that mix ordinary text with everything that breaks headers and subjects.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9 .*>$:\r\n\t\0\u{7f}\u{85}\u{2028}é-]{0,64}",
        "[a-z.]{0,300}",
    ]
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_~:=+@-]{1,12}"
}

fn valid_subject() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 1..6).prop_map(|t| t.join("."))
}

fn single_line() -> impl Strategy<Value = String> {
    // Printable, no control characters, no surrounding whitespace.
    "[a-zA-Z0-9_./:=é€-]([a-zA-Z0-9 _./:=é€-]{0,40}[a-zA-Z0-9_./:=é€-])?"
}

fn header_name() -> impl Strategy<Value = String> {
    "x-[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,20}"
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        valid_subject(),
        (
            "[a-z][a-z0-9_-]{0,10}(\\.[a-z0-9_-]{1,10}){0,3}",
            1u32..1000,
        ),
        single_line(),
        single_line(),
        (0i64..4_000_000_000, 0u32..1_000_000_000),
        proptest::option::of(single_line()),
        any::<bool>(),
        proptest::option::of((any::<[u8; 16]>(), any::<[u8; 8]>(), any::<bool>())),
        prop::collection::btree_map(header_name(), single_line(), 0..6),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_filter_map(
            "all-zero trace ids are invalid",
            |(
                subject,
                (name, version),
                source,
                key,
                (secs, nanos),
                corr,
                causation,
                trace,
                headers,
                payload,
            )| {
                let trace = match trace {
                    Some((t, s, sampled)) => Some(TraceContext::from_ids(t, s, sampled).ok()?),
                    None => None,
                };
                Some(Envelope {
                    id: MessageId::new(),
                    subject: Subject::new(subject).ok()?,
                    event_type: EventType::new(name, version).ok()?,
                    source: HeaderText::new("source", source).ok()?,
                    partition_key: PartitionKey::new(key).ok()?,
                    occurred_at: OffsetDateTime::from_unix_timestamp(secs)
                        .ok()?
                        .replace_nanosecond(nanos)
                        .ok()?,
                    correlation_id: corr.map(|c| HeaderText::new("c", c)).transpose().ok()?,
                    causation_id: causation.then(MessageId::new),
                    trace,
                    content_type: Some(HeaderText::new("ct", "application/json").ok()?),
                    headers: Headers::try_from(headers).ok()?,
                    payload: Bytes::from(payload),
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn envelopes_round_trip_through_nats_headers(env in arb_envelope()) {
        let map = to_headers(&env).expect("a valid envelope always encodes");
        let back = from_message(env.subject.as_str(), Some(&map), env.payload.clone())
            .expect("what we encode we decode");
        prop_assert_eq!(back, env);
    }

    #[test]
    fn valid_subjects_are_accepted(s in valid_subject()) {
        prop_assert!(Subject::new(s).is_ok());
    }

    #[test]
    fn accepted_subjects_are_publishable(s in hostile()) {
        if let Ok(subject) = Subject::new(s.clone()) {
            let s = subject.as_str();
            prop_assert!(!s.is_empty() && s.len() <= Subject::MAX_LEN);
            prop_assert!(!s.starts_with('$'));
            prop_assert!(!s.contains(['*', '>', ' ', '\r', '\n', '\t', '\0']));
            prop_assert!(s.split('.').all(|t| !t.is_empty()));
        }
    }

    #[test]
    fn accepted_headers_never_make_async_nats_panic(name in hostile(), value in hostile()) {
        let mut headers = Headers::new();
        if headers.insert(name.clone(), value.clone()).is_ok() {
            // async-nats' infallible constructors panic on what its parsers refuse; anything
            // we accept must pass its parsers.
            prop_assert!(HeaderName::from_str(&name).is_ok());
            prop_assert!(HeaderValue::from_str(&value).is_ok());
            prop_assert!(!value.contains(['\r', '\n']));
        } else {
            prop_assert!(headers.is_empty(), "a refused insert must change nothing");
        }
    }

    #[test]
    fn hostile_text_never_panics(s in hostile()) {
        let _ = HeaderText::new("field", s.clone());
        let _ = PartitionKey::new(s.clone());
        let _ = TraceContext::new(s.clone(), Some(s.clone()));
        let _ = EventType::parse(&s);
        let _ = MessageId::from_str(&s);
    }

    #[test]
    fn hostile_received_headers_decode_or_fail_cleanly(
        env in arb_envelope(),
        target in prop::sample::select(vec!["ce-id", "ce-type", "ce-time", "ce-source", "ce-partitionkey",
            "ce-causationid", "traceparent", "tracestate", "ce-specversion", "x-extra"]),
        value in hostile(),
    ) {
        let mut map = to_headers(&env).expect("encodes");
        // Only values the NATS client itself accepts can arrive on the wire.
        if let Ok(v) = HeaderValue::from_str(&value) {
            map.insert(HeaderName::from_str(target).expect("constant"), v);
            match from_message(env.subject.as_str(), Some(&map), env.payload.clone()) {
                Ok(decoded) => prop_assert_eq!(decoded.payload, env.payload),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn oversized_received_headers_are_refused(n in 65usize..100) {
        let env = Envelope::from_event(HeaderText::new("s", "svc").expect("valid"), &Ping { key: "k".into() })
            .expect("valid");
        let mut map = to_headers(&env).expect("encodes");
        for i in 0..n {
            map.insert(HeaderName::from_str(&format!("x-{i}")).expect("valid"),
                HeaderValue::from_str("v").expect("valid"));
        }
        prop_assert!(from_message("ping.v1", Some(&map), Bytes::new()).is_err());
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    key: String,
}

impl envelope::Event for Ping {
    const NAME: &'static str = "ping";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.key.clone()
    }
}

#[test]
fn typed_event_round_trips_through_the_codec() {
    let source = HeaderText::new("source", "svc").expect("valid");
    let env = Envelope::from_event(source, &Ping { key: "k-1".into() }).expect("valid");
    assert_eq!(env.subject.as_str(), "ping.v1");
    let map = to_headers(&env).expect("encodes");
    let back = from_message("ping.v1", Some(&map), env.payload.clone()).expect("decodes");
    let ping: Ping = back.decode_event().expect("same type");
    assert_eq!(ping.key, "k-1");
}
