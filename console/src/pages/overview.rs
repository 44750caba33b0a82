//! `GET /`: per database, the outbox backlog, the relay instances, the dead letters by
//! reason, and red flags; `GET /db/{database}/audit`: the actions taken.

use std::sync::Arc;

use axum::extract::{Path, State as Extract};
use axum::response::Html;
use maud::{Markup, html};

use super::{age_text, database, inert, layout, time_text};
use crate::config::Database;
use crate::error::Failure;
use crate::security::State;
use crate::store;

/// What one database shows.
struct Summary {
    backlog: outbox::store::Backlog,
    instances: Vec<relay::store::InstanceStatus>,
    dead_letters: Vec<dlq::store::Stat>,
}

async fn summary(state: &State, db: &Database) -> Result<Summary, Failure> {
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let backlog = outbox::store::backlog(&mut tx).await?;
    let instances = relay::store::instances(&mut tx).await?;
    let dead_letters = dlq::store::stats(&mut tx).await?;
    tx.commit().await?;
    Ok(Summary {
        backlog,
        instances,
        dead_letters,
    })
}

/// What needs a look, in words.
fn red_flags(state: &State, s: &Summary) -> Vec<String> {
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
    let window = state.config.duplicate_window.as_secs_f64();
    if s.backlog.unpublished > 0 && s.backlog.oldest_age_seconds > window {
        flags.push(format!(
            "the oldest unpublished row is {} old, past the stream's duplicate window ({}): a publish retried now is not deduplicated by the broker",
            age_text(s.backlog.oldest_age_seconds),
            age_text(window)
        ));
    }
    let dead: i64 = s
        .dead_letters
        .iter()
        .filter(|d| d.status == "dead")
        .map(|d| d.count)
        .sum();
    if dead > 0 {
        let (noun, verb) = if dead == 1 {
            ("letter", "waits")
        } else {
            ("letters", "wait")
        };
        flags.push(format!("{dead} dead {noun} {verb} for a retry or a purge"));
    }
    flags
}

/// `GET /`.
pub(crate) async fn page(Extract(state): Extract<Arc<State>>) -> Html<String> {
    let base = state.config.base_path.as_str();
    let mut sections = Vec::with_capacity(state.config.databases.len());
    for db in &state.config.databases {
        sections.push((db, summary(&state, db).await));
    }
    let body = html! {
        div.cards { @for (db, summary) in &sections {
            section.card aria-labelledby={ "db-" (db.name) } {
                h2 id={ "db-" (db.name) } { (db.name) }
                @match summary {
                    Err(e) => p.flag role="alert" { "cannot read this database: " (e.message) },
                    Ok(s) => (database_section(&state, base, db, s)),
                }
            }
        } }
    };
    Html(layout(&state, base, "Overview", body).into_string())
}

fn database_section(state: &State, base: &str, db: &Database, s: &Summary) -> Markup {
    let flags = red_flags(state, s);
    let mut by_reason: Vec<(&str, &str, i64)> = s
        .dead_letters
        .iter()
        .filter(|d| d.status == "dead")
        .map(|d| (d.consumer.as_str(), d.reason.as_str(), d.count))
        .collect();
    by_reason.sort_by_key(|d| std::cmp::Reverse(d.2));
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
            dt { "Unpublished" } dd data-field="backlog" { (s.backlog.unpublished) }
            dt { "Retrying" } dd data-field="retrying" { (s.backlog.retrying) }
            dt { "Oldest unpublished" } dd data-field="oldest" { (age_text(s.backlog.oldest_age_seconds)) }
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
        h3 { "Dead letters" }
        @if by_reason.is_empty() {
            p { "None waiting." }
        } @else {
            div.wrap { table {
                thead { tr { th scope="col" { "Consumer" } th scope="col" { "Reason" } th.num scope="col" { "Dead" } } }
                tbody {
                    @for (consumer, reason, count) in &by_reason {
                        tr {
                            td { (inert(consumer)) }
                            td { a href={ (base) "/db/" (db.name) "/dead-letters?status=dead&consumer=" (query_value(consumer)) "&reason=" (query_value(reason)) } { (inert(reason)) } }
                            td.num { (count) }
                        }
                    }
                }
            } }
        }
        p {
            a href={ (base) "/db/" (db.name) "/dead-letters" } { "All dead letters" }
            " · "
            a href={ (base) "/db/" (db.name) "/audit" } { "Actions taken" }
        }
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
