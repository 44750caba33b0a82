//! `GET /`: per database, the outbox backlog, the relay instances, the WAL slots, the dead
//! letters by reason, and red flags; `GET /db/{database}/audit`: the actions taken. Every
//! count stops at a cap ([`COUNT_CAP`] rows of backlog, [`REASON_CAP`] letters a reason),
//! so the page costs about the same at a million rows.

use std::sync::Arc;

use axum::extract::{Path, State as Extract};
use axum::response::Html;
use maud::{Markup, html};

use super::{age_text, database, inert, layout, time_text};
use crate::broker::{self, BrokerView};
use crate::config::Database;
use crate::error::Failure;
use crate::security::State;
use crate::store;

/// Where the backlog's counts stop ("more than ...").
pub(crate) const COUNT_CAP: i64 = 100_000;
/// Where each (consumer, reason) group's count of dead letters stops.
const REASON_CAP: i64 = 1_000;
/// The most (consumer, reason) groups of dead letters shown.
const REASON_GROUPS: i64 = 50;

/// What one database shows.
struct Summary {
    backlog: outbox::store::inspect::Glance,
    instances: Vec<relay::store::InstanceStatus>,
    slots: Vec<relay::wal::store::SlotStatus>,
    dead_letters: Vec<dlq::store::DeadByReason>,
    /// The inbox consumers' names.
    consumers: Vec<String>,
    /// More (consumer, reason) groups wait than are listed.
    more_reasons: bool,
    /// Rows published in each of the last 60 minutes.
    published: Vec<i64>,
}

async fn summary(state: &State, db: &Database) -> Result<Summary, Failure> {
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let backlog = outbox::store::inspect::glance(&mut tx, COUNT_CAP).await?;
    let instances = relay::store::instances(&mut tx).await?;
    let slots = relay::wal::store::slots(&mut tx).await?;
    let mut dead_letters =
        dlq::store::dead_by_reason(&mut tx, REASON_GROUPS + 1, REASON_CAP).await?;
    let more_reasons = dead_letters.len() as i64 > REASON_GROUPS;
    dead_letters.truncate(REASON_GROUPS as usize);
    let consumers = inbox::store::consumer_names(&mut tx, 200).await?;
    let published = state.rates.last_hour(&db.name, &mut tx).await?;
    tx.commit().await?;
    Ok(Summary {
        backlog,
        instances,
        slots,
        dead_letters,
        consumers,
        more_reasons,
        published,
    })
}

/// `n`, or "more than n" when a count stopped at its cap.
pub(crate) fn count_text(n: i64, capped: bool) -> String {
    if capped {
        format!("more than {n}")
    } else {
        n.to_string()
    }
}

/// What needs a look, in words.
fn red_flags(
    state: &State,
    s: &Summary,
    broker: Option<&Result<BrokerView, String>>,
) -> Vec<String> {
    let mut flags = Vec::new();
    let lease = state.config.lease_ttl.as_secs_f64();
    for i in &s.instances {
        if i.heartbeat_age_seconds > lease {
            flags.push(format!(
                "relay {}: last heartbeat {} ago, longer than a lease ({}): is it running?",
                inert(&i.instance_id),
                age_text(i.heartbeat_age_seconds),
                age_text(lease)
            ));
        }
    }
    let owned: i64 = s.instances.iter().map(|i| i.partitions).sum();
    if !s.instances.is_empty() && owned < relay::store::PARTITIONS {
        flags.push(format!(
            "{} of {} partitions have no owner: their rows wait until a relay takes them",
            relay::store::PARTITIONS - owned,
            relay::store::PARTITIONS
        ));
    }
    if let Some(Err(e)) = broker {
        flags.push(format!("cannot read the broker: {e}"));
    }
    let window = broker
        .and_then(|b| b.as_ref().ok())
        .and_then(|b| b.duplicate_window_for(s.backlog.oldest_subject.as_deref()))
        .unwrap_or(state.config.duplicate_window)
        .as_secs_f64();
    if s.backlog.unpublished > 0 && s.backlog.oldest_age_seconds > window {
        flags.push(format!(
            "the oldest unpublished row is {} old, past the stream's duplicate window ({}): a publish retried now is not deduplicated by the broker",
            age_text(s.backlog.oldest_age_seconds),
            age_text(window)
        ));
    }
    for slot in &s.slots {
        let name = inert(&slot.slot);
        if slot.wal_status.as_deref() == Some("lost") {
            flags.push(format!(
                "WAL slot {name} is lost (its WAL was removed past max_slot_wal_keep_size): it can no longer stream; what was written since is not published"
            ));
        } else if !slot.active {
            flags.push(format!(
                "WAL slot {name} is not streamed by any relay: it keeps {} of WAL and its outbox waits",
                bytes_text(slot.retained_wal_bytes.unwrap_or(0))
            ));
        }
    }
    let dead: i64 = s.dead_letters.iter().map(|d| d.count).sum();
    if dead > 0 {
        let capped = s.more_reasons || s.dead_letters.iter().any(|d| d.capped);
        let (noun, verb) = if dead == 1 && !capped {
            ("letter", "waits")
        } else {
            ("letters", "wait")
        };
        flags.push(format!(
            "{} dead {noun} {verb} for a retry or a purge",
            count_text(dead, capped)
        ));
    }
    flags
}

