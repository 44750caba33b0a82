//! Message identity.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, excerpt};

/// The identity of one message: a UUIDv7, minted at enqueue.
///
/// It is the `Nats-Msg-Id` the broker deduplicates on and the key of the consumer's inbox.
/// UUIDv7 ids sort roughly by creation time, but they are minted before commit, so they do
/// **not** give commit order: the outbox orders rows by a database sequence instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh UUIDv7 id.
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// Wraps an existing UUID (for example one read back from the outbox table).
    pub const fn from_uuid(uuid: Uuid) -> Self {
        MessageId(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hyphenated lower case: the form written to `Nats-Msg-Id` and `ce-id`.
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for MessageId {
    type Err = Error;

    /// Parses any UUID form that `uuid` accepts; refuses the nil UUID.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uuid = Uuid::parse_str(s).map_err(|_| Error::InvalidMessageId {
            id: excerpt(s),
            reason: "not a UUID",
        })?;
        if uuid.is_nil() {
            return Err(Error::InvalidMessageId {
                id: excerpt(s),
                reason: "the nil UUID is not a message id",
            });
        }
        Ok(MessageId(uuid))
    }
}

impl From<MessageId> for Uuid {
    fn from(id: MessageId) -> Uuid {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_v7_and_distinct() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_ne!(a, b);
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn display_parses_back() {
        let id = MessageId::new();
        assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
    }

    #[test]
    fn refuses_garbage_and_nil() {
        assert!("not-a-uuid".parse::<MessageId>().is_err());
        assert!(
            "00000000-0000-0000-0000-000000000000"
                .parse::<MessageId>()
                .is_err()
        );
    }
}
