//! Bounded single-line strings that are safe inside a NATS header.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A string that can travel as a NATS header value: not empty, at most
/// [`HeaderText::MAX_LEN`] bytes, no control characters (CR, LF, NUL, ...), and no leading or
/// trailing whitespace (which the NATS wire format would not preserve).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HeaderText(String);

impl HeaderText {
    /// The longest value accepted, in bytes.
    pub const MAX_LEN: usize = 4096;

    /// Validates `value`; `field` names it in the error (e.g. `"source"`).
    pub fn new(field: &str, value: impl Into<String>) -> Result<Self, Error> {
        let value = value.into();
        validate_text(&value, Self::MAX_LEN).map_err(|reason| Error::InvalidText {
            field: field.to_owned(),
            reason,
        })?;
        Ok(HeaderText(value))
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for HeaderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for HeaderText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HeaderText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HeaderText::new("text", s).map_err(serde::de::Error::custom)
    }
}

/// The unit of ordering, usually an aggregate id such as an order id.
///
/// Messages with the same key are published in commit order; messages with different keys
/// have no order between them. The same rules as [`HeaderText`] apply, with a bound of
/// [`PartitionKey::MAX_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PartitionKey(String);

impl PartitionKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates a partition key.
    pub fn new(key: impl Into<String>) -> Result<Self, Error> {
        let key = key.into();
        validate_text(&key, Self::MAX_LEN).map_err(|reason| Error::InvalidText {
            field: "partition key".to_owned(),
            reason,
        })?;
        Ok(PartitionKey(key))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PartitionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PartitionKey::new(s).map_err(serde::de::Error::custom)
    }
}

/// The single-line rule shared by header values and the typed texts above.
pub(crate) fn validate_text(value: &str, max_len: usize) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > max_len {
        return Err("too long");
    }
    if value.chars().any(char::is_control) {
        return Err("contains a control character (CR, LF, NUL, tab ...)");
    }
    if value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace) {
        return Err("has leading or trailing whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_line_breaks_and_bounds() {
        assert!(HeaderText::new("source", "order-service").is_ok());
        for bad in ["", "a\r\nb", "a\nb", "a\0b", " a", "a ", "a\tb"] {
            assert!(HeaderText::new("source", bad).is_err(), "{bad:?}");
        }
        assert!(PartitionKey::new("k".repeat(256)).is_ok());
        assert!(PartitionKey::new("k".repeat(257)).is_err());
        assert!(PartitionKey::new("ключ-1").is_ok());
    }
}
