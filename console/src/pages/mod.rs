//! The console's pages: server-rendered HTML (maud escapes every value), one layout.
//!
//! - `overview`: every database's outbox backlog, relays and dead letters, with red flags.
//! - `dead_letters`: the filtered, keyset-paginated list and the detail page.
//! - `relays`: instances, the partition grid, keys waiting out a backoff, "retry now".
//! - `consumers`: durable consumers (from JetStream) beside their inboxes.
//! - `actions`: retry and purge (a selection, or all matching a filter after a count).
//!
//! Pages that change by themselves (overview, relays, consumers) refresh their content every few
//! seconds with htmx (vendored, served from the binary); without JavaScript they are plain
//! pages, and every action is a plain form.

pub(crate) mod actions;
pub(crate) mod consumers;
pub(crate) mod dead_letters;
pub(crate) mod overview;
pub(crate) mod relays;
pub(crate) mod sparkline;

use axum::http::header;
use axum::response::IntoResponse;
use maud::{DOCTYPE, Markup, html};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::Database;
use crate::error::Failure;
use crate::security::State;

const STYLESHEET: &str = include_str!("console.css");
/// The console's own script: a live region whose refresh fails says so.
const SCRIPT: &str = include_str!("console.js");
/// htmx 2.0.8 (`console/vendor/README.md` says where it comes from).
const HTMX: &str = include_str!("../../vendor/htmx-2.0.8.min.js");
/// How often a live page refreshes its content.
const REFRESH: &str = "every 5s";
/// htmx without `eval`, without its inline style (the CSP allows neither) and without a
/// history cache (no page content kept in the browser's storage).
const HTMX_CONFIG: &str = r#"{"allowEval":false,"includeIndicatorStyles":false,"historyCacheSize":0,"refreshOnHistoryMiss":true}"#;

/// `GET /static/console.css`.
pub(crate) async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
}

/// `GET /static/htmx.min.js`.
pub(crate) async fn htmx() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        HTMX,
    )
}

/// `GET /static/console.js`.
pub(crate) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// `body` refreshed in place every few seconds from `url` (the page's own address): the
/// server renders the whole page again and htmx swaps this region only.
pub(crate) fn live(url: &str, body: Markup) -> Markup {
    html! {
        div #live hx-get=(url) hx-trigger=(REFRESH) hx-select="#live" hx-swap="outerHTML" {
            (body)
        }
    }
}

/// A whole page: `title`, the navigation, `body`.
pub(crate) fn layout(state: &State, base: &str, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · outbox console" }
                meta name="htmx-config" content=(HTMX_CONFIG);
                link rel="stylesheet" href={ (base) "/static/console.css" };
                script src={ (base) "/static/htmx.min.js" } defer {}
                script src={ (base) "/static/console.js" } defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Databases" {
                        a href={ (base) "/" } { strong { "outbox console" } }
                        @for db in &state.config.databases {
                            span.db {
                                (db.name) ": "
                                a href={ (base) "/db/" (db.name) "/relays" } { "relays" }
                                " · "
                                a href={ (base) "/db/" (db.name) "/consumers" } { "consumers" }
                                " · "
                                a href={ (base) "/db/" (db.name) "/dead-letters" } { "dead letters" }
                            }
                        }
                    }
                    @if !state.config.allow_actions {
                        p.mode role="status" { "Read-only: retry and purge need --allow-actions." }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The database named `name`, or 404.
pub(crate) fn database<'a>(state: &'a State, name: &str) -> Result<&'a Database, Failure> {
    state
        .config
        .databases
        .iter()
        .find(|db| db.name == name)
        .ok_or_else(|| Failure::not_found(format!("no database named {}", inert(name))))
}

/// Dead-letter text made inert: control and invisible characters as escapes (maud then
/// HTML-escapes it).
pub(crate) fn inert(text: &str) -> String {
    dlq::display::line(text)
}

/// Like [`inert`], keeping line breaks: for a payload or a multi-line error.
pub(crate) fn inert_block(text: &str) -> String {
    dlq::display::block(text)
}

/// A time as RFC 3339, UTC.
pub(crate) fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A duration in seconds, short: `0.4s`, `12s`, `5m`, `3h`, `2d`.
pub(crate) fn age_text(seconds: f64) -> String {
    match seconds {
        s if s < 10.0 => format!("{s:.1}s"),
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.0}h", s / 3600.0),
        s => format!("{:.0}d", s / 86_400.0),
    }
}
