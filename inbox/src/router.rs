//! [`Router`]: one consumer, several event types, each with its own typed handler.

use std::collections::HashMap;
use std::sync::Arc;

use envelope::{Event, EventType};
use sqlx::PgConnection;

use crate::handler::{Delivery, Handler, HandlerError, HandlerFuture, RawHandler, typed};

/// A [`RawHandler`] that dispatches each delivery by its event type (`ce-type`, e.g.
/// `order.created.v1`) to the typed handler registered for it.
///
/// A delivery whose type has no route is a permanent failure with reason `unrouted`: it is
/// dead-lettered with its bytes rather than acknowledged and forgotten, so a producer that
/// starts sending a new version is noticed (add a route, then `dlq retry`). Registering the
/// same type twice keeps the last handler.
///
/// ```
/// # use inbox::{Delivery, Handler, HandlerError, Router};
/// # use outbox::Event;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { id: String }
/// # impl Event for OrderCreated { const NAME: &'static str = "order.created"; const VERSION: u32 = 1;
/// #     fn partition_key(&self) -> String { self.id.clone() } }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCancelled { id: String }
/// # impl Event for OrderCancelled { const NAME: &'static str = "order.cancelled"; const VERSION: u32 = 1;
/// #     fn partition_key(&self) -> String { self.id.clone() } }
/// # struct Reserve; struct Release;
/// # impl Handler<OrderCreated> for Reserve { async fn handle(&self, _: &mut sqlx::PgConnection, _: OrderCreated, _: &Delivery) -> Result<(), HandlerError> { Ok(()) } }
/// # impl Handler<OrderCancelled> for Release { async fn handle(&self, _: &mut sqlx::PgConnection, _: OrderCancelled, _: &Delivery) -> Result<(), HandlerError> { Ok(()) } }
/// let router = Router::new()
///     .route::<OrderCreated, _>(Reserve)
///     .route::<OrderCancelled, _>(Release);
/// assert_eq!(router.event_types().count(), 2);
/// // Consumer::new(config, pool, jetstream, router.into_handler())
/// ```
#[derive(Default, Clone)]
pub struct Router {
    routes: HashMap<EventType, Arc<dyn RawHandler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("event_types", &self.event_types().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// A router without routes.
    pub fn new() -> Self {
        Router::default()
    }

    /// Routes deliveries of `E`'s event type to `handler` (decoded as with [`typed`]).
    ///
    /// # Panics
    /// If `E::NAME` / `E::VERSION` are not a valid event type: a programming error in the
    /// `Event` impl, found on the first start.
    pub fn route<E, H>(mut self, handler: H) -> Self
    where
        E: Event + Send + 'static,
        H: Handler<E>,
    {
        let event_type = match E::event_type() {
            Ok(t) => t,
            Err(e) => panic!("invalid Event impl {}: {e}", std::any::type_name::<E>()),
        };
        self.routes.insert(event_type, typed(handler));
        self
    }

    /// Routes deliveries of `event_type` to a raw handler.
    pub fn route_raw(mut self, event_type: EventType, handler: Arc<dyn RawHandler>) -> Self {
        self.routes.insert(event_type, handler);
        self
    }

    /// The event types with a route, in no particular order.
    pub fn event_types(&self) -> impl Iterator<Item = &EventType> {
        self.routes.keys()
    }

    /// The subjects of the routed types (`name.vN`), sorted: a ready-made
    /// `ConsumerConfig::filter_subjects` for events on their default subjects.
    pub fn subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> = self
            .routes
            .keys()
            .map(|t| t.subject().as_str().to_owned())
            .collect();
        subjects.sort();
        subjects
    }

    /// This router as the handler a [`crate::Consumer`] takes.
    pub fn into_handler(self) -> Arc<dyn RawHandler> {
        Arc::new(self)
    }
}

impl RawHandler for Router {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        match self.routes.get(&delivery.envelope.event_type) {
            Some(handler) => handler.handle(conn, delivery),
            None => {
                let event_type = delivery.envelope.event_type.to_string();
                Box::pin(async move {
                    Err(HandlerError::permanent_because(
                        dlq::reason::UNROUTED,
                        format!("no handler for event type {event_type}"),
                    ))
                })
            }
        }
    }
}
