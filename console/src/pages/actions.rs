//! `POST /db/{database}/dead-letters/retry` and `.../purge`, as plain forms (no script
//! needed), through `dlq::actions` (the code the `dlq` CLI runs).
//!
//! Scope `selected` names ids (`id` fields); scope `all` carries the list's filter. A purge,
//! and any action on all matching letters, first counts what it would take and answers with
//! a confirmation page carrying that count; the action runs only when the confirmed count
//! is still the count (else the page is shown again with the new one), and takes what it
//! counted: count and action share one snapshot. The action and its audit row commit
//! together.

use std::sync::Arc;

use axum::extract::{Extension, Path, RawForm, State as Extract};
use axum::http::StatusCode;
use axum::response::Html;
use maud::{Markup, html};
use time::OffsetDateTime;

use super::dead_letters::FilterParams;
use super::{database, layout};
use crate::error::Failure;
use crate::security::{Actor, State};
use crate::store;

/// The most letters one action takes: beyond that, narrow the filter (one action is one
/// transaction, and holds its snapshot while it runs).
const MAX_PER_ACTION: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Retry,
    Purge,
}

impl Kind {
    fn verb(self) -> &'static str {
        match self {
            Kind::Retry => "retry",
            Kind::Purge => "purge",
        }
    }
}

/// What the form asks to act on.
enum Scope {
    Selected(Vec<i64>),
    All(FilterParams),
}

/// `POST .../retry`.
pub(crate) async fn retry(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    RawForm(body): RawForm,
) -> Result<Html<String>, Failure> {
    act(&state, &actor, &name, &body, Kind::Retry).await
}

/// `POST .../purge`.
pub(crate) async fn purge(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    RawForm(body): RawForm,
) -> Result<Html<String>, Failure> {
    act(&state, &actor, &name, &body, Kind::Purge).await
}

async fn act(
    state: &State,
    actor: &Actor,
    name: &str,
    body: &[u8],
    kind: Kind,
) -> Result<Html<String>, Failure> {
    let db = database(state, name)?;
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    state.check_csrf(actor, field("csrf").unwrap_or_default())?;
    let scope = match field("scope") {
        Some("selected") => {
            let ids = pairs
                .iter()
                .filter(|(k, _)| k == "id")
                .map(|(_, v)| {
                    v.parse::<i64>().map_err(|_| {
                        Failure::bad_request(format!(
                            "{:?} is not a dead-letter id",
                            super::inert(v)
                        ))
                    })
                })
                .collect::<Result<Vec<i64>, Failure>>()?;
            if ids.is_empty() {
                return Err(Failure::bad_request("select at least one dead letter"));
            }
            Scope::Selected(ids)
        }
        Some("all") => Scope::All(FilterParams::from_pairs(&pairs)),
        _ => return Err(Failure::bad_request("scope must be selected or all")),
    };
    if let (Kind::Retry, Scope::All(params)) = (kind, &scope)
        && !matches!(params.status.trim(), "" | "dead")
    {
        return Err(Failure::bad_request(
            "only dead letters can be retried: filter by status dead (or none)",
        ));
    }
    let (mut filter, described) = match &scope {
        Scope::Selected(ids) => (
            dlq::store::Filter {
                ids: Some(ids.clone()),
                ..dlq::store::Filter::default()
            },
            format!(
                "dead letters {}",
                ids.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Scope::All(params) => (params.filter()?, params.describe()),
    };
    if kind == Kind::Retry {
        filter.status = Some("dead".to_owned());
    }
    let confirmed = field("confirm").and_then(|c| c.parse::<i64>().ok());
    // What the confirmation was for: the letters that existed when it was counted (ids up
    // to the highest counted), as they were then (failed last before the count: a letter
    // that fails again keeps its id, and must not be taken unseen).
    let confirmed_max = field("max_id").and_then(|m| m.parse::<i64>().ok());
    let counted_at = field("counted_at")
        .and_then(|t| t.parse::<i128>().ok())
        .and_then(|micros| micros.checked_mul(1000))
        .and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok());
    let asked_until = filter.until;
    let mut tx = store::begin_snapshot(&db.pool, state.config.statement_timeout).await?;
    if confirmed.is_some() {
        filter.max_id = confirmed_max;
        if let Some(at) = counted_at {
            let bound = at + time::Duration::microseconds(1);
            filter.until = Some(asked_until.map_or(bound, |u| u.min(bound)));
        }
    }
    let mut count = dlq::store::count(&mut tx, &filter).await?;
    if count == 0 {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "no dead letters match ({described}): nothing to {}",
                kind.verb()
            ),
        ));
    }
    if count > MAX_PER_ACTION {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "{count} dead letters match ({described}); one action takes at most {MAX_PER_ACTION}: narrow the filter (by time, reason or consumer)"
            ),
        ));
    }
    let confirm_first = kind == Kind::Purge || matches!(scope, Scope::All(_));
    // The same count of other letters (one gone, one failed again meanwhile) is not what
    // was confirmed either.
    let same_letters = confirmed == Some(count)
        && field("fingerprint").is_some_and(|f| !f.is_empty())
        && field("fingerprint") == Some(dlq::store::fingerprint(&mut tx, &filter).await?.as_str());
    if confirm_first && !same_letters {
        // Counted afresh (unless it was just counted so), up to the highest id now: the
        // next confirmation acts on these.
        if filter.max_id.take().is_some() || filter.until != asked_until {
            filter.until = asked_until;
            count = dlq::store::count(&mut tx, &filter).await?;
        }
        let max_id = dlq::store::max_id(&mut tx, &filter).await?.unwrap_or(0);
        let counted_at = store::now_micros(&mut tx).await?;
        let fingerprint = dlq::store::fingerprint(&mut tx, &filter).await?;
        let base = state.config.base_path.as_str();
        let title = format!("{} · confirm", db.name);
        let page = confirmation(
            state,
            actor,
            &db.name,
            kind,
            &scope,
            &described,
            (count, max_id, counted_at, &fingerprint),
            confirmed,
        );
        return Ok(Html(layout(state, base, &title, page).into_string()));
    }
    let (affected, summary) = match kind {
        Kind::Retry => {
            let retried = dlq::actions::retry(&mut tx, &filter)
                .await
                .map_err(action_failure)?;
            (
                retried.total() as i64,
                format!(
                    "Retried {} dead {}: {} re-run by their consumers, {} back to the outbox.",
                    retried.total(),
                    letters(retried.total() as i64),
                    retried.by_consumers,
                    retried.to_outbox
                ),
            )
        }
        Kind::Purge => {
            let deleted = dlq::actions::purge(&mut tx, &filter).await? as i64;
            (
                deleted,
                format!("Purged {deleted} dead {}.", letters(deleted)),
            )
        }
    };
    let detail = match &scope {
        Scope::Selected(ids) => serde_json::json!({ "scope": "selected", "ids": ids }),
        Scope::All(params) => serde_json::json!({
            "scope": "all",
            "filter": params.pairs().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "max_id": filter.max_id,
            "counted_before": filter.until.map(super::time_text),
        }),
    };
    store::audit(&mut tx, &actor.0, kind.verb(), &detail, affected).await?;
    tx.commit().await?;
    tracing::info!(actor = %actor.0, action = kind.verb(), database = %db.name, affected, "console action");
    let base = state.config.base_path.as_str();
    let back = format!("{base}/db/{}/dead-letters", db.name);
    let body = html! {
        p role="status" data-field="outcome" { (summary) }
        p { a href=(back) { "Back to the dead letters" } }
    };
    let title = format!("{} · done", db.name);
    Ok(Html(layout(state, base, &title, body).into_string()))
}

