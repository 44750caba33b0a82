//! Free-form, validated message headers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, excerpt};
use crate::text::validate_text;

/// Free-form string headers of a message, validated on every insert.
///
/// Names are 1 to [`Headers::MAX_NAME_LEN`] bytes of the HTTP token set
/// (`A-Z a-z 0-9 ! # $ % & ' * + - . ^ _ ` | ~`); values follow the
/// [`HeaderText`](crate::HeaderText) rules (single line, no control characters) up to
/// [`Headers::MAX_VALUE_LEN`] bytes. Names the envelope writes itself are refused:
/// anything starting with `Nats-` or `ce-` (any case), `traceparent`, `tracestate` and
/// `Content-Type`. At most [`Headers::MAX_COUNT`] headers of at most
/// [`Headers::MAX_TOTAL_LEN`] bytes together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// Longest header name, in bytes.
    pub const MAX_NAME_LEN: usize = 64;
    /// Longest header value, in bytes.
    pub const MAX_VALUE_LEN: usize = 4096;
    /// Most free-form headers on one message.
    pub const MAX_COUNT: usize = 64;
    /// Largest sum of name and value lengths over all free-form headers, in bytes.
    pub const MAX_TOTAL_LEN: usize = 16 * 1024;

    /// No headers.
    pub fn new() -> Self {
        Headers(BTreeMap::new())
    }

    /// Validates and sets one header, replacing an earlier value of the same name.
    /// On error nothing changes.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), Error> {
        let name = name.into();
        let value = value.into();
        validate_name(&name)?;
        if value.len() > Self::MAX_VALUE_LEN {
            return Err(Error::InvalidText {
                field: format!("header {:?}", excerpt(&name)),
                reason: "value longer than 4096 bytes",
            });
        }
        validate_text(&value, Self::MAX_VALUE_LEN).map_err(|reason| Error::InvalidText {
            field: format!("header {:?}", excerpt(&name)),
            reason,
        })?;
        let replaced = self.0.get(&name).map_or(0, |old| name.len() + old.len());
        let count = self.0.len() + usize::from(replaced == 0);
        if count > Self::MAX_COUNT {
            return Err(Error::HeadersTooLarge {
                reason: format!("more than {} headers", Self::MAX_COUNT),
            });
        }
        let total = self.total_len() - replaced + name.len() + value.len();
        if total > Self::MAX_TOTAL_LEN {
            return Err(Error::HeadersTooLarge {
                reason: format!(
                    "{total} bytes of header names and values, more than {}",
                    Self::MAX_TOTAL_LEN
                ),
            });
        }
        self.0.insert(name, value);
        Ok(())
    }

    /// The value of `name`, if set (names compare exactly).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The headers in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many headers are set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no header is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum of name and value lengths, in bytes.
    pub fn total_len(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The headers as a plain map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The headers as a JSON object of strings: the form the outbox table's `headers` column
    /// and the log format store.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    }

    /// Reads what [`Headers::to_json`] writes, validating every entry as [`Headers::insert`]
    /// does; refuses anything but an object of strings.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, Error> {
        let map = value.as_object().ok_or_else(|| Error::InvalidText {
            field: "headers".to_owned(),
            reason: "stored value is not a JSON object",
        })?;
        let mut headers = Headers::new();
        for (name, value) in map {
            let value = value.as_str().ok_or_else(|| Error::InvalidText {
                field: format!("header {:?}", excerpt(name)),
                reason: "stored value is not a string",
            })?;
            headers.insert(name.clone(), value)?;
        }
        Ok(headers)
    }
}

impl TryFrom<BTreeMap<String, String>> for Headers {
    type Error = Error;

    /// Validates every entry as [`Headers::insert`] does.
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Error> {
        let mut headers = Headers::new();
        for (name, value) in map {
            headers.insert(name, value)?;
        }
        Ok(headers)
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        Headers::try_from(map).map_err(serde::de::Error::custom)
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '!' | '#'
                | '$'
                | '%'
                | '&'
                | '\''
                | '*'
                | '+'
                | '-'
                | '.'
                | '^'
                | '_'
                | '`'
                | '|'
                | '~'
        )
}

/// Whether `name` is one the envelope writes itself (compared ignoring ASCII case).
pub fn is_reserved_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-")
        || lower.starts_with("ce-")
        || lower == "traceparent"
        || lower == "tracestate"
        || lower == "content-type"
}

fn validate_name(name: &str) -> Result<(), Error> {
    let refuse = |reason| Error::InvalidHeaderName {
        name: excerpt(name),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("empty"));
    }
    if name.len() > Headers::MAX_NAME_LEN {
        return Err(refuse("longer than 64 bytes"));
    }
    if !name.chars().all(is_tchar) {
        return Err(refuse("contains a character outside the HTTP token set"));
    }
    if is_reserved_name(name) {
        return Err(Error::ReservedHeaderName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_validates_and_leaves_map_unchanged_on_error() {
        let mut h = Headers::new();
        h.insert("x-tenant", "acme").expect("valid");
        assert!(h.insert("x-bad", "a\r\nInjected: yes").is_err());
        assert!(h.insert("bad name", "v").is_err());
        assert!(h.insert("x:colon", "v").is_err());
        assert!(h.insert("", "v").is_err());
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("x-tenant"), Some("acme"));
    }

    #[test]
    fn refuses_reserved_names_in_any_case() {
        let mut h = Headers::new();
        for name in [
            "Nats-Msg-Id",
            "nats-expected-stream",
            "CE-ID",
            "ce-type",
            "traceparent",
            "Content-Type",
        ] {
            assert!(
                matches!(h.insert(name, "v"), Err(Error::ReservedHeaderName { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn enforces_count_and_total_bounds() {
        let mut h = Headers::new();
        for i in 0..Headers::MAX_COUNT {
            h.insert(format!("x-{i}"), "v").expect("within bounds");
        }
        assert!(matches!(
            h.insert("x-one-more", "v"),
            Err(Error::HeadersTooLarge { .. })
        ));
        // Replacing an existing header does not count as one more.
        h.insert("x-0", "w").expect("replace");

        let mut big = Headers::new();
        for i in 0..4 {
            big.insert(format!("x-{i}"), "v".repeat(4000))
                .expect("within bounds");
        }
        assert!(matches!(
            big.insert("x-4", "v".repeat(4000)),
            Err(Error::HeadersTooLarge { .. })
        ));
        assert_eq!(big.len(), 4);
    }
}
