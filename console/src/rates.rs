//! The publish rate of the last hour, per database: rows published per minute, counted from
//! `outbox_message`'s published rows. Minutes more than [`SETTLE_MINUTES`] old are counted
//! once and kept in memory (a row's publish time is its claim's start, so the last minutes
//! can still grow); each page load counts only the minutes since.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use sqlx::PgConnection;

/// Minutes shown.
pub(crate) const MINUTES: i64 = 60;
/// Minutes after which a minute's count no longer changes.
const SETTLE_MINUTES: i64 = 2;

#[derive(Debug, Default)]
struct Counted {
    /// Minutes before this one are settled and in `counts`.
    settled_until: i64,
    counts: BTreeMap<i64, i64>,
}

/// The settled minutes of every database.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    databases: Mutex<HashMap<String, Counted>>,
}

impl Rates {
    /// Rows published in each of the last [`MINUTES`] minutes of `database`, oldest first;
    /// the last is the current (partial) minute.
    pub(crate) async fn last_hour(
        &self,
        database: &str,
        conn: &mut PgConnection,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let settled_until = self
            .databases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(database)
            .map_or(0, |c| c.settled_until);
        // From the first unsettled minute on, never more than the hour shown (by the
        // database's clock).
        let (rows, now, since) =
            outbox::store::inspect::published_per_minute(conn, settled_until, MINUTES).await?;
        let fresh: BTreeMap<i64, i64> = rows.into_iter().collect();
        let first = now - MINUTES + 1;
        let settle = now - SETTLE_MINUTES;
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let counted = databases.entry(database.to_owned()).or_default();
        if counted.settled_until < since {
            // Nothing known before `since` (first load, or an hour without a look).
            counted.counts.clear();
        }
        counted
            .counts
            .extend(fresh.range(since..settle).map(|(&m, &n)| (m, n)));
        counted.settled_until = counted.settled_until.max(settle).max(since);
        counted.counts.retain(|&m, _| m >= first);
        Ok((first..=now)
            .map(|m| {
                let table = if m < since { &counted.counts } else { &fresh };
                table.get(&m).copied().unwrap_or(0)
            })
            .collect())
    }
}
