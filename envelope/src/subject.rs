//! NATS subjects and versioned event types.
//!
//! Subjects reach the broker verbatim, so the rules here are stricter than NATS itself:
//! tokens separated by `.`, none empty, made of `A-Z a-z 0-9 - _ ~ : = + @`; no wildcard
//! (`*`, `>`); no leading `$` (system subjects such as `$JS.API`); at most
//! [`Subject::MAX_LEN`] bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, excerpt};

/// A validated, publishable NATS subject (no wildcards, no system prefix, bounded length).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Subject(String);

impl Subject {
    /// The longest subject accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `subject` against the rules in the [module docs](self).
    pub fn new(subject: impl Into<String>) -> Result<Self, Error> {
        let subject = subject.into();
        validate_subject(&subject).map_err(|reason| Error::InvalidSubject {
            subject: excerpt(&subject),
            reason,
        })?;
        Ok(Subject(subject))
    }

    /// `prefix.rest`, validated as a whole (the result may be too long).
    pub fn with_prefix(prefix: &Subject, rest: &Subject) -> Result<Self, Error> {
        Subject::new(format!("{}.{}", prefix.0, rest.0))
    }

    /// The subject as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Subject {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Subject::new(s)
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Subject::new(s).map_err(serde::de::Error::custom)
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~' | ':' | '=' | '+' | '@')
}

fn validate_subject(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > Subject::MAX_LEN {
        return Err("longer than 255 bytes");
    }
    if s.starts_with('$') {
        return Err("starts with '$', which is reserved for system subjects");
    }
    if s.contains(['*', '>']) {
        return Err("contains a wildcard ('*' or '>'); only concrete subjects can be published");
    }
    for token in s.split('.') {
        if token.is_empty() {
            return Err("has an empty token (a leading, trailing or doubled '.')");
        }
        if !token.chars().all(is_token_char) {
            return Err("contains a character outside A-Z a-z 0-9 - _ ~ : = + @ and '.'");
        }
    }
    Ok(())
}

/// A versioned event type such as `order.created` version 1, written `order.created.v1`.
///
/// The name is one or more `.`-separated tokens of `A-Z a-z 0-9 - _` (at most
/// [`EventType::MAX_NAME_LEN`] bytes); the version is at least 1. The full form is also the
/// default subject, so an event type always yields a valid [`Subject`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType {
    name: String,
    version: u32,
}

impl EventType {
    /// The longest type name accepted, in bytes (leaves room for `.v<version>` in a subject).
    pub const MAX_NAME_LEN: usize = 200;

    /// Validates a type name and version.
    pub fn new(name: impl Into<String>, version: u32) -> Result<Self, Error> {
        let name = name.into();
        let refuse = |reason| Error::InvalidEventType {
            event_type: excerpt(&name),
            reason,
        };
        if version == 0 {
            return Err(refuse("version must be at least 1"));
        }
        if name.is_empty() {
            return Err(refuse("empty name"));
        }
        if name.len() > Self::MAX_NAME_LEN {
            return Err(refuse("name longer than 200 bytes"));
        }
        for token in name.split('.') {
            if token.is_empty() {
                return Err(refuse("name has an empty token"));
            }
            if !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(refuse(
                    "name holds a character outside A-Z a-z 0-9 - _ and '.'",
                ));
            }
        }
        Ok(EventType { name, version })
    }

    /// Parses the full form `name.v<version>` (as carried in `ce-type`).
    pub fn parse(full: &str) -> Result<Self, Error> {
        let refuse = |reason| Error::InvalidEventType {
            event_type: excerpt(full),
            reason,
        };
        let (name, version) = full
            .rsplit_once('.')
            .ok_or_else(|| refuse("expected name.v<version>"))?;
        let digits = version
            .strip_prefix('v')
            .ok_or_else(|| refuse("expected name.v<version>"))?;
        if digits.is_empty()
            || digits.starts_with('0')
            || !digits.chars().all(|c| c.is_ascii_digit())
        {
            return Err(refuse("version must be v followed by a positive number"));
        }
        let version = digits
            .parse::<u32>()
            .map_err(|_| refuse("version out of range"))?;
        EventType::new(name, version)
    }

    /// The type name without version, e.g. `order.created`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version, at least 1.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The subject derived from this type: its full form, e.g. `order.created.v1`.
    pub fn subject(&self) -> Subject {
        // Name tokens are a subset of subject tokens and the length is bounded by
        // MAX_NAME_LEN + ".v4294967295", so this is always a valid subject.
        Subject(self.to_string())
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.v{}", self.name, self.version)
    }
}

impl FromStr for EventType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        EventType::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_subjects() {
        for s in [
            "order.created.v1",
            "a",
            "orders.0190b3c2-7a1e-7000-8000-000000000001",
        ] {
            assert_eq!(Subject::new(s).map(|s| s.to_string()), Ok(s.to_owned()));
        }
    }

    #[test]
    fn refuses_wildcards_system_and_malformed() {
        for s in [
            "",
            "orders.*",
            "orders.>",
            ">",
            "$JS.API.INFO",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a\r\nb",
            "ä",
        ] {
            assert!(Subject::new(s).is_err(), "{s:?} was accepted");
        }
        assert!(Subject::new("a".repeat(255)).is_ok());
        assert!(Subject::new("a".repeat(256)).is_err());
    }

    #[test]
    fn event_type_round_trips_and_derives_subject() {
        let t = EventType::new("order.created", 1).expect("valid");
        assert_eq!(t.to_string(), "order.created.v1");
        assert_eq!(EventType::parse("order.created.v1"), Ok(t.clone()));
        assert_eq!(t.subject().as_str(), "order.created.v1");
        let longest = EventType::new("a".repeat(200), u32::MAX).expect("valid");
        assert!(Subject::new(longest.subject().as_str()).is_ok());
    }

    #[test]
    fn event_type_refusals() {
        assert!(EventType::new("order.created", 0).is_err());
        assert!(EventType::new("order:created", 1).is_err());
        for s in [
            "order.created",
            "order.created.v0",
            "order.created.v01",
            "v1",
            "x.v",
            "x.v-1",
        ] {
            assert!(EventType::parse(s).is_err(), "{s:?} was accepted");
        }
    }
}
