//! The container backend (feature `containers`): one server as one Docker container.
//!
//! Containers are started, stopped and removed through testcontainers' `clients::Cli` (see the
//! pin in Cargo.toml for why that client), which drives the `docker` CLI; the controls it lacks
//! (SIGKILL, other signals, pause, the host port after a restart, logs) use the same CLI.
//! Each port is published on a free host port the kit picks (on every interface unless the
//! daemon's default bind address says otherwise: tools/docker.sh starts it with
//! `--ip=127.0.0.1`), so that Docker binds the same one again when the container is started
//! after a kill or stop and clients that reconnect find it; the kit reads the port back from
//! Docker after every start.
//!
//! - [`docker`]: the `docker` CLI, container names, removal of orphans
//! - [`postgres`]: [`PgContainer`], PostgreSQL in a container with the kit's settings
//! - [`nats`]: [`NatsContainer`], `nats-server -js` in a container

mod docker;
mod nats;
mod postgres;

pub(crate) use nats::NatsContainer;
pub(crate) use postgres::PgContainer;

use std::any::Any;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::Duration;

use testcontainers::GenericImage;
use testcontainers::clients::Cli;
use testcontainers::core::WaitFor;
use testcontainers::{Container, RunnableImage};
use tokio::time::Instant;

use self::docker::{container_name, docker, docker_async, remove_orphans};
use crate::{Error, Result, free_port};

/// What a server container is made of.
pub(crate) struct Spec {
    /// `name:tag` (a missing tag means `latest`).
    pub(crate) image: String,
    /// `"postgres"` or `"nats-server"`, for errors.
    pub(crate) server: &'static str,
    /// The container name's prefix (`testkit-...`); the owner and a UUID are appended.
    pub(crate) name_prefix: &'static str,
    /// The ports the server listens on inside the container, each published on a free host port.
    pub(crate) ports: Vec<u16>,
    pub(crate) env: Vec<(String, String)>,
    /// Bind mounts: host path, container path.
    pub(crate) volumes: Vec<(String, String)>,
    /// The command (the image's entrypoint gets these as arguments).
    pub(crate) args: Vec<String>,
}

/// A running (or killed, stopped, paused) server container; dropping it removes the
/// container (`docker rm -f -v`, errors ignored: a drop never panics).
pub(crate) struct ServerContainer {
    /// Never dropped: testcontainers 0.15 asserts in its Drop that the removal worked, which
    /// would abort a test that is already unwinding; ours ignores a failed removal.
    container: ManuallyDrop<Container<'static, GenericImage>>,
    server: &'static str,
    image: String,
}

impl Drop for ServerContainer {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", self.container.id()]);
    }
}

/// Attempts with new host ports when a chosen one was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// One `docker run` of `spec` on freshly picked host ports.
fn run_once(spec: &Spec) -> Result<Container<'static, GenericImage>> {
    let (name, tag) = match spec
        .image
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
    {
        Some((name, tag)) => (name.to_owned(), tag.to_owned()),
        None => (spec.image.clone(), "latest".to_owned()),
    };
    let generic = GenericImage::new(name, tag).with_wait_for(WaitFor::Nothing);
    let container_name = container_name(spec.name_prefix);
    let mut runnable = RunnableImage::from((generic, spec.args.clone()))
        .with_container_name(container_name.clone());
    let mut taken = Vec::new();
    for inside in &spec.ports {
        let mut host = free_port()?;
        while taken.contains(&host) {
            host = free_port()?;
        }
        taken.push(host);
        runnable = runnable.with_mapped_port((host, *inside));
    }
    for (key, value) in &spec.env {
        runnable = runnable.with_env_var((key.clone(), value.clone()));
    }
    for (host, inside) in &spec.volumes {
        runnable = runnable.with_volume((host.clone(), inside.clone()));
    }
    // testcontainers 0.15 panics when `docker run` fails, with Docker's words only in its log.
    // The container was created but not started: starting it again tells why.
    std::panic::catch_unwind(AssertUnwindSafe(|| cli().run(runnable))).map_err(|panic| {
        let detail = match docker(&["start", &container_name]) {
            Err(Error::Container { detail, .. }) if !detail.is_empty() => detail,
            _ => panic_text(&*panic),
        };
        let _ = docker(&["rm", "-f", "-v", &container_name]);
        Error::Container {
            what: format!("docker run {}", spec.image),
            detail,
        }
    })
}