#[allow(clippy::too_many_arguments)]
fn confirmation(
    state: &State,
    actor: &Actor,
    database: &str,
    kind: Kind,
    scope: &Scope,
    described: &str,
    (count, max_id, counted_at, fingerprint): (i64, i64, i64, &str),
    asked: Option<i64>,
) -> Markup {
    let base = state.config.base_path.as_str();
    let here = format!("{base}/db/{database}/dead-letters");
    let verb = match kind {
        Kind::Retry => "Retry",
        Kind::Purge => "Purge",
    };
    html! {
        @if let Some(asked) = asked {
            p.flag role="alert" { "The letters changed since you confirmed " (asked) ": nothing was done. Confirm again." }
        }
        p data-field="count" { (verb) " " strong { (count) } " dead " (letters(count)) " matching " (described) "?" }
        @if kind == Kind::Purge {
            p { "A purge deletes them for good." }
        }
        form method="post" action={ (here) "/" (kind.verb()) } {
            input type="hidden" name="csrf" value=(state.csrf_token(actor));
            input type="hidden" name="confirm" value=(count);
            input type="hidden" name="max_id" value=(max_id);
            input type="hidden" name="counted_at" value=(counted_at);
            input type="hidden" name="fingerprint" value=(fingerprint);
            @match scope {
                Scope::Selected(ids) => {
                    input type="hidden" name="scope" value="selected";
                    @for id in ids { input type="hidden" name="id" value=(id); }
                }
                Scope::All(params) => {
                    input type="hidden" name="scope" value="all";
                    @for (k, v) in params.pairs() { input type="hidden" name=(k) value=(v); }
                }
            }
            div.actions {
                button class=(if kind == Kind::Purge { "danger" } else { "" }) type="submit" { (verb) " " (count) }
                a href=(here) { "Cancel" }
            }
        }
    }
}

fn letters(n: i64) -> &'static str {
    if n == 1 { "letter" } else { "letters" }
}

fn action_failure(e: dlq::actions::ActionError) -> Failure {
    use dlq::actions::ActionError;
    match e {
        ActionError::NotFound(_) => Failure::not_found(e.to_string()),
        ActionError::NotDead { .. } | ActionError::NothingMatches => {
            Failure::new(StatusCode::CONFLICT, e.to_string())
        }
        ActionError::Rebuild(_) => Failure::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        ActionError::Database(e) => Failure::from(e),
        e => Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
