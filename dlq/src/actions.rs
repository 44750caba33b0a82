//! Retry and purge, as every front end does them (the `dlq` CLI, the operator console): the
//! same checks, one transaction each.
//!
//! A retry takes the `dead` letters of a filter: a consumer's are marked `retry_requested`
//! (its own runtime re-runs them once), a relay's go back to the outbox with their original
//! id. Either all of them change or none does.

use sqlx::{Connection, PgConnection};

use crate::store::{self, Filter, Stored};
use crate::{RetryError, retry_to_outbox};

/// What a retry did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retried {
    /// Consumer dead letters marked `retry_requested`.
    pub by_consumers: usize,
    /// Relay dead letters sent back to the outbox.
    pub to_outbox: usize,
}

impl Retried {
    /// Every dead letter retried.
    pub fn total(&self) -> usize {
        self.by_consumers + self.to_outbox
    }
}

/// Why a retry changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// An id named explicitly does not exist.
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    /// An id named explicitly is not `dead` (already retried, or a retry is pending).
    #[error("dead letter {id} is {status}, not dead: nothing to retry")]
    NotDead {
        /// The dead letter.
        id: i64,
        /// Its status.
        status: String,
    },
    /// The filter matches no dead letter that can be retried.
    #[error("no dead letters match")]
    NothingMatches,
    /// A relay dead letter cannot be rebuilt into a message.
    #[error(transparent)]
    Rebuild(RetryError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The dead letters a retry of `filter` takes: those that match and are `dead`. Ids named in
/// `filter.ids` must each exist and be `dead`, or nothing is taken.
pub async fn retry_candidates(
    conn: &mut PgConnection,
    filter: &Filter,
) -> Result<Vec<Stored>, ActionError> {
    for id in filter.ids.iter().flatten() {
        match store::get(conn, *id).await? {
            None => return Err(ActionError::NotFound(*id)),
            Some(letter) if letter.status != "dead" => {
                return Err(ActionError::NotDead {
                    id: *id,
                    status: letter.status,
                });
            }
            Some(_) => {}
        }
    }
    let filter = Filter {
        status: Some("dead".to_owned()),
        ..filter.clone()
    };
    let letters = store::list(conn, &filter, i64::MAX).await?;
    if letters.is_empty() {
        return Err(ActionError::NothingMatches);
    }
    Ok(letters)
}

/// Retries the dead letters of `filter` (see [`retry_candidates`]) in one transaction: all
/// of them, or, on an error, none. Relay letters go back to the outbox in the order they were
/// parked, so each key's messages are published in their order again.
pub async fn retry(conn: &mut PgConnection, filter: &Filter) -> Result<Retried, ActionError> {
    let mut tx = conn.begin().await?;
    let letters = retry_candidates(&mut tx, filter).await?;
    let (mut relay, consumers): (Vec<&Stored>, Vec<&Stored>) =
        letters.iter().partition(|l| l.source == "relay");
    // Back to the outbox in the order they were parked (a key's head first), not the
    // list's newest-first: the outbox publishes a key's rows in the order they are written.
    relay.sort_by_key(|l| l.id);
    let consumer_ids: Vec<i64> = consumers.iter().map(|l| l.id).collect();
    store::request_retry(&mut tx, &consumer_ids).await?;
    for letter in &relay {
        retry_to_outbox(&mut tx, letter)
            .await
            .map_err(|e| match e {
                RetryError::Database(e) => ActionError::Database(e),
                RetryError::AlreadyRetried(id) => ActionError::NotDead {
                    id,
                    status: "retried".to_owned(),
                },
                e => ActionError::Rebuild(e),
            })?;
    }
    tx.commit().await?;
    Ok(Retried {
        by_consumers: consumers.len(),
        to_outbox: relay.len(),
    })
}

/// Deletes the dead letters matching `filter`; returns how many.
pub async fn purge(conn: &mut PgConnection, filter: &Filter) -> Result<u64, sqlx::Error> {
    store::purge(conn, filter).await
}
