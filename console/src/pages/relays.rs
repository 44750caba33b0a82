//! `GET /db/{database}/relays`: the relay instances (heartbeat, partitions, sessions and
//! open claims), the 256 partitions as a grid (backlog at the head, oldest age, owner), and
//! the keys whose head waits out a retry backoff; `POST /db/{database}/relays/retry-now`
//! ends one key's backoff (audited).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Extension, Path, RawForm, State as Extract};
use axum::http::StatusCode;
use axum::response::Html;
use maud::{Markup, html};

use super::{age_text, database, inert, layout};
use crate::config::Database;
use crate::error::Failure;
use crate::security::{Actor, State};
use crate::store;

/// How many of the oldest unpublished rows the partition grid reads.
pub(crate) const GRID_HEAD_ROWS: i64 = 50_000;
/// The most stuck keys listed.
const STUCK_KEYS_SHOWN: i64 = 200;

struct Relays {
    instances: Vec<relay::store::InstanceStatus>,
    sessions: Vec<relay::store::InstanceSessions>,
    owners: Vec<relay::store::PartitionOwner>,
    heads: Vec<outbox::store::inspect::PartitionHead>,
    stuck: Vec<outbox::store::inspect::StuckKey>,
}

async fn read(state: &State, db: &Database) -> Result<Relays, Failure> {
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let mut relays = Relays {
        instances: relay::store::instances(&mut tx).await?,
        sessions: relay::store::instance_sessions(&mut tx).await?,
        owners: relay::store::partition_owners(&mut tx).await?,
        heads: outbox::store::inspect::partitions_at_head(&mut tx, GRID_HEAD_ROWS).await?,
        stuck: outbox::store::inspect::stuck_keys(&mut tx, STUCK_KEYS_SHOWN).await?,
    };
    // Oldest first among those read.
    relays
        .stuck
        .sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
    tx.commit().await?;
    Ok(relays)
}

/// `GET /db/{database}/relays`.
pub(crate) async fn page(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let relays = read(&state, db).await?;
    let url = format!("{}/db/{}/relays", state.config.base_path, db.name);
    // The waiting keys and their buttons stay put (a refresh under the pointer could move
    // another key's button there); the rest refreshes itself.
    let body = html! {
        (super::live(&url, html! {
            (instances(&relays))
            (grid(&state, &relays))
        }))
        (stuck_keys(&state, &actor, &db.name, &relays))
    };
    let title = format!("{} · relays", db.name);
    Ok(Html(
        layout(&state, &state.config.base_path, &title, body).into_string(),
    ))
}

/// Each registered instance: A, B, C... in the grid.
fn letters(relays: &Relays) -> BTreeMap<&str, String> {
    relays
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| (inst.instance_id.as_str(), instance_letter(i)))
        .collect()
}

fn instance_letter(i: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if i < alphabet.len() {
        (alphabet[i] as char).to_string()
    } else {
        format!("#{}", i + 1)
    }
}

fn instances(relays: &Relays) -> Markup {
    let letters = letters(relays);
    html! {
        h2 { "Instances" }
        @if relays.instances.is_empty() {
            p { "No relay instance is registered. A relay registers itself when it runs with the table source; a WAL relay (" code { "--source wal" } ") does not: see its slot on the overview." }
        } @else {
            div.wrap { table {
                thead { tr {
                    th scope="col" { "Grid" } th scope="col" { "Instance" }
                    th.num scope="col" { "Heartbeat" } th.num scope="col" { "Partitions" }
                    th.num scope="col" { "Sessions" } th.num scope="col" { "Open claims" }
                } }
                tbody { @for i in &relays.instances {
                    @let sessions = relays.sessions.iter().find(|s| s.instance_id == i.instance_id);
                    tr data-instance=(inert(&i.instance_id)) {
                        td { (letters.get(i.instance_id.as_str()).cloned().unwrap_or_default()) }
                        td { (inert(&i.instance_id)) }
                        td.num { (age_text(i.heartbeat_age_seconds)) " ago" }
                        td.num data-field="partitions" { (i.partitions) }
                        td.num data-field="sessions" { (sessions.map_or(0, |s| s.sessions)) }
                        td.num data-field="open-claims" {
                            @match sessions {
                                Some(s) if s.hidden > 0 => { (s.in_transaction) " (" (s.hidden) " not visible: grant pg_read_all_stats)" }
                                Some(s) => (s.in_transaction),
                                None => "0",
                            }
                        }
                    }
                } }
            } }
            p.note { "Open claims: the instance's sessions inside a transaction. Each claim is a transaction holding its rows' locks while they are published." }
        }
    }
}

