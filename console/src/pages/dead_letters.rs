//! `GET /db/{database}/dead-letters`: the filters, a page of letters (keyset pagination:
//! "next" starts after the last one shown, no OFFSET, no count), the action forms;
//! `GET /db/{database}/dead-letters/{id}`: one letter, its headers, payload, errors and
//! history.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State as Extract};
use axum::response::Html;
use maud::{Markup, html};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::overview::query_value;
use super::{database, inert, inert_block, layout, time_text};
use crate::error::Failure;
use crate::security::{Actor, State};
use crate::store;

/// The list's filters as the query string (and the "all matching" forms) carry them; an
/// empty field does not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct FilterParams {
    pub(crate) source: String,
    pub(crate) consumer: String,
    pub(crate) reason: String,
    pub(crate) subject: String,
    pub(crate) key: String,
    pub(crate) status: String,
    /// Last failed at or after (RFC 3339, or `YYYY-MM-DDTHH:MM` as a browser's
    /// datetime-local input sends it, taken as UTC).
    pub(crate) since: String,
    /// Last failed before.
    pub(crate) until: String,
    /// Text in the error chain.
    pub(crate) error: String,
}

/// The page: the filters and where it starts.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct ListParams {
    #[serde(flatten)]
    pub(crate) filter: FilterParams,
    /// The cursor: the last letter of the previous page (`<last_failed_at>,<id>`).
    pub(crate) after: String,
}

impl FilterParams {
    /// The filter these fields describe, or what is wrong with them.
    pub(crate) fn filter(&self) -> Result<dlq::store::Filter, Failure> {
        let text = |s: &str| {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_owned())
        };
        let source = text(&self.source);
        if let Some(s) = &source
            && s != "relay"
            && s != "consumer"
        {
            return Err(Failure::bad_request(format!(
                "source must be relay or consumer, not {:?}",
                inert(s)
            )));
        }
        let status = text(&self.status);
        if let Some(s) = &status
            && !["dead", "retry_requested", "retried"].contains(&s.as_str())
        {
            return Err(Failure::bad_request(format!(
                "status must be dead, retry_requested or retried, not {:?}",
                inert(s)
            )));
        }
        Ok(dlq::store::Filter {
            source,
            consumer: text(&self.consumer),
            reason: text(&self.reason),
            subject: text(&self.subject),
            partition_key: text(&self.key),
            status,
            since: parse_time("since", &self.since)?,
            until: parse_time("until", &self.until)?,
            error_text: text(&self.error),
            ids: None,
            max_id: None,
        })
    }

    /// The fields as `(name, value)`, non-empty ones only: for links and hidden inputs.
    pub(crate) fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("source", self.source.as_str()),
            ("consumer", &self.consumer),
            ("reason", &self.reason),
            ("subject", &self.subject),
            ("key", &self.key),
            ("status", &self.status),
            ("since", &self.since),
            ("until", &self.until),
            ("error", &self.error),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect()
    }

    /// Reads the fields from a form's pairs.
    pub(crate) fn from_pairs(pairs: &[(String, String)]) -> Self {
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        FilterParams {
            source: get("source"),
            consumer: get("consumer"),
            reason: get("reason"),
            subject: get("subject"),
            key: get("key"),
            status: get("status"),
            since: get("since"),
            until: get("until"),
            error: get("error"),
        }
    }

    /// In words, for a confirmation: `reason = decode, consumer = email`.
    pub(crate) fn describe(&self) -> String {
        let pairs = self.pairs();
        if pairs.is_empty() {
            return "every dead letter".to_owned();
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k} = {}", inert(v.trim())))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn parse_time(field: &str, text: &str) -> Result<Option<OffsetDateTime>, Failure> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(Some(t));
    }
    // A browser's datetime-local: no offset, taken as UTC.
    let local = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    time::PrimitiveDateTime::parse(text, &local)
        .map(|t| Some(t.assume_utc()))
        .map_err(|_| {
            Failure::bad_request(format!(
                "{field}: {:?} is not a time (use 2026-12-01T08:00 or RFC 3339)",
                inert(text)
            ))
        })
}

