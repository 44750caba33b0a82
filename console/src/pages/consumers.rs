//! `GET /db/{database}/consumers`: each durable JetStream consumer whose name is one of the
//! database's inbox consumers (pending, ack-pending, redelivered, ack floor, the oldest
//! message it may still be delivered), what its inbox took in the last minute, its parked
//! messages, and whether the inbox still remembers as far back as a redelivery can reach;
//! then the durables no database of this console names.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State as Extract};
use axum::response::Html;
use maud::{Markup, html};
use time::OffsetDateTime;

use super::overview::{count_text, query_value};
use super::{age_text, database, inert, layout};
use crate::broker::{self, BrokerView, DurableView};
use crate::config::Database;
use crate::error::Failure;
use crate::security::State;
use crate::store;

/// The most inbox consumers listed.
const CONSUMERS_SHOWN: i64 = 200;
/// Where each consumer's parked count stops.
const PARKED_CAP: i64 = 1_000;

struct Inbox {
    activity: Vec<inbox::store::ConsumerActivity>,
    oldest_row_age: Option<f64>,
    parked: BTreeMap<String, (i64, bool)>,
}

async fn read_inbox(state: &State, db: &Database) -> Result<Inbox, Failure> {
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let activity = inbox::store::consumer_activity(&mut tx, CONSUMERS_SHOWN).await?;
    let oldest_row_age = inbox::store::oldest_row_age(&mut tx).await?;
    let mut parked: BTreeMap<String, (i64, bool)> = BTreeMap::new();
    for d in dlq::store::dead_by_reason(&mut tx, 200, PARKED_CAP).await? {
        let entry = parked.entry(d.consumer).or_default();
        entry.0 += d.count;
        entry.1 |= d.capped;
    }
    tx.commit().await?;
    Ok(Inbox {
        activity,
        oldest_row_age,
        parked,
    })
}

/// The durables of `view` that are inbox consumers or parked letters' consumers of `db`.
pub(crate) fn belongs<'a>(
    view: &'a BrokerView,
    names: &'a [&'a str],
) -> impl Iterator<Item = &'a DurableView> + 'a {
    view.durables
        .iter()
        .filter(move |d| names.contains(&d.name.as_str()))
}

/// Why a redelivery could run a handler twice, if it could: the oldest message the broker
/// may still deliver is older than the inbox keeps its rows.
fn horizon_risk(
    horizon: Option<OffsetDateTime>,
    now: OffsetDateTime,
    retention: Duration,
) -> Option<String> {
    let horizon_age = (now - horizon?).as_seconds_f64();
    let kept = retention.as_secs_f64();
    (horizon_age > kept).then(|| {
        format!(
            "it may still be delivered a message stored {} ago, but the inbox keeps rows for {}: a message handled before then and delivered again would run again (raise inbox_retention, or --inbox-retention-secs if it is raised already)",
            age_text(horizon_age),
            age_text(kept)
        )
    })
}

/// `GET /db/{database}/consumers`.
pub(crate) async fn page(
    Extract(state): Extract<Arc<State>>,
    Path(name): Path<String>,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let inbox = read_inbox(&state, db).await?;
    let broker = match &state.config.broker {
        None => Err(
            "no broker: start the console with --nats-url to see the durable consumers".to_owned(),
        ),
        Some(client) => {
            broker::read(client, state.config.broker_timeout, broker::Horizons::Read).await
        }
    };
    let names: Vec<&str> = inbox
        .activity
        .iter()
        .map(|a| a.consumer.as_str())
        .chain(inbox.parked.keys().map(String::as_str))
        .collect();
    let now = OffsetDateTime::now_utc();
    let base = state.config.base_path.as_str();
    let url = format!("{base}/db/{}/consumers", db.name);
    let body = super::live(
        &url,
        html! {
            @match &broker {
                Err(e) => p.flag role="alert" { (e) },
                Ok(view) => (durables(base, &db.name, view, &names, state.config.inbox_retention, now)),
            }
            h2 { "Inboxes" }
            @if inbox.activity.is_empty() {
                p { "No consumer has taken a message into this database's inbox yet." }
            } @else {
                div.wrap { table {
                    thead { tr { th scope="col" { "Consumer" } th.num scope="col" { "Taken in the last minute" } th.num scope="col" { "Parked" } } }
                    tbody { @for a in &inbox.activity {
                        @let parked = inbox.parked.get(&a.consumer).copied().unwrap_or((0, false));
                        tr data-inbox=(inert(&a.consumer)) {
                            td { (inert(&a.consumer)) }
                            td.num data-field="last-minute" { (a.last_minute) }
                            td.num { a href={ (base) "/db/" (db.name) "/dead-letters?status=dead&consumer=" (query_value(&a.consumer)) } { (count_text(parked.0, parked.1)) } }
                        }
                    } }
                } }
                p.note {
                    "The consumers keep inbox rows for " (age_text(state.config.inbox_retention.as_secs_f64()))
                    " (--inbox-retention-secs); the oldest row is "
                    (inbox.oldest_row_age.map(age_text).unwrap_or_else(|| "none".to_owned()))
                    " old. A message delivered again while its row is kept is recognised and not handled twice."
                }
            }
        },
    );
    let title = format!("{} · consumers", db.name);
    Ok(Html(layout(&state, base, &title, body).into_string()))
}