fn grid(state: &State, relays: &Relays) -> Markup {
    let letters = letters(relays);
    let heads: BTreeMap<i16, &outbox::store::inspect::PartitionHead> =
        relays.heads.iter().map(|h| (h.partition_id, h)).collect();
    let head_rows: i64 = relays.heads.iter().map(|h| h.rows).sum();
    let window = state.config.duplicate_window.as_secs_f64();
    let lease = state.config.lease_ttl.as_secs_f64();
    let unowned = relays.owners.iter().filter(|o| o.owner.is_none()).count();
    html! {
        h2 { "Partitions" }
        p {
            "A key's rows belong to partition " code { "hashtextextended(key, 0) & 255" } "; one instance at a time publishes a partition. "
            @if head_rows >= GRID_HEAD_ROWS {
                "Rows counted among the oldest " (GRID_HEAD_ROWS) " unpublished (the backlog is larger): a partition's oldest age is exact, its count a lower bound."
            } @else {
                "Every unpublished row is counted (" (head_rows) ")."
            }
            @if unowned > 0 { " " strong.bad { (unowned) " unowned." } }
        }
        ul.legend aria-label="Legend" {
            li { span.cell-swatch.idle {} "no backlog" }
            li { span.cell-swatch.busy {} "backlog younger than a lease (" (age_text(lease)) ")" }
            li { span.cell-swatch.late {} "older than a lease" }
            li { span.cell-swatch.stale {} "older than the duplicate window (" (age_text(window)) ")" }
            li { span.cell-swatch.orphan {} "no owner" }
        }
        div.wrap { table.grid {
            caption.visually-hidden { "The 256 partitions, 16 a row: partition, owner, unpublished rows, oldest age" }
            tbody { @for row in 0..16i16 {
                tr { @for col in 0..16i16 {
                    @let p = row * 16 + col;
                    @let owner = relays.owners.get(p as usize).and_then(|o| o.owner.as_deref());
                    @let head = heads.get(&p);
                    @let class = cell_class(owner.is_some(), head.map(|h| h.oldest_age_seconds), lease, window);
                    @let owner_text = owner.map_or_else(|| "none".to_owned(), |o| letters.get(o).cloned().unwrap_or_else(|| "?".to_owned()));
                    td class=(class) data-partition=(p)
                        title={ "partition " (p) ", owner " (owner.map_or_else(|| "none".to_owned(), inert)) @if let Some(h) = head { ", " (h.rows) " unpublished, oldest " (age_text(h.oldest_age_seconds)) } } {
                        span.p { (p) }
                        span.o { (owner_text) }
                        @if let Some(h) = head { span.n { (h.rows) } span.a { (age_text(h.oldest_age_seconds)) } }
                    }
                } }
            } }
        } }
    }
}

fn cell_class(owned: bool, oldest: Option<f64>, lease: f64, window: f64) -> &'static str {
    match (owned, oldest) {
        (false, _) => "orphan",
        (true, None) => "idle",
        (true, Some(age)) if age > window => "stale",
        (true, Some(age)) if age > lease => "late",
        (true, Some(_)) => "busy",
    }
}