fn parse_cursor(text: &str) -> Result<Option<dlq::store::Cursor>, Failure> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || Failure::bad_request(format!("after: {:?} is not a page cursor", inert(text)));
    let (at, id) = text.rsplit_once(',').ok_or_else(bad)?;
    Ok(Some(dlq::store::Cursor {
        last_failed_at: OffsetDateTime::parse(at, &Rfc3339).map_err(|_| bad())?,
        id: id.parse().map_err(|_| bad())?,
    }))
}

/// `GET /db/{database}/dead-letters`.
pub(crate) async fn list(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let filter = params.filter.filter()?;
    let after = parse_cursor(params.after.trim())?;
    let page_size = state.config.page_size;
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    // One more than a page: whether there is a next one, without a count.
    let mut letters = dlq::store::list_page(&mut tx, &filter, after, page_size + 1).await?;
    tx.commit().await?;
    let more = letters.len() as i64 > page_size;
    letters.truncate(page_size as usize);
    let base = state.config.base_path.as_str();
    let here = format!("{base}/db/{}/dead-letters", db.name);
    let next = more.then(|| {
        let last = letters.last().map(|l| (l.last_failed_at, l.id));
        let mut query: Vec<String> = params
            .filter
            .pairs()
            .iter()
            .map(|(k, v)| format!("{k}={}", query_value(v)))
            .collect();
        if let Some((at, id)) = last {
            query.push(format!(
                "after={}",
                query_value(&format!("{},{id}", time_text(at)))
            ));
        }
        format!("{here}?{}", query.join("&"))
    });
    let token = state.csrf_token(&actor);
    let actions = state.config.allow_actions;
    let f = &params.filter;
    let body = html! {
        form.filters method="get" action=(here) aria-label="Filter dead letters" {
            label { "Source"
                select name="source" {
                    option value="" selected[f.source.is_empty()] { "any" }
                    option value="relay" selected[f.source == "relay"] { "relay" }
                    option value="consumer" selected[f.source == "consumer"] { "consumer" }
                }
            }
            label { "Status"
                select name="status" {
                    option value="" selected[f.status.is_empty()] { "any" }
                    @for s in ["dead", "retry_requested", "retried"] {
                        option value=(s) selected[f.status == s] { (s) }
                    }
                }
            }
            label { "Consumer" input name="consumer" value=(f.consumer); }
            label { "Reason" input name="reason" value=(f.reason); }
            label { "Subject" input name="subject" value=(f.subject); }
            label { "Key" input name="key" value=(f.key); }
            label { "Failed since (UTC)" input type="datetime-local" name="since" value=(f.since); }
            label { "Failed before (UTC)" input type="datetime-local" name="until" value=(f.until); }
            label { "Error contains" input name="error" value=(f.error); }
            button type="submit" { "Filter" }
            a href=(here) { "Clear" }
        }
        @if letters.is_empty() {
            p role="status" { "No dead letters match." }
        } @else {
            form method="post" action={ (here) "/retry" } id="selection" {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="scope" value="selected";
                div.wrap { table {
                    caption.skip { "Dead letters, newest failure first" }
                    thead { tr {
                        @if actions { th scope="col" { span.skip { "Select" } } }
                        th.num scope="col" { "Id" }
                        th scope="col" { "Consumer" }
                        th scope="col" { "Subject" }
                        th scope="col" { "Key" }
                        th scope="col" { "Reason" }
                        th.num scope="col" { "Attempts" }
                        th scope="col" { "Status" }
                        th scope="col" { "Last failed" }
                    } }
                    tbody {
                        @for l in &letters {
                            tr data-id=(l.id) {
                                @if actions {
                                    td { input type="checkbox" name="id" value=(l.id) id={ "select-" (l.id) } aria-label={ "Select dead letter " (l.id) }; }
                                }
                                td.num { a href={ (here) "/" (l.id) } { (l.id) } }
                                td { (inert(&l.consumer)) }
                                td { (inert(&l.subject)) }
                                td { (inert(l.partition_key.as_deref().unwrap_or(""))) }
                                td { (inert(&l.reason)) }
                                td.num { (l.attempts) }
                                td { (inert(&l.status)) }
                                td { (time_text(l.last_failed_at)) }
                            }
                        }
                    }
                } }
                @if actions {
                    div.actions {
                        button type="submit" { "Retry selected" }
                        button.danger type="submit" formaction={ (here) "/purge" } { "Purge selected…" }
                    }
                }
            }
            @if let Some(next) = &next {
                p { a href=(next) rel="next" { "Next page" } }
            }
            @if actions {
                (all_matching_forms(&here, &token, f))
            }
        }
    };
    let title = format!("{} · dead letters", db.name);
    Ok(Html(layout(&state, base, &title, body).into_string()))
}