/// `GET /`.
pub(crate) async fn page(Extract(state): Extract<Arc<State>>) -> Html<String> {
    let base = state.config.base_path.as_str();
    let broker = match &state.config.broker {
        Some(client) => {
            Some(broker::read(client, state.config.broker_timeout, broker::Horizons::Skip).await)
        }
        None => None,
    };
    let mut sections = Vec::with_capacity(state.config.databases.len());
    for db in &state.config.databases {
        sections.push((db, summary(&state, db).await));
    }
    let body = super::live(
        &format!("{base}/"),
        html! {
            div.cards { @for (db, summary) in &sections {
                section.card aria-labelledby={ "db-" (db.name) } {
                    h2 id={ "db-" (db.name) } { (db.name) }
                    @match summary {
                        Err(e) => p.flag role="alert" { "cannot read this database: " (e.message) },
                        Ok(s) => (database_section(&state, base, db, s, broker.as_ref())),
                    }
                }
            } }
        },
    );
    Html(layout(&state, base, "Overview", body).into_string())
}

fn database_section(
    state: &State,
    base: &str,
    db: &Database,
    s: &Summary,
    broker: Option<&Result<BrokerView, String>>,
) -> Markup {
    let flags = red_flags(state, s, broker);
    let names: Vec<&str> = s
        .consumers
        .iter()
        .map(String::as_str)
        .chain(s.dead_letters.iter().map(|d| d.consumer.as_str()))
        .collect();
    let durables: Vec<&broker::DurableView> = match broker {
        Some(Ok(view)) => super::consumers::belongs(view, &names).collect(),
        _ => Vec::new(),
    };
    let unpublished = match (s.backlog.unpublished_capped, s.backlog.unpublished_estimate) {
        (true, Some(estimate)) if estimate > s.backlog.unpublished => format!(
            "{} (about {estimate})",
            count_text(s.backlog.unpublished, true)
        ),
        (capped, _) => count_text(s.backlog.unpublished, capped),
    };
    let retrying = count_text(s.backlog.retrying, s.backlog.retrying_capped);
    let rate = rate_words(&s.published);
    html! {
        @if flags.is_empty() {
            p.fine { "Nothing needs a look." }
        } @else {
            ul.flags aria-label="Red flags" {
                @for flag in &flags { li.flag { (flag) } }
            }
        }
        h3 { "Outbox" }
        dl.fields {
            dt { "Unpublished" } dd data-field="backlog" { (unpublished) }
            dt { "Retrying" } dd data-field="retrying" { (retrying) }
            dt { "Oldest unpublished" } dd data-field="oldest" { (age_text(s.backlog.oldest_age_seconds)) }
            dt { "Oldest due" } dd data-field="oldest-due" { (age_text(s.backlog.oldest_due_age_seconds)) }
            dt { "Published, last hour" }
            dd data-field="published" {
                (super::sparkline::bars(&s.published, &rate.0))
                span.note { (rate.1) }
            }
        }
        h3 { "Relays" }
        @if s.instances.is_empty() {
            p { "No relay instance is registered (a WAL relay does not register one)." }
        } @else {
            div.wrap { table {
                thead { tr { th scope="col" { "Instance" } th.num scope="col" { "Partitions" } th.num scope="col" { "Heartbeat" } } }
                tbody {
                    @for i in &s.instances {
                        tr {
                            td { (inert(&i.instance_id)) }
                            td.num { (i.partitions) }
                            td.num { (age_text(i.heartbeat_age_seconds)) " ago" }
                        }
                    }
                }
            } }
        }
        @if !s.slots.is_empty() {
            h3 { "WAL slots" }
            div.wrap { table {
                thead { tr { th scope="col" { "Slot" } th scope="col" { "Streamed" } th.num scope="col" { "Behind" } th.num scope="col" { "WAL kept" } th scope="col" { "WAL" } } }
                tbody {
                    @for slot in &s.slots {
                        tr data-slot=(inert(&slot.slot)) {
                            td { (inert(&slot.slot)) }
                            td { @if slot.active { "yes" } @else { strong.bad { "no" } } }
                            td.num { (bytes_text(slot.lag_bytes.unwrap_or(0))) }
                            td.num { (bytes_text(slot.retained_wal_bytes.unwrap_or(0))) }
                            td { (slot.wal_status.as_deref().map(inert).unwrap_or_default()) }
                        }
                    }
                }
            } }
        }
        h3 { "Consumers" }
        @if durables.is_empty() {
            p {
                @if broker.is_none() { "Start the console with --nats-url to see the durable consumers. " }
                (s.consumers.len()) " inbox " (if s.consumers.len() == 1 { "consumer" } else { "consumers" }) "."
            }
        } @else {
            div.wrap { table {
                thead { tr { th scope="col" { "Durable" } th.num scope="col" { "Pending" } th.num scope="col" { "Unacked" } } }
                tbody { @for d in &durables {
                    tr data-durable=(inert(&d.name)) {
                        td { (inert(&d.name)) }
                        td.num { @if d.pending > 0 { strong { (d.pending) } } @else { "0" } }
                        td.num { (d.ack_pending) }
                    }
                } }
            } }
        }
        h3 { "Dead letters" }
        @if s.dead_letters.is_empty() {
            p { "None waiting." }
        } @else {
            div.wrap { table {
                thead { tr { th scope="col" { "Consumer" } th scope="col" { "Reason" } th.num scope="col" { "Dead" } } }
                tbody {
                    @for d in &s.dead_letters {
                        tr {
                            td { (inert(&d.consumer)) }
                            td { a href={ (base) "/db/" (db.name) "/dead-letters?status=dead&consumer=" (query_value(&d.consumer)) "&reason=" (query_value(&d.reason)) } { (inert(&d.reason)) } }
                            td.num { (count_text(d.count, d.capped)) }
                        }
                    }
                }
            } }
        }
        @if s.more_reasons {
            p.note { "More consumers and reasons have dead letters than are listed: see all dead letters." }
        }
        p {
            a href={ (base) "/db/" (db.name) "/relays" } { "Relays and partitions" }
            " · "
            a href={ (base) "/db/" (db.name) "/consumers" } { "Consumers" }
            " · "
            a href={ (base) "/db/" (db.name) "/dead-letters" } { "All dead letters" }
            " · "
            a href={ (base) "/db/" (db.name) "/audit" } { "Actions taken" }
        }
    }
}

