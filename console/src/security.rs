//! Who is asking, and whether a POST may act: authentication (basic, or a trusted proxy's
//! header), the read-only switch, the Origin check and CSRF tokens.
//!
//! A CSRF token is HMAC-SHA256(secret, user): a page only the user can load carries it, a
//! page of another site cannot read it, and it is worthless to another user. Together with
//! the Origin check (a browser names the page a POST comes from), a form on another site
//! cannot act through an operator's logged-in browser.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as Extract;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Access, Config};
use crate::error::Failure;

/// The console's shared state: its settings, the publish rates counted so far, the CSRF
/// secret.
pub(crate) struct State {
    pub(crate) config: Config,
    /// The publish rates' settled minutes.
    pub(crate) rates: crate::rates::Rates,
    secret: Vec<u8>,
}

impl State {
    pub(crate) fn new(config: Config) -> Self {
        let secret = config.csrf_secret.clone().unwrap_or_else(|| {
            let mut bytes = vec![0u8; 32];
            // Without randomness no token can be trusted: refuse to serve rather than guess.
            getrandom::fill(&mut bytes).expect("the operating system's random source");
            bytes
        });
        State {
            config,
            rates: crate::rates::Rates::default(),
            secret,
        }
    }

    /// The CSRF token of `actor`.
    pub(crate) fn csrf_token(&self, actor: &Actor) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(actor.0.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// Refuses a POST whose token is not `actor`'s.
    pub(crate) fn check_csrf(&self, actor: &Actor, token: &str) -> Result<(), Failure> {
        if constant_time_eq(self.csrf_token(actor).as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Failure::forbidden(
                "the form's CSRF token is missing or not yours: reload the page and try again",
            ))
        }
    }
}

/// The authenticated user (`anonymous` with open access), as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor(pub(crate) String);

/// Authenticates every request and, for a POST, checks that actions are allowed and that it
/// comes from the console's own pages. The [`Actor`] goes into the request's extensions.
pub(crate) async fn guard(
    Extract(state): Extract<Arc<State>>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    if let Err(failure) = check_host(&state.config, request.headers()) {
        return failure.into_response();
    }
    let actor = match authenticate(&state.config.access, request.headers()) {
        Ok(actor) => actor,
        Err(response) => return *response,
    };
    if request.method() == Method::POST {
        if !state.config.allow_actions {
            return Failure::forbidden(
                "the console is read-only: start it with --allow-actions to retry or purge",
            )
            .into_response();
        }
        if let Err(failure) = check_origin(request.headers()) {
            return failure.into_response();
        }
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        return Failure::new(StatusCode::METHOD_NOT_ALLOWED, "only GET and POST").into_response();
    }
    request.extensions_mut().insert(actor);
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // No framing by other sites, no sniffing, no script but our own, no referrer leaks.
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

fn authenticate(access: &Access, headers: &HeaderMap) -> Result<Actor, Box<Response>> {
    match access {
        Access::Open => Ok(Actor("anonymous".to_owned())),
        Access::Basic { user, password } => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            let matches = given
                .as_deref()
                .and_then(|g| g.split_once(':'))
                .is_some_and(|(u, p)| {
                    // Both compared, whatever the first gives: no early exit to time.
                    let user_ok = constant_time_eq(u.as_bytes(), user.as_bytes());
                    let password_ok = constant_time_eq(p.as_bytes(), password.as_bytes());
                    user_ok && password_ok
                });
            if matches {
                Ok(Actor(user.clone()))
            } else {
                let mut response = Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication required (HTTP basic)",
                )
                .into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(
                        "Basic realm=\"outbox console\", charset=\"UTF-8\"",
                    ),
                );
                Err(Box::new(response))
            }
        }
        Access::TrustedHeader(name) => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| Actor(v.to_owned()))
            .ok_or_else(|| {
                Box::new(
                    Failure::new(
                        StatusCode::UNAUTHORIZED,
                        format!(
                            "no user in the {name} header: reach the console through its proxy"
                        ),
                    )
                    .into_response(),
                )
            }),
    }
}

