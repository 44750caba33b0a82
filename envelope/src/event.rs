//! Typed events: a Rust type tied to its event type, version and subject.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::subject::{EventType, Subject};

/// A Rust type that is an event of one versioned type.
///
/// Implementing it lets producers write `outbox.enqueue(&mut tx, &OrderCreated { .. })` and
/// consumers register a handler for `OrderCreated` without strings at call sites. The payload
/// is the type's JSON form.
///
/// ```
/// use envelope::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderCreated { order_id: String, total_cents: i64 }
///
/// impl Event for OrderCreated {
///     const NAME: &'static str = "order.created";
///     const VERSION: u32 = 1;
///     fn partition_key(&self) -> String { self.order_id.clone() }
/// }
///
/// let event = OrderCreated { order_id: "o-1".into(), total_cents: 999 };
/// assert_eq!(event.subject().unwrap().as_str(), "order.created.v1");
/// ```
pub trait Event: Serialize + DeserializeOwned {
    /// The type name without version, e.g. `order.created` (see [`EventType`] for the rules).
    const NAME: &'static str;
    /// The schema version, at least 1. A breaking change to the type is a new version.
    const VERSION: u32;

    /// The unit of ordering for this event, usually the aggregate id.
    fn partition_key(&self) -> String;

    /// The validated event type; fails only if `NAME` or `VERSION` break the rules.
    fn event_type() -> Result<EventType, Error> {
        EventType::new(Self::NAME, Self::VERSION)
    }

    /// The subject to publish on. Defaults to the full type, e.g. `order.created.v1`;
    /// override it to put data in the subject (it is validated at enqueue either way).
    fn subject(&self) -> Result<Subject, Error> {
        Ok(Self::event_type()?.subject())
    }
}
