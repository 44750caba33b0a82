//! A fault-injecting TCP proxy (latency, stall, cut) for network chaos without netem.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::{Error, Result};

/// Chunks read but not yet written, per direction, before reading pauses (backpressure).
const CHUNKS_IN_FLIGHT: usize = 64;
const CHUNK_SIZE: usize = 16 * 1024;

/// A TCP proxy on `127.0.0.1:<free port>` in front of one upstream address, with knobs to
/// inject network faults. Every accepted connection gets its own upstream connection.
///
/// Runs as tasks on the tokio runtime that called [`start`](Self::start); dropping the proxy
/// closes the listener and every connection.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    settings: watch::Sender<Settings>,
    connections: Arc<Mutex<Connections>>,
    accept_task: JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    latency: Duration,
    stalled: bool,
}

#[derive(Default)]
struct Connections {
    cut: bool,
    tasks: Vec<AbortHandle>,
}

impl TcpProxy {
    /// Starts listening and forwarding to `upstream` (connected per accepted client; a client
    /// whose upstream connection fails is closed).
    pub async fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(Error::io("binding the TCP proxy listener"))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io("reading the TCP proxy listener address"))?;
        let (settings, settings_rx) = watch::channel(Settings::default());
        let connections = Arc::new(Mutex::new(Connections::default()));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            settings_rx,
            connections.clone(),
        ));
        Ok(TcpProxy {
            addr,
            upstream,
            settings,
            connections,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Delays every forwarded chunk, in both directions, by `latency` after it was read
    /// (pipelined: a round trip takes at least twice `latency`). `Duration::ZERO` turns it off.
    /// Applies to chunks already in flight.
    pub fn set_latency(&self, latency: Duration) {
        self.settings.send_modify(|s| s.latency = latency);
    }

    /// Stops forwarding in both directions while keeping every connection open; data read
    /// meanwhile is held (then the socket buffers fill up) and delivered by
    /// [`unstall`](Self::unstall). New connections are accepted but stall too.
    pub fn stall(&self) {
        self.settings.send_modify(|s| s.stalled = true);
    }

    /// Resumes forwarding after [`stall`](Self::stall), held data first.
    pub fn unstall(&self) {
        self.settings.send_modify(|s| s.stalled = false);
    }

    /// Closes every current connection (both sides, data in flight is lost) and, until
    /// [`restore`](Self::restore), closes every new connection right after accepting it, so
    /// clients see their connections end (EOF or reset). The closes happen asynchronously,
    /// within moments of this call.
    pub fn cut(&self) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections.cut = true;
        for task in connections.tasks.drain(..) {
            task.abort();
        }
    }

    /// Forwards new connections again after [`cut`](Self::cut).
    pub fn restore(&self) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cut = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    settings: watch::Receiver<Settings>,
    connections: Arc<Mutex<Connections>>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                tracing::warn!(error = %e, "testkit proxy: accept failed");
                // Do not spin on persistent errors such as EMFILE.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut connections = connections.lock().unwrap_or_else(PoisonError::into_inner);
        if connections.cut {
            drop(client);
            continue;
        }
        connections.tasks.retain(|task| !task.is_finished());
        let task = tokio::spawn(serve(client, upstream, settings.clone()));
        connections.tasks.push(task.abort_handle());
    }
}

/// Forwards one connection until both directions have ended, or either fails.
async fn serve(client: TcpStream, upstream: SocketAddr, settings: watch::Receiver<Settings>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pipe(client_read, server_write, settings.clone());
    let down = pipe(server_read, client_write, settings);
    tokio::pin!(up, down);
    tokio::select! {
        result = &mut up => if result.is_ok() { let _ = down.await; },
        result = &mut down => if result.is_ok() { let _ = up.await; },
    }
}

/// Copies one direction: a reader queues timestamped chunks, a writer releases each when it is
/// `latency` old and the proxy is not stalled. EOF is forwarded as a write shutdown.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut settings: watch::Receiver<Settings>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        loop {
            let mut buf = vec![0; CHUNK_SIZE];
            let n = from.read(&mut buf).await?;
            buf.truncate(n);
            let chunk = (n > 0).then_some(buf);
            let eof = chunk.is_none();
            if tx.send((Instant::now(), chunk)).await.is_err() || eof {
                return Ok::<_, io::Error>(());
            }
        }
    };
    let write = async move {
        let closed = |_| io::Error::other("proxy dropped");
        while let Some((read_at, chunk)) = rx.recv().await {
            loop {
                settings.wait_for(|s| !s.stalled).await.map_err(closed)?;
                let due = read_at + settings.borrow().latency;
                if Instant::now() >= due {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    changed = settings.changed() => changed.map_err(closed)?,
                }
            }
            match chunk {
                Some(bytes) => to.write_all(&bytes).await?,
                None => return to.shutdown().await,
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}