fn stuck_keys(state: &State, actor: &Actor, database: &str, relays: &Relays) -> Markup {
    let base = state.config.base_path.as_str();
    html! {
        h2 { "Keys waiting out a backoff" }
        @if relays.stuck.is_empty() {
            p.fine { "None: no key's head is waiting to be retried." }
        } @else {
            p { "The oldest row of each of these keys failed to publish and waits for its retry; the key's later rows wait behind it (order per key). "
                @if relays.stuck.len() as i64 >= STUCK_KEYS_SHOWN { "More keys wait: the first " (STUCK_KEYS_SHOWN) " by name are shown, oldest first. " }
                "This list is as of the page's load: reload it to see the keys now." }
            div.wrap { table {
                thead { tr {
                    th scope="col" { "Key" } th.num scope="col" { "Partition" } th scope="col" { "Subject" }
                    th.num scope="col" { "Attempts" } th.num scope="col" { "Age" } th.num scope="col" { "Retry in" }
                    th scope="col" { "Last error" }
                    @if state.config.allow_actions { th scope="col" { span.visually-hidden { "Action" } } }
                } }
                tbody { @for k in &relays.stuck {
                    tr data-key=(inert(&k.partition_key)) {
                        td { code { (inert(&k.partition_key)) } }
                        td.num { (k.partition_id) }
                        td { (inert(&k.subject)) }
                        td.num { (k.attempts) }
                        td.num { (age_text(k.age_seconds)) }
                        td.num { (age_text(k.retry_in_seconds.max(0.0))) }
                        td { (k.last_error.as_deref().map(inert).unwrap_or_default()) }
                        @if state.config.allow_actions {
                            td { form method="post" action={ (base) "/db/" (database) "/relays/retry-now" } {
                                input type="hidden" name="csrf" value=(state.csrf_token(actor));
                                input type="hidden" name="key" value=(k.partition_key);
                                button type="submit" aria-label={ "Retry key " (inert(&k.partition_key)) " now" } { "Retry now" }
                            } }
                        }
                    }
                } }
            } }
        }
    }
}

/// `POST /db/{database}/relays/retry-now`: `key` may be claimed at once.
pub(crate) async fn retry_now(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    RawForm(body): RawForm,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    state.check_csrf(&actor, field("csrf").unwrap_or_default())?;
    let key = field("key")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Failure::bad_request("name the key to retry (field key)"))?;
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let changed = outbox::store::inspect::retry_key_now(&mut tx, key).await? as i64;
    if changed == 0 {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "key {:?} does not wait out a backoff now (it was published, or a relay is trying it at this moment): nothing changed",
                inert(key)
            ),
        ));
    }
    store::audit(
        &mut tx,
        &actor.0,
        "retry_now",
        &serde_json::json!({ "partition_key": key }),
        changed,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(actor = %actor.0, action = "retry_now", database = %db.name, key = %inert(key), "console action");
    let base = state.config.base_path.as_str();
    let back = format!("{base}/db/{}/relays", db.name);
    let body = html! {
        p role="status" data-field="outcome" { "Key " code { (inert(key)) } " may be published at once: a relay takes it at its next claim." }
        p { a href=(back) { "Back to the relays" } }
    };
    let title = format!("{} · done", db.name);
    Ok(Html(layout(&state, base, &title, body).into_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_coloured_by_owner_then_age() {
        assert_eq!(cell_class(false, Some(1.0), 5.0, 120.0), "orphan");
        assert_eq!(cell_class(false, None, 5.0, 120.0), "orphan");
        assert_eq!(cell_class(true, None, 5.0, 120.0), "idle");
        assert_eq!(cell_class(true, Some(1.0), 5.0, 120.0), "busy");
        assert_eq!(cell_class(true, Some(6.0), 5.0, 120.0), "late");
        assert_eq!(cell_class(true, Some(121.0), 5.0, 120.0), "stale");
    }

    #[test]
    fn instances_are_lettered_then_numbered() {
        assert_eq!(instance_letter(0), "A");
        assert_eq!(instance_letter(25), "Z");
        assert_eq!(instance_letter(26), "#27");
    }
}