/// The `Host` must be one the console answers to (see [`Config::allowed_hosts`]): a page
/// of another site whose name is made to resolve to the console's address (DNS rebinding)
/// sends its own name, and is refused before it can read a page or a token.
fn check_host(config: &Config, headers: &HeaderMap) -> Result<(), Failure> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let name = host_name(host);
    let allowed = if !config.allowed_hosts.is_empty() {
        config
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    } else if matches!(config.access, Access::Open | Access::TrustedHeader(_)) {
        // A rebound page can set any header itself: only basic auth, whose credentials the
        // browser keeps per site, is safe under any name.
        name.eq_ignore_ascii_case("localhost")
            || name == "[::1]"
            || name
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    } else {
        true
    };
    if allowed {
        Ok(())
    } else {
        Err(Failure::forbidden(format!(
            "host {:?} is not one this console answers to: reach it as localhost, or start it with --public-host {}",
            dlq::display::line(host),
            dlq::display::line(name)
        )))
    }
}

/// `host` without its port: `console.example`, `127.0.0.1`, `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// A POST must come from a page of this host: its `Origin` (or, without one, its
/// `Referer`) names the host the request was sent to.
fn check_origin(headers: &HeaderMap) -> Result<(), Failure> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Failure::bad_request("no Host header"))?;
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Failure::forbidden("a POST without Origin or Referer is refused (cross-site check)")
        })?;
    let from_host = from
        .strip_prefix("https://")
        .or_else(|| from.strip_prefix("http://"))
        .map(|rest| rest.split('/').next().unwrap_or_default());
    if from_host.is_some_and(|h| h.eq_ignore_ascii_case(host)) {
        Ok(())
    } else {
        Err(Failure::forbidden(format!(
            "a POST from {from:?} is refused: it is not this console ({host})"
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn a_post_must_name_this_host_as_its_origin() {
        let ok = headers(&[
            ("host", "127.0.0.1:3000"),
            ("origin", "http://127.0.0.1:3000"),
        ]);
        assert!(check_origin(&ok).is_ok());
        let referer = headers(&[
            ("host", "console.example"),
            ("referer", "https://console.example/db/orders/dead-letters"),
        ]);
        assert!(check_origin(&referer).is_ok());
        for bad in [
            headers(&[
                ("host", "127.0.0.1:3000"),
                ("origin", "http://evil.example"),
            ]),
            headers(&[
                ("host", "127.0.0.1:3000"),
                ("origin", "http://127.0.0.1:3000.evil"),
            ]),
            headers(&[("host", "127.0.0.1:3000"), ("origin", "null")]),
            headers(&[("host", "127.0.0.1:3000")]),
        ] {
            assert_eq!(
                check_origin(&bad).map_err(|f| f.status),
                Err(StatusCode::FORBIDDEN)
            );
        }
    }

    #[test]
    fn an_open_console_answers_to_loopback_names_only() {
        let open = Config::new(Vec::new());
        let host = |h: &str| headers(&[("host", h)]);
        for ok in [
            "localhost:3000",
            "127.0.0.1:3000",
            "127.0.0.2",
            "[::1]:3000",
            "LOCALHOST",
        ] {
            assert!(check_host(&open, &host(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:3000",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(check_host(&open, &host(bad)).is_err(), "{bad}");
        }
        let public = Config {
            allowed_hosts: vec!["console.example".into()],
            ..Config::new(Vec::new())
        };
        assert!(check_host(&public, &host("console.example:8443")).is_ok());
        assert!(check_host(&public, &host("localhost:3000")).is_err());
        let proxied = Config {
            access: Access::TrustedHeader("x-user".into()),
            ..Config::new(Vec::new())
        };
        assert!(check_host(&proxied, &host("evil.example:3000")).is_err());
        assert!(check_host(&proxied, &host("127.0.0.1:3000")).is_ok());
    }

    #[test]
    fn tokens_are_per_user_and_per_secret() {
        let state = |secret: &[u8]| {
            State::new(Config {
                csrf_secret: Some(secret.to_vec()),
                ..Config::new(Vec::new())
            })
        };
        let (a, b) = (Actor("ann".into()), Actor("bob".into()));
        let s = state(b"one");
        assert!(s.check_csrf(&a, &s.csrf_token(&a)).is_ok());
        assert!(s.check_csrf(&b, &s.csrf_token(&a)).is_err());
        assert!(s.check_csrf(&a, "").is_err());
        assert!(state(b"two").check_csrf(&a, &s.csrf_token(&a)).is_err());
    }
}