fn durables(
    base: &str,
    database: &str,
    view: &BrokerView,
    names: &[&str],
    retention: Duration,
    now: OffsetDateTime,
) -> Markup {
    let ours: Vec<&DurableView> = belongs(view, names).collect();
    let others: Vec<&DurableView> = view
        .durables
        .iter()
        .filter(|d| !names.contains(&d.name.as_str()))
        .collect();
    let risks: Vec<(String, String)> = ours
        .iter()
        .filter_map(|d| horizon_risk(d.horizon, now, retention).map(|r| (d.name.clone(), r)))
        .collect();
    html! {
        h2 { "Durable consumers" }
        @if !risks.is_empty() {
            ul.flags aria-label="Red flags" {
                @for (name, risk) in &risks { li.flag { "consumer " (inert(name)) ": " (risk) } }
            }
        }
        @if ours.is_empty() {
            p { "No durable consumer of the broker has the name of one of this database's inbox consumers." }
        } @else {
            (durable_table(base, database, &ours, now, true))
        }
        @if !others.is_empty() {
            h2 { "Other durables on the broker" }
            p.note { "Their names are not inbox consumers of this database." }
            (durable_table(base, database, &others, now, false))
        }
        h2 { "Streams" }
        div.wrap { table {
            thead { tr {
                th scope="col" { "Stream" } th scope="col" { "Subjects" } th.num scope="col" { "Messages" }
                th.num scope="col" { "Duplicate window" } th.num scope="col" { "Max age" }
            } }
            tbody { @for st in &view.streams {
                tr data-stream=(inert(&st.name)) {
                    td { (inert(&st.name)) }
                    td { (inert(&st.subjects.join(", "))) }
                    td.num { (st.messages) }
                    td.num data-field="duplicate-window" { (age_text(st.duplicate_window.as_secs_f64())) }
                    td.num { @if st.max_age.is_zero() { "unlimited" } @else { (age_text(st.max_age.as_secs_f64())) } }
                }
            } }
        } }
    }
}

fn durable_table(
    base: &str,
    database: &str,
    durables: &[&DurableView],
    now: OffsetDateTime,
    linked: bool,
) -> Markup {
    html! {
        div.wrap { table {
            thead { tr {
                th scope="col" { "Consumer" } th scope="col" { "Stream" }
                th.num scope="col" { "Pending" } th.num scope="col" { "Ack pending" }
                th.num scope="col" { "Redelivered" } th.num scope="col" { "Ack floor" }
                th.num scope="col" { "Oldest deliverable" } th.num scope="col" { "Max deliver" }
                th.num scope="col" { "Ack wait" }
            } }
            tbody { @for d in durables {
                tr data-durable=(inert(&d.name)) {
                    td { @if linked {
                        a href={ (base) "/db/" (database) "/dead-letters?consumer=" (query_value(&d.name)) } { (inert(&d.name)) }
                    } @else { (inert(&d.name)) } }
                    td { (inert(&d.stream)) }
                    td.num data-field="pending" { (d.pending) }
                    td.num data-field="ack-pending" { (d.ack_pending) }
                    td.num data-field="redelivered" { (d.redelivered) }
                    td.num { (d.ack_floor) }
                    td.num { @if d.horizon_unknown { "unknown" } @else { (d.horizon.map(|h| age_text((now - h).as_seconds_f64().max(0.0))).unwrap_or_else(|| "none".to_owned())) } }
                    td.num { @if d.max_deliver < 0 { "unlimited" } @else { (d.max_deliver) } }
                    td.num { (age_text(d.ack_wait.as_secs_f64())) }
                }
            } }
        } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_older_than_the_inbox_retention_is_a_risk() {
        let now = OffsetDateTime::now_utc();
        let hour_ago = now - time::Duration::hours(1);
        assert!(horizon_risk(Some(hour_ago), now, Duration::from_secs(60)).is_some());
        assert!(horizon_risk(Some(hour_ago), now, Duration::from_secs(7200)).is_none());
        // Fully acknowledged: nothing can come again.
        assert!(horizon_risk(None, now, Duration::from_secs(60)).is_none());
    }
}
