//! PostgreSQL as a container: the official image's interface (`POSTGRES_HOST_AUTH_METHOD`,
//! port 5432, `postgres` plus flags as the command) with the kit's settings.

use std::net::SocketAddr;
use std::time::Duration;

use super::{ServerContainer, Spec};
use crate::postgres::select_one;
use crate::{PostgresConfig, Result};

/// The image to run unless `TESTKIT_POSTGRES_IMAGE` names another.
pub(crate) const DEFAULT_IMAGE: &str = "postgres:18";
const ENV_IMAGE: &str = "TESTKIT_POSTGRES_IMAGE";
const PORT: u16 = 5432;
/// A first start runs initdb inside the container: longer than a process start.
const READY_DEADLINE: Duration = Duration::from_secs(60);

pub(crate) struct PgContainer {
    server: ServerContainer,
    url: String,
    addr: SocketAddr,
}

impl PgContainer {
    /// Runs the image with the same settings as the process backend (`fsync=off`,
    /// `full_page_writes=off` unless durable, `shared_buffers`) and waits for `SELECT 1`.
    pub(crate) async fn start(config: &PostgresConfig) -> Result<PgContainer> {
        let image = std::env::var(ENV_IMAGE)
            .ok()
            .filter(|i| !i.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let mut args = vec!["postgres".to_owned()];
        if !config.durable {
            for setting in ["fsync=off", "full_page_writes=off"] {
                args.extend(["-c".to_owned(), setting.to_owned()]);
            }
        }
        let buffers = config.shared_buffers_mb.unwrap_or(32);
        args.extend(["-c".to_owned(), format!("shared_buffers={buffers}MB")]);
        for setting in crate::postgres::logical_decoding_settings(config) {
            args.extend(["-c".to_owned(), (*setting).to_owned()]);
        }
        let server = ServerContainer::run(Spec {
            image,
            server: "postgres",
            name_prefix: "testkit-postgres",
            ports: vec![PORT],
            env: vec![("POSTGRES_HOST_AUTH_METHOD".into(), "trust".into())],
            volumes: Vec::new(),
            args,
        })
        .await?;
        let mut pg = PgContainer {
            server,
            url: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        pg.wait_ready().await?;
        Ok(pg)
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn kill(&mut self) -> Result<()> {
        self.server.kill()
    }

    /// `signal` as for the process backend: SIGINT fast, SIGQUIT immediate shutdown.
    pub(crate) async fn stop(&mut self, signal: &str, deadline: Duration) -> Result<()> {
        self.server.stop(signal, deadline).await
    }

    /// Fast shutdown when running, start (same host port), read the port back, wait for
    /// `SELECT 1`.
    pub(crate) async fn restart(&mut self, deadline: Duration) -> Result<()> {
        self.server.stop("SIGINT", deadline).await?;
        self.server.start().await?;
        self.wait_ready().await
    }

    pub(crate) fn pause(&self) -> Result<()> {
        self.server.pause()
    }

    pub(crate) fn resume(&self) -> Result<()> {
        self.server.resume()
    }

    /// Reads the published port, then polls `SELECT 1` until it answers; fails early with
    /// the container's log when it stops.
    async fn wait_ready(&mut self) -> Result<()> {
        let port = self.server.host_port(PORT).await?;
        self.addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let url = &self.url;
        self.server
            .wait_ready(READY_DEADLINE, || select_one(url))
            .await
    }
}