fn is_port_conflict(e: &Error) -> bool {
    matches!(e, Error::Container { detail, .. }
        if detail.contains("port is already allocated") || detail.contains("address already in use"))
}

fn cli() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(Cli::default)
}

impl ServerContainer {
    /// Runs `spec` detached. The image is pulled first when it is not present, so that a
    /// registry that cannot be reached is one readable error rather than a panic.
    pub(crate) async fn run(spec: Spec) -> Result<ServerContainer> {
        let image = spec.image.clone();
        tokio::task::spawn_blocking(move || -> Result<ServerContainer> {
            docker(&["info", "--format", "{{.ServerVersion}}"]).map_err(|e| Error::Container {
                what: "asking Docker for its version".into(),
                detail: format!(
                    "{e} (is a Docker daemon running? `make test-containers` installs and starts one)"
                ),
            })?;
            remove_orphans();
            if docker(&["image", "inspect", "--format", "{{.Id}}", &spec.image]).is_err() {
                docker(&["pull", "--quiet", &spec.image]).map_err(|e| Error::Container {
                    what: format!("pulling {}", spec.image),
                    detail: format!(
                        "{e} (without a registry, build local images with `make test-containers` or point TESTKIT_POSTGRES_IMAGE / TESTKIT_NATS_IMAGE at images you have)"
                    ),
                })?;
            }
            let mut last_error = None;
            for _ in 0..START_ATTEMPTS {
                match run_once(&spec) {
                    Ok(container) => {
                        return Ok(ServerContainer {
                            container: ManuallyDrop::new(container),
                            server: spec.server,
                            image: spec.image,
                        });
                    }
                    Err(e) if is_port_conflict(&e) => last_error = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last_error.unwrap_or(Error::NotRunning {
                server: spec.server,
            }))
        })
        .await
        .map_err(|e| Error::Container {
            what: format!("starting a {image} container"),
            detail: e.to_string(),
        })?
    }

    fn id(&self) -> &str {
        self.container.id()
    }

    /// The host port `port` (inside) is published on, read back from Docker: the one the
    /// kit picked at `docker run`, which Docker binds again on every start.
    pub(crate) async fn host_port(&self, port: u16) -> Result<u16> {
        let out = docker_async(&["port", self.id(), &format!("{port}/tcp")]).await?;
        out.lines()
            .filter_map(|line| line.rsplit_once(':'))
            .find_map(|(_, p)| p.trim().parse().ok())
            .ok_or_else(|| Error::Container {
                what: format!("looking up the host port of {port}/tcp in {}", self.image),
                detail: format!("docker port printed {out:?}"),
            })
    }

    /// True while the container's main process runs (also while it is paused).
    pub(crate) async fn is_running(&self) -> Result<bool> {
        let out = docker_async(&["inspect", "--format", "{{.State.Running}}", self.id()]).await?;
        Ok(out.trim() == "true")
    }

    /// SIGKILLs the container's processes (a paused container too, without letting it run
    /// first); returns once the container has stopped.
    pub(crate) fn kill(&self) -> Result<()> {
        if let Err(e) = docker(&["kill", self.id()]) {
            // Exited meanwhile is fine; refused while it still runs is not (and `docker wait`
            // would then block for ever).
            let out = docker(&["inspect", "--format", "{{.State.Running}}", self.id()])?;
            if out.trim() == "true" {
                return Err(e);
            }
        }
        docker(&["wait", self.id()]).map(drop)
    }

    /// Sends `signal` (e.g. `SIGINT`) to the container's main process and waits until it has
    /// exited; SIGKILLs it after `deadline` and fails.
    pub(crate) async fn stop(&self, signal: &str, deadline: Duration) -> Result<()> {
        if !self.is_running().await? {
            return Ok(());
        }
        if let Err(e) = docker_async(&["kill", "--signal", signal, self.id()]).await {
            // It may have exited between the look and the signal.
            return if self.is_running().await? {
                Err(e)
            } else {
                Ok(())
            };
        }
        let start = Instant::now();
        while self.is_running().await? {
            if start.elapsed() > deadline {
                self.kill()?;
                return Err(Error::Timeout {
                    what: format!("{} to exit after {signal}", self.image),
                    waited: deadline,
                    last_error: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// Starts a stopped container again (same file system, same host ports); fails with
    /// Docker's words when it cannot (e.g. another process took a host port meanwhile).
    pub(crate) async fn start(&self) -> Result<()> {
        docker_async(&["start", self.id()]).await.map(drop)
    }

    /// Freezes every process of the container (`docker pause`, the cgroup freezer).
    pub(crate) fn pause(&self) -> Result<()> {
        docker(&["pause", self.id()]).map(drop)
    }

    /// Thaws a paused container.
    pub(crate) fn resume(&self) -> Result<()> {
        docker(&["unpause", self.id()]).map(drop)
    }

    /// Polls `ready` until it holds; fails early, with the container's log, when the
    /// container stops, and with [`Error::NotReady`] after `deadline`.
    pub(crate) async fn wait_ready<F, Fut>(&self, deadline: Duration, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            if !self.is_running().await? {
                return Err(self.exited_error().await);
            }
            if ready().await {
                return Ok(());
            }
            if start.elapsed() > deadline {
                return Err(Error::NotReady {
                    server: self.server,
                    waited: deadline,
                    log_tail: self.log_tail().await,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The error for a container that stopped while the kit waited for it.
    pub(crate) async fn exited_error(&self) -> Error {
        let status = docker_async(&[
            "inspect",
            "--format",
            "exit code {{.State.ExitCode}}",
            self.id(),
        ])
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| e.to_string());
        Error::Exited {
            server: self.server,
            status: format!("container of {} stopped, {status}", self.image),
            log_tail: self.log_tail().await,
        }
    }

    /// The last 40 lines the container printed (stdout and stderr).
    pub(crate) async fn log_tail(&self) -> String {
        match tokio::process::Command::new("docker")
            .args(["logs", "--tail", "40", self.id()])
            .output()
            .await
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("(docker logs failed: {e})"),
        }
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "testcontainers panicked".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_container_that_exits_while_awaited_fails_at_once_with_its_log() {
        let image = std::env::var(nats::ENV_IMAGE).unwrap_or_else(|_| nats::DEFAULT_IMAGE.into());
        let server = ServerContainer::run(Spec {
            image,
            server: "nats-server",
            name_prefix: "testkit-exiting",
            ports: vec![4222],
            env: Vec::new(),
            volumes: Vec::new(),
            args: vec!["--no-such-flag".into()],
        })
        .await
        .expect("docker run of a container whose server refuses its flags");
        let started = Instant::now();
        let error = server
            .wait_ready(Duration::from_secs(30), || async { false })
            .await
            .expect_err("a stopped container is never ready");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(&error, Error::Exited { log_tail, .. } if !log_tail.trim().is_empty()),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_image_that_cannot_be_had_is_one_readable_error_and_leaves_nothing() {
        let image = "outbox-toolkit/no-such-image:0";
        let Err(error) = ServerContainer::run(Spec {
            image: image.into(),
            server: "postgres",
            name_prefix: "testkit-missing",
            ports: vec![5432],
            env: Vec::new(),
            volumes: Vec::new(),
            args: Vec::new(),
        })
        .await
        else {
            panic!("a container started from an image that does not exist");
        };
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("pulling {image}: "))
                && text.contains("TESTKIT_POSTGRES_IMAGE"),
            "{text}"
        );
        let left = docker(&[
            "ps",
            "-a",
            "--filter",
            "name=testkit-missing",
            "--format",
            "{{.Names}}",
        ])
        .expect("docker ps");
        assert_eq!(left.trim(), "", "no container is left behind");
    }
}
