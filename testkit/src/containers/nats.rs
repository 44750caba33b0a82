//! `nats-server -js` as a container: the official image's interface (entrypoint
//! `nats-server`, client port 4222, monitor port 8222) with the kit's flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::{ServerContainer, Spec};
use crate::nats::healthz;
use crate::{Error, NatsServerConfig, Result};

/// The image to run unless `TESTKIT_NATS_IMAGE` names another.
pub(crate) const DEFAULT_IMAGE: &str = "nats:2.15.1";
pub(crate) const ENV_IMAGE: &str = "TESTKIT_NATS_IMAGE";
const CLIENT_PORT: u16 = 4222;
const MONITOR_PORT: u16 = 8222;
const READY_DEADLINE: Duration = Duration::from_secs(30);
const CONFIG_INSIDE: &str = "/etc/testkit-nats.conf";
const STORE_INSIDE: &str = "/data";

pub(crate) struct NatsContainer {
    /// Declared before `_dir`: the container (which mounts a file of it) goes first.
    server: ServerContainer,
    name: String,
    url: String,
    addr: SocketAddr,
    monitor_port: u16,
    store_dir: PathBuf,
    _dir: TempDir,
}

impl NatsContainer {
    /// Runs the image as `-js -sd /data` (a host dir) `-m 8222 --server_name testkit-<uuid>` plus `config`
    /// (`max_payload` through a mounted config file, then `extra_args`), waits for `/healthz`.
    pub(crate) async fn start(config: &NatsServerConfig) -> Result<NatsContainer> {
        let image = std::env::var(ENV_IMAGE)
            .ok()
            .filter(|i| !i.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let dir = tempfile::Builder::new()
            .prefix("testkit-nats-container-")
            .tempdir()
            .map_err(Error::io("creating a temp dir for a nats-server container"))?;
        let name = format!("testkit-{}", uuid::Uuid::now_v7().simple());
        // The store on the host, as for a process: it survives kill and restart, and tests can
        // look at it (files made by the container's user, root in the official image).
        let store_dir = dir.path().join("js");
        std::fs::create_dir(&store_dir)
            .map_err(Error::io(format!("creating {}", store_dir.display())))?;
        let mut args: Vec<String> = [
            "-js",
            "-sd",
            STORE_INSIDE,
            "-m",
            &MONITOR_PORT.to_string(),
            "--server_name",
            &name,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let mut volumes = vec![(store_dir.display().to_string(), STORE_INSIDE.to_owned())];
        if let Some(max_payload) = config.max_payload {
            let file = dir.path().join("nats.conf");
            std::fs::write(&file, format!("max_payload: {max_payload}\n"))
                .map_err(Error::io(format!("writing {}", file.display())))?;
            volumes.push((file.display().to_string(), CONFIG_INSIDE.to_owned()));
            args.extend(["-c".to_owned(), CONFIG_INSIDE.to_owned()]);
        }
        args.extend(config.extra_args.iter().cloned());
        let server = ServerContainer::run(Spec {
            image,
            server: "nats-server",
            name_prefix: "testkit-nats",
            ports: vec![CLIENT_PORT, MONITOR_PORT],
            env: Vec::new(),
            volumes,
            args,
        })
        .await?;
        let mut nats = NatsContainer {
            server,
            name,
            url: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            monitor_port: 0,
            store_dir,
            _dir: dir,
        };
        nats.wait_healthy().await?;
        Ok(nats)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn store_dir(&self) -> &Path {
        &self.store_dir
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

    pub(crate) async fn stop(&mut self, deadline: Duration) -> Result<()> {
        self.server.stop("SIGTERM", deadline).await
    }

    /// Graceful stop when running, start (same store, same host ports), read the ports back,
    /// wait for `/healthz`.
    pub(crate) async fn restart(&mut self, deadline: Duration) -> Result<()> {
        self.server.stop("SIGTERM", deadline).await?;
        self.server.start().await?;
        self.wait_healthy().await
    }

    pub(crate) fn pause(&self) -> Result<()> {
        self.server.pause()
    }

    pub(crate) fn resume(&self) -> Result<()> {
        self.server.resume()
    }

    /// Reads the published ports, then polls `/healthz` until it answers 200; fails early
    /// with the container's log when it stops.
    async fn wait_healthy(&mut self) -> Result<()> {
        let port = self.server.host_port(CLIENT_PORT).await?;
        self.monitor_port = self.server.host_port(MONITOR_PORT).await?;
        self.addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.url = format!("nats://127.0.0.1:{port}");
        let monitor_port = self.monitor_port;
        self.server
            .wait_ready(READY_DEADLINE, || healthz(monitor_port))
            .await
    }
}
