//! The maintenance services' pool connection, closed unless its last step succeeded.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

use crate::consumer::Consumer;

/// A pool connection that is closed when dropped, instead of going back to the pool, unless
/// [`released`](ClosedUnlessReleased::release): after a step that failed, timed out or was
/// cancelled the connection may be silent, and the pool's ping on its return would wait for
/// it with no deadline, holding the pool slot.
pub(super) struct ClosedUnlessReleased(Option<PoolConnection<Postgres>>);

impl ClosedUnlessReleased {
    pub(super) async fn acquire(consumer: &Consumer) -> Result<Self, sqlx::Error> {
        Ok(ClosedUnlessReleased(Some(
            consumer.db(consumer.pool.acquire()).await?,
        )))
    }

    /// Returns the connection to the pool: its last step succeeded.
    pub(super) fn release(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for ClosedUnlessReleased {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for ClosedUnlessReleased {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for ClosedUnlessReleased {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take() {
            conn.close_on_drop();
        }
    }
}
