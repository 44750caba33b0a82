//! W3C trace context (`traceparent`, `tracestate`).

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::text::validate_text;

/// A validated W3C trace context: the `traceparent` of the span that enqueued a message and
/// the optional vendor `tracestate`.
///
/// `traceparent` is `version-traceid-parentid-flags` in lower-case hex
/// (`00-<32 hex>-<16 hex>-<2 hex>`), with non-zero trace and parent ids; version `ff` is
/// refused and future versions are accepted by their first four fields, as the W3C
/// specification asks. `tracestate` is a single line of at most
/// [`TraceContext::MAX_TRACESTATE_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawTraceContext", into = "RawTraceContext")]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct RawTraceContext {
    traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

impl TryFrom<RawTraceContext> for TraceContext {
    type Error = Error;
    fn try_from(raw: RawTraceContext) -> Result<Self, Error> {
        TraceContext::new(raw.traceparent, raw.tracestate)
    }
}

impl From<TraceContext> for RawTraceContext {
    fn from(t: TraceContext) -> Self {
        RawTraceContext {
            traceparent: t.traceparent,
            tracestate: t.tracestate,
        }
    }
}

impl TraceContext {
    /// Longest `tracestate` accepted, in bytes (the W3C limit is 32 members of 256 bytes; 512
    /// is what propagators are asked to keep at least).
    pub const MAX_TRACESTATE_LEN: usize = 512;

    /// Validates a `traceparent` header value and an optional `tracestate`.
    pub fn new(traceparent: impl Into<String>, tracestate: Option<String>) -> Result<Self, Error> {
        let traceparent = traceparent.into();
        validate_traceparent(&traceparent)
            .map_err(|reason| Error::InvalidTraceContext { reason })?;
        if let Some(state) = &tracestate {
            validate_text(state, Self::MAX_TRACESTATE_LEN).map_err(|reason| {
                Error::InvalidTraceContext {
                    reason: match reason {
                        "too long" => "tracestate longer than 512 bytes",
                        _ => "tracestate is empty or not a single clean line",
                    },
                }
            })?;
        }
        Ok(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// Builds a version-00 `traceparent` from a trace id, a span id and the sampled flag.
    /// Fails only for all-zero ids, which W3C declares invalid.
    pub fn from_ids(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Result<Self, Error> {
        let traceparent = format!(
            "00-{}-{}-{}",
            hex(&trace_id),
            hex(&span_id),
            if sampled { "01" } else { "00" }
        );
        TraceContext::new(traceparent, None)
    }

    /// Returns the same context with `tracestate` set (validated).
    pub fn with_tracestate(self, tracestate: impl Into<String>) -> Result<Self, Error> {
        TraceContext::new(self.traceparent, Some(tracestate.into()))
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The 16-hex-digit id of the span that enqueued the message.
    pub fn parent_span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.traceparent[53..55], 16).is_ok_and(|flags| flags & 1 == 1)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_traceparent(s: &str) -> Result<(), &'static str> {
    const FORMAT: &str = "traceparent must be 00-<32 hex>-<16 hex>-<2 hex> in lower case";
    if s.len() < 55 || !s.is_ascii() {
        return Err(FORMAT);
    }
    let (version, trace_id, span_id, flags) = (&s[0..2], &s[3..35], &s[36..52], &s[53..55]);
    let dashes = [2, 35, 52].iter().all(|&i| s.as_bytes()[i] == b'-');
    if !dashes
        || ![version, trace_id, span_id, flags]
            .iter()
            .all(|p| is_lower_hex(p))
    {
        return Err(FORMAT);
    }
    if version == "ff" {
        return Err("traceparent version ff is invalid");
    }
    if version == "00" && s.len() != 55 {
        return Err("traceparent version 00 must be exactly 55 characters");
    }
    if s.len() > 55
        && (s.as_bytes()[55] != b'-' || s.len() > 256 || s.chars().any(char::is_control))
    {
        return Err(FORMAT);
    }
    if trace_id.bytes().all(|b| b == b'0') {
        return Err("traceparent trace id is all zeros");
    }
    if span_id.bytes().all(|b| b == b'0') {
        return Err("traceparent parent id is all zeros");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn accepts_the_w3c_example_and_exposes_parts() {
        let t = TraceContext::new(VALID, Some("congo=t61rcWkgMzE".into())).expect("valid");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_span_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.tracestate(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn from_ids_round_trips() {
        let t = TraceContext::from_ids([0xab; 16], [0x01; 8], false).expect("valid");
        assert_eq!(
            t.traceparent(),
            format!("00-{}-{}-00", "ab".repeat(16), "01".repeat(8))
        );
        assert!(!t.sampled());
        assert!(TraceContext::from_ids([0; 16], [1; 8], true).is_err());
        assert!(TraceContext::from_ids([1; 16], [0; 8], true).is_err());
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\n",
        ] {
            assert!(TraceContext::new(bad, None).is_err(), "{bad:?}");
        }
        assert!(TraceContext::new(VALID, Some("a\r\nb".into())).is_err());
        assert!(TraceContext::new(VALID, Some("a".repeat(513))).is_err());
        // A future version may append fields after a dash.
        assert!(
            TraceContext::new(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None
            )
            .is_ok()
        );
    }
}
