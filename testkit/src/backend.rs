//! Which way the kit runs its servers: local processes (the default) or Docker containers.

use crate::{Error, Result};

/// The environment variable that picks the backend when a config leaves it unset.
pub const ENV_BACKEND: &str = "TESTKIT_BACKEND";

/// How [`Postgres`](crate::Postgres) and [`NatsServer`](crate::NatsServer) run a server.
///
/// Both backends give the same API and controls (kill, stop, restart, pause, resume). Chosen
/// per call with [`PostgresConfig::backend`](crate::PostgresConfig::backend) /
/// [`NatsServerConfig::backend`](crate::NatsServerConfig::backend), else by `TESTKIT_BACKEND`
/// (`process` or `containers`), else [`Backend::Process`]. `DATABASE_URL` / `NATS_URL`, when
/// set, still win over both: the external server is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backend {
    /// Child processes of the test on free loopback ports: PostgreSQL's binaries from the
    /// `postgresql` package, `nats-server` from `.tools/bin` or `PATH`.
    #[default]
    Process,
    /// Docker containers through the `testcontainers` crate (feature `containers`), from the
    /// images named by `TESTKIT_POSTGRES_IMAGE` / `TESTKIT_NATS_IMAGE` (defaults: the official
    /// `postgres:18` and `nats:2.15.1` images). Each port is published on a free host port
    /// that stays the same across restarts.
    Containers,
}

impl Backend {
    /// `explicit` if given, else the backend `TESTKIT_BACKEND` names, else the default.
    /// Fails with [`Error::Backend`] on an unknown name, or when containers are asked for
    /// but the crate was built without the `containers` feature.
    pub fn resolve(explicit: Option<Backend>) -> Result<Backend> {
        let backend = match explicit {
            Some(backend) => backend,
            None => Self::parse(std::env::var(ENV_BACKEND).ok().as_deref())?,
        };
        if backend == Backend::Containers && !cfg!(feature = "containers") {
            return Err(Error::Backend {
                reason: "the container backend needs the `containers` feature of outbox-toolkit-testkit (e.g. `cargo test --features outbox-toolkit-testkit/containers`)".into(),
            });
        }
        Ok(backend)
    }

    /// Parses a `TESTKIT_BACKEND` value: unset or empty and `process` give
    /// [`Backend::Process`], `containers` gives [`Backend::Containers`].
    pub fn parse(value: Option<&str>) -> Result<Backend> {
        match value.map(str::trim) {
            None | Some("") | Some("process") => Ok(Backend::Process),
            Some("containers") => Ok(Backend::Containers),
            Some(other) => Err(Error::Backend {
                reason: format!(
                    "{ENV_BACKEND}={other:?} is not a backend (use process or containers)"
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_names_and_refuses_others() {
        assert_eq!(Backend::parse(None).expect("unset"), Backend::Process);
        assert_eq!(Backend::parse(Some(" ")).expect("empty"), Backend::Process);
        assert_eq!(
            Backend::parse(Some("process")).expect("process"),
            Backend::Process
        );
        assert_eq!(
            Backend::parse(Some("containers")).expect("containers"),
            Backend::Containers
        );
        let error = Backend::parse(Some("docker")).expect_err("unknown");
        assert!(
            error.to_string().contains("TESTKIT_BACKEND=\"docker\""),
            "{error}"
        );
    }

    #[test]
    fn an_explicit_choice_wins_over_the_environment() {
        assert_eq!(
            Backend::resolve(Some(Backend::Process)).expect("process"),
            Backend::Process
        );
        let containers = Backend::resolve(Some(Backend::Containers));
        if cfg!(feature = "containers") {
            assert_eq!(containers.expect("containers"), Backend::Containers);
        } else {
            let error = containers.expect_err("feature off");
            assert!(
                error.to_string().contains("`containers` feature"),
                "{error}"
            );
        }
    }
}
