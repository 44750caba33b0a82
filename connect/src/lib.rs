//! NATS connection settings shared by the relay and inbox consumers.
//!
//! [`NatsConfig`] holds the server URL and one auth method (user/password, token, creds file
//! or nkey seed) plus TLS options; [`NatsConfig::connect`] validates them and connects with
//! reconnects forever, so a service starts even while the broker is down.
//!
//! Secrets are never printed: `Debug` and [`ConnectError`] show URLs through [`redact_url`]
//! (a password or token in the URL becomes `***`) and other secrets as `<redacted>`. TLS
//! settings (a CA or a client certificate) make TLS mandatory, so a `nats://` URL cannot be
//! downgraded to plaintext.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The settings contradict each other; the message says how.
    #[error("invalid NATS configuration: {0}")]
    Config(String),
    /// The client could not be set up (e.g. an unreadable creds file or TLS certificate).
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The server URL(s), with any password or token replaced by `***` ([`redact_url`]).
        url: String,
        /// What failed.
        reason: String,
    },
}

/// How to reach NATS. Secrets are never printed: `Debug` shows the URL through
/// [`redact_url`] and the password, token and nkey seed as `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`. Defaults to
    /// `nats://127.0.0.1:4222` when empty.
    pub url: String,
    /// User name for user/password auth.
    pub user: Option<String>,
    /// Password for user/password auth.
    pub password: Option<String>,
    /// Token auth.
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// CA certificate(s) to trust (PEM). Setting it makes TLS mandatory, as `tls_required`
    /// does: the client upgrades every connection to TLS, even on a `nats://` URL, and never
    /// connects in plaintext.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key`. Setting it makes TLS mandatory, like
    /// `tls_ca`.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM), with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Refuse a connection that is not TLS (implied by `tls_ca` and `tls_cert`).
    pub tls_required: bool,
    /// The connection name shown by the server (e.g. the relay instance id).
    pub name: Option<String>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &redact(&self.nkey_seed))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("name", &self.name)
            .finish()
    }
}

impl NatsConfig {
    /// The server URL, defaulted.
    pub fn url(&self) -> &str {
        if self.url.is_empty() {
            "nats://127.0.0.1:4222"
        } else {
            &self.url
        }
    }

    /// [`url`](Self::url) with any password or token replaced by `***`: safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url())
    }

    /// Refuses contradictory auth settings.
    pub fn validate(&self) -> Result<(), ConnectError> {
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(ConnectError::Config(
                "choose one NATS auth method: user/password, token, creds file or nkey".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConnectError::Config(
                "NATS user and password go together".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConnectError::Config(
                "NATS TLS client cert and key go together".into(),
            ));
        }
        Ok(())
    }

    /// Connects, retrying in the background if the server is not up yet (the client
    /// reconnects by itself after any later disconnect too).
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        self.validate()?;
        let url = self.redacted_url();
        let fail = |reason: String| ConnectError::Connect {
            url: url.clone(),
            reason,
        };
        let mut options = ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .reconnect_delay_callback(|attempts| {
                // 0, 50 ms, 100 ms ... capped at 2 s: a restarted broker is found quickly.
                Duration::from_millis((attempts as u64 * 50).min(2000))
            });
        if let Some(name) = &self.name {
            options = options.name(name);
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| fail(format!("reading creds file {}: {e}", path.display())))?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        // A CA or client certificate means TLS is wanted: without `require_tls` async-nats
        // would upgrade only if the server's INFO asks for it, which a man in the middle can
        // strip.
        if self.requires_tls() {
            options = options.require_tls(true);
        }
        let servers = self.server_addrs().map_err(|e| fail(e.to_string()))?;
        options
            .connect(servers)
            .await
            .map_err(|e| fail(e.to_string()))
    }

    /// Whether [`connect`](Self::connect) refuses a connection that is not TLS: when
    /// `tls_required` is set, or a CA or client certificate is given.
    pub fn requires_tls(&self) -> bool {
        self.tls_required || self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// The server URLs, split at commas: async-nats parses a single `&str` as one URL.
    /// An invalid one is a [`ConnectError::Config`] naming it through [`redact_url`].
    pub fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
        self.url()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| ConnectError::Config(format!("NATS URL {:?}: {e}", redact_url(u))))
            })
            .collect()
    }
}

/// `url` — one NATS URL or several, comma-separated — with the secret part of each one's
/// userinfo replaced by `***`: `nats://user:pass@host` becomes `nats://user:***@host`, and a
/// token-only `nats://token@host` becomes `nats://***@host`. A URL without a scheme
/// (`user:pass@host`, as async-nats accepts) is handled the same way.
///
/// Guarantees: nothing between the scheme's `://` (or the start) and the last `@` before the
/// first `/`, `?` or `#` — where a URL keeps its credentials — survives except a user name
/// followed by `:`; everything else is returned unchanged, separators and spaces included.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_len].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let kept = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{kept}{}", &url[..start], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_separated_urls_are_several_servers() {
        let config = NatsConfig {
            url: "nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224".into(),
            ..NatsConfig::default()
        };
        let servers = config.server_addrs().expect("valid");
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[1].port(), 4223);
        let bad = NatsConfig {
            url: "nats://127.0.0.1:4222,nats://host:notaport".into(),
            ..NatsConfig::default()
        };
        assert!(bad.server_addrs().is_err());
    }

    #[test]
    fn debug_redacts_passwords_and_tokens_in_the_url() {
        let config = NatsConfig {
            url: "nats://relay:hunter2@10.0.0.1:4222, tls://t0ken-secret@10.0.0.2:4222,\
                  ops:pa:ss@10.0.0.3,nats://10.0.0.4:4222/path@x"
                .into(),
            ..NatsConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("t0ken-secret") && !shown.contains("ss@"),
            "{shown}"
        );
        for expected in [
            "nats://relay:***@10.0.0.1:4222",
            "tls://***@10.0.0.2:4222",
            "ops:***@10.0.0.3",
            "nats://10.0.0.4:4222/path@x",
        ] {
            assert!(shown.contains(expected), "{shown} lacks {expected}");
        }
    }

    #[test]
    fn an_invalid_url_error_does_not_show_its_password() {
        let bad = NatsConfig {
            url: "nats://relay:hunter2@host:notaport".into(),
            ..NatsConfig::default()
        };
        let err = bad.server_addrs().expect_err("invalid port").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("nats://relay:***@host:notaport"), "{err}");
    }

    #[test]
    fn debug_redacts_secrets_and_auth_methods_are_exclusive() {
        let config = NatsConfig {
            password: Some("hunter2".into()),
            user: Some("relay".into()),
            token: Some("tok-secret".into()),
            nkey_seed: Some("SUSECRET".into()),
            ..NatsConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2")
                && !shown.contains("tok-secret")
                && !shown.contains("SUSECRET")
        );
        assert!(config.validate().is_err(), "two auth methods are refused");
        let half = NatsConfig {
            user: Some("u".into()),
            ..NatsConfig::default()
        };
        assert!(
            half.validate().is_err(),
            "a user without a password is refused"
        );
        let cert_only = NatsConfig {
            tls_cert: Some("c.pem".into()),
            ..NatsConfig::default()
        };
        assert!(cert_only.validate().is_err());
    }
}