/// The sparkline's words: in full (its label), and short (shown under it).
fn rate_words(per_minute: &[i64]) -> (String, String) {
    let total: i64 = per_minute.iter().sum();
    let peak = per_minute.iter().copied().max().unwrap_or(0);
    let last = per_minute.len().checked_sub(2).map_or(0, |i| per_minute[i]);
    (
        format!(
            "{total} published in the last hour (table rows); busiest minute {peak}, last full minute {last}"
        ),
        format!("{total} in the hour, peak {peak}/min"),
    )
}

/// A byte count, short: `512 B`, `3.2 kB`, `41 MB`.
pub(crate) fn bytes_text(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n < 1000.0 => format!("{n:.0} B"),
        n if n < 1e6 => format!("{:.1} kB", n / 1e3),
        n if n < 1e9 => format!("{:.1} MB", n / 1e6),
        n => format!("{:.1} GB", n / 1e9),
    }
}

/// `value` for a URL's query string.
pub(crate) fn query_value(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `GET /db/{database}/audit`: the latest 200 actions.
pub(crate) async fn audit(
    Extract(state): Extract<Arc<State>>,
    Path(name): Path<String>,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let entries = store::recent_audit(&mut tx, 200).await?;
    tx.commit().await?;
    let body = html! {
        @if entries.is_empty() {
            p { "No action has been taken from the console." }
        } @else {
            div.wrap { table {
                thead { tr { th scope="col" { "At" } th scope="col" { "Who" } th scope="col" { "Action" } th.num scope="col" { "Affected" } th scope="col" { "Detail" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (time_text(e.at)) }
                            td { (inert(&e.actor)) }
                            td { (inert(&e.action)) }
                            td.num { (e.affected) }
                            td { code { (inert(&e.detail.to_string())) } }
                        }
                    }
                }
            } }
        }
    };
    let title = format!("{} · actions taken", db.name);
    Ok(Html(
        layout(&state, &state.config.base_path, &title, body).into_string(),
    ))
}