/// "Retry all matching" and "Purge all matching": the server counts first and asks.
fn all_matching_forms(here: &str, token: &str, f: &FilterParams) -> Markup {
    html! {
        div.actions aria-label="Act on every match" {
            @for (path, label, class) in [("retry", "Retry all matching…", ""), ("purge", "Purge all matching…", "danger")] {
                form method="post" action={ (here) "/" (path) } {
                    input type="hidden" name="csrf" value=(token);
                    input type="hidden" name="scope" value="all";
                    @for (k, v) in f.pairs() {
                        input type="hidden" name=(k) value=(v);
                    }
                    button class=(class) type="submit" { (label) }
                }
            }
        }
    }
}

/// `GET /db/{database}/dead-letters/{id}`.
pub(crate) async fn detail(
    Extract(state): Extract<Arc<State>>,
    Extension(actor): Extension<Actor>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let db = database(&state, &name)?;
    let id: i64 = id
        .parse()
        .map_err(|_| Failure::bad_request(format!("{:?} is not a dead-letter id", inert(&id))))?;
    let mut tx = store::begin(&db.pool, state.config.statement_timeout).await?;
    let letter = dlq::store::get(&mut tx, id).await?;
    tx.commit().await?;
    let letter =
        letter.ok_or_else(|| Failure::not_found(format!("no dead letter with id {id}")))?;
    let base = state.config.base_path.as_str();
    let here = format!("{base}/db/{}/dead-letters", db.name);
    let token = state.csrf_token(&actor);
    let body = html! {
        p { a href=(here) { "← all dead letters" } }
        dl.fields {
            dt { "Message id" } dd { (inert(&letter.message_id)) }
            dt { "Source" } dd { (inert(&letter.source)) " (" (inert(&letter.consumer)) ")" }
            dt { "Subject" } dd data-field="subject" { (inert(&letter.subject)) }
            dt { "Key" } dd { (inert(letter.partition_key.as_deref().unwrap_or(""))) }
            dt { "Reason" } dd { (inert(&letter.reason)) }
            dt { "Status" } dd data-field="status" { (inert(&letter.status)) }
            dt { "Attempts" } dd { (letter.attempts) }
            dt { "First failed" } dd { (time_text(letter.first_failed_at)) }
            dt { "Last failed" } dd { (time_text(letter.last_failed_at)) }
        }
        @if state.config.allow_actions && letter.status == "dead" {
            form.actions method="post" action={ (here) "/retry" } {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="scope" value="selected";
                input type="hidden" name="id" value=(letter.id);
                button type="submit" { "Retry" }
                button.danger type="submit" formaction={ (here) "/purge" } { "Purge…" }
            }
        }
        h2 { "Error chain" }
        ol {
            @for e in letter.error_chain.as_array().into_iter().flatten() {
                li { pre { (inert_block(e.as_str().unwrap_or_default())) } }
            }
        }
        h2 { "Headers" }
        div.wrap { table {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
            tbody {
                @for (k, v) in letter.headers.as_object().into_iter().flatten() {
                    tr { td { (inert(k)) } td { (inert(v.as_str().unwrap_or_default())) } }
                }
            }
        } }
        h2 { "Payload (" (letter.payload.len()) " bytes)" }
        (payload(&letter.payload, state.config.show_payloads))
        h2 { "History" }
        ol {
            @for h in letter.history.as_array().into_iter().flatten() {
                li { code { (inert(&h.to_string())) } }
            }
        }
    };
    let title = format!("{} · dead letter {id}", db.name);
    Ok(Html(layout(&state, base, &title, body).into_string()))
}

/// Pretty JSON, text, or hex; or a note when payloads are hidden.
fn payload(bytes: &[u8], shown: bool) -> Markup {
    if !shown {
        return html! { p { "Hidden: start the console with --show-payloads to see payloads." } };
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| text.to_owned()),
            Err(_) => text.to_owned(),
        },
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            return html! { p { "Not UTF-8; hex:" } pre data-field="payload" { (hex) } };
        }
    };
    html! { pre data-field="payload" { (inert_block(&text)) } }
}
