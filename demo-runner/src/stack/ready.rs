//! Waiting until a started process is ready on a port of its own, moving it to another port
//! when another process took the one it was given.

use std::time::Duration;

use anyhow::bail;
use testkit::Process;

use crate::client;

/// How long a service or relay may take to report ready.
const READY_DEADLINE: Duration = Duration::from_secs(90);

/// How [`wait_ready`] ended.
enum Started {
    Ready,
    /// Another process holds the port: it answered there while ours did not listen, or ours
    /// exited because the address was in use.
    PortTaken,
}

/// What one look at a starting process found.
enum Look {
    /// Something answered ready on the port (ours, or another process).
    Answered,
    /// Ours exited; its log tail.
    Exited(std::process::ExitStatus, String),
}

/// Waits until `process` answers ready on `port`, from a socket it listens on itself.
async fn wait_ready(name: &str, port: u16, process: &mut Process) -> anyhow::Result<Started> {
    let ready_url = format!("http://127.0.0.1:{port}/health/ready");
    let look = testkit::wait_for(READY_DEADLINE, &format!("{name} to get ready"), || {
        // The exit status is read before the request (whose future cannot borrow the
        // process) and acted on only if the request fails; a process that exits during the
        // request is noticed on the next look.
        let exited = process
            .exit_status()
            .map(|status| (status, process.log_tail()));
        let ready_url = ready_url.clone();
        async move {
            if client::get(&ready_url).await.is_ok_and(|r| r.status == 200) {
                return Ok(Some(Look::Answered));
            }
            anyhow::Ok(exited.map(|(status, log)| Look::Exited(status, log)))
        }
    })
    .await;
    match look {
        // One listener per port: if it is not ours, ours cannot bind it.
        Ok(Look::Answered) if process.listens_on(port) => Ok(Started::Ready),
        Ok(Look::Answered) => Ok(Started::PortTaken),
        Ok(Look::Exited(_, log)) if log.contains("in use") => Ok(Started::PortTaken),
        Ok(Look::Exited(status, log)) => {
            bail!("{name} exited ({status}) before getting ready; its log ends with:\n{log}")
        }
        Err(_) => bail!(
            "{name} not ready after {READY_DEADLINE:?}; its log ends with:\n{}",
            process.log_tail()
        ),
    }
}

/// Waits until `process` is ready on `port` (see [`wait_ready`]). A free port can be handed
/// out to two starters at once ([`testkit::free_port`]); when another process got it first,
/// ours is started again by `spawn_on` on another free port (unless the ports are `fixed`),
/// up to 5 times, and `port` updated.
pub(super) async fn ready_on_own_port(
    name: &str,
    process: &mut Process,
    port: &mut u16,
    fixed: bool,
    spawn_on: impl Fn(u16) -> anyhow::Result<Process>,
) -> anyhow::Result<()> {
    for _ in 0..5 {
        match wait_ready(name, *port, process).await? {
            Started::Ready => return Ok(()),
            Started::PortTaken if fixed => {
                bail!("{name}: port {port} is taken by another process")
            }
            Started::PortTaken => {
                tracing::warn!(%name, port = *port, "the port was taken by another process; starting again on another");
                let _ = process.kill();
                *port = testkit::free_port()?;
                *process = spawn_on(*port)?;
            }
        }
    }
    bail!("{name}: every port tried was taken by another process")
}
#[cfg(test)]
mod tests {
    use super::ready_on_own_port;
    use std::ffi::OsString;
    use std::io::{Read, Write};
    use testkit::{Process, ProcessSpec};

    /// A server on `port` that answers `200 ok` to anything, like a ready service of another
    /// stack that got the port first.
    fn impostor() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        port
    }

    /// A python3 HTTP server on `port` answering 200 to every GET (it exits with "Address
    /// already in use" if the port is taken).
    fn server(port: u16, dir: &std::path::Path) -> anyhow::Result<Process> {
        let code = "import http.server as h, sys\n\
class R(h.BaseHTTPRequestHandler):\n    def do_GET(s):\n        s.send_response(200); s.send_header('Content-Length', '0'); s.end_headers()\n\
h.HTTPServer(('127.0.0.1', int(sys.argv[1])), R).serve_forever()\n";
        Ok(Process::spawn(ProcessSpec {
            name: "test-server",
            program: "python3".into(),
            args: vec![OsString::from("-c"), code.into(), port.to_string().into()],
            env: Vec::new(),
            cwd: dir.to_owned(),
            log: dir.join(format!("server-{port}.log")),
        })?)
    }

    #[tokio::test]
    async fn a_service_whose_port_another_process_took_is_started_on_another() {
        let dir = std::env::temp_dir().join(format!("stack-port-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let taken = impostor();
        let mut port = taken;
        let mut process = server(port, &dir).expect("spawn");
        ready_on_own_port("test-server", &mut process, &mut port, false, |p| {
            server(p, &dir)
        })
        .await
        .expect("ready on a port of its own");
        assert_ne!(port, taken, "moved off the taken port");
        assert!(process.listens_on(port), "it serves the port it reports");

        // With fixed ports there is nothing to move to: a clear error.
        let mut port = taken;
        let mut process = server(port, &dir).expect("spawn");
        let err = ready_on_own_port("test-server", &mut process, &mut port, true, |p| {
            server(p, &dir)
        })
        .await
        .expect_err("a fixed port that is taken is an error");
        assert!(err.to_string().contains("taken"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
