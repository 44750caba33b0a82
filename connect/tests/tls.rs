//! TLS settings force TLS: with a CA or a client certificate configured, a `nats://` URL is
//! never used in plaintext, so a man in the middle cannot strip TLS from the connection.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use connect::NatsConfig;
use testkit::{NatsServer, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A self-signed CA certificate (for 127.0.0.1) and its key, made for this test only.
const CERT: &str = concat!(
    "-----BEGIN CERTIFICATE-----\n",
    "MIIBmzCCAUKgAwIBAgIUf2sBk/ao4ZVOLtew3pWD+iKvoP8wCgYIKoZIzj0EAwIw\n",
    "GjEYMBYGA1UEAwwPY29ubmVjdC10ZXN0LWNhMCAXDTI2MTIwMTE3NDU1MloYDzIx\n",
    "MjYxMTA3MTc0NTUyWjAaMRgwFgYDVQQDDA9jb25uZWN0LXRlc3QtY2EwWTATBgcq\n",
    "hkjOPQIBBggqhkjOPQMBBwNCAARi7sDTEp1CMImZ6nKzwrc+FiJ9vtktZR0L0jKA\n",
    "cDSNLeqkARDokPq9laOBeK37glwz8nnD8QVksBx7T0mGYO9Ho2QwYjAdBgNVHQ4E\n",
    "FgQUuw7Yvn4HKdB1Pc7TZZPEqeSs6BUwHwYDVR0jBBgwFoAUuw7Yvn4HKdB1Pc7T\n",
    "ZZPEqeSs6BUwDwYDVR0TAQH/BAUwAwEB/zAPBgNVHREECDAGhwR/AAABMAoGCCqG\n",
    "SM49BAMCA0cAMEQCICxjO7j63hnC1xxU1kAgyKfog9TKuaVfPDYI4bkx6vV2AiAM\n",
    "A6NTOku1Y1NXaF46rDDVQE6H83dC5H6vp4ZVHRd5FQ==\n",
    "-----END CERTIFICATE-----\n",
);
const KEY: &str = concat!(
    "-----BEGIN PRIVATE KEY-----\n",
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYbjfWlXtS7Fi+Mpn\n",
    "oLlt253zqKXfTTJDxSJ2tCeU/FahRANCAARi7sDTEp1CMImZ6nKzwrc+FiJ9vtkt\n",
    "ZR0L0jKAcDSNLeqkARDokPq9laOBeK37glwz8nnD8QVksBx7T0mGYO9H\n",
    "-----END PRIVATE KEY-----\n",
);

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

fn write_pem(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("connect-tls-{}-{name}", std::process::id()));
    std::fs::write(&path, text).expect("write PEM");
    path
}

/// A TCP forwarder in front of `upstream` that records, per accepted connection, the first
/// bytes the client sent (empty if it closed without sending anything).
struct Recorder {
    addr: std::net::SocketAddr,
    first_sent: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(upstream: std::net::SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let first_sent = Arc::new(Mutex::new(Vec::new()));
        let record = first_sent.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    });
                    let mut first = vec![0; 4096];
                    let n = client_rx.read(&mut first).await.unwrap_or(0);
                    first.truncate(n);
                    record
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(first.clone());
                    if n > 0 && server_tx.write_all(&first).await.is_ok() {
                        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    }
                    down.abort();
                });
            }
        });
        Recorder {
            addr,
            first_sent,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn first_sent(&self) -> Vec<Vec<u8>> {
        self.first_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Connects with `config` through a fresh recorder in front of `nats` and waits until the
/// client either connected or made a second connection attempt (so the first one failed).
/// Returns the successful connects and the first bytes of every attempt.
async fn attempt(nats: &NatsServer, config: NatsConfig) -> (u64, Vec<Vec<u8>>) {
    let recorder = Recorder::start(nats.addr()).await;
    let config = NatsConfig {
        url: recorder.url(),
        ..config
    };
    let client = config.connect().await.expect("the client starts");
    let connects = || client.statistics().connects.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(20),
        "a connect or a second attempt",
        || {
            let done = connects() > 0 || recorder.first_sent().len() >= 2;
            async move { done }
        },
    )
    .await
    .expect("the client tries");
    (connects(), recorder.first_sent())
}

fn shown(attempts: &[Vec<u8>]) -> Vec<String> {
    attempts
        .iter()
        .map(|a| String::from_utf8_lossy(&a[..a.len().min(40)]).into_owned())
        .collect()
}

#[tokio::test]
async fn a_ca_or_client_certificate_refuses_a_plaintext_server() {
    let nats = NatsServer::start().await.expect("nats-server without TLS");
    let cert = write_pem("cert.pem", CERT);
    let key = write_pem("key.pem", KEY);

    // Control: without TLS settings the same path connects in plaintext.
    let (connects, sent) = attempt(&nats, NatsConfig::default()).await;
    assert_eq!(connects, 1, "plaintext control: {:?}", shown(&sent));
    assert!(sent[0].starts_with(b"CONNECT "), "{:?}", shown(&sent));

    for (what, config) in [
        (
            "a CA file",
            NatsConfig {
                tls_ca: Some(cert.clone()),
                ..NatsConfig::default()
            },
        ),
        (
            "a client certificate",
            NatsConfig {
                tls_cert: Some(cert.clone()),
                tls_key: Some(key.clone()),
                ..NatsConfig::default()
            },
        ),
    ] {
        let (connects, sent) = attempt(&nats, config).await;
        assert_eq!(
            connects,
            0,
            "with {what} the client connected to a plaintext server; it sent {:?}",
            shown(&sent)
        );
        assert!(
            sent.len() >= 2 && sent.iter().all(|s| s.first() == Some(&TLS_HANDSHAKE)),
            "with {what} every attempt must start a TLS handshake: {:?}",
            shown(&sent)
        );
    }
    let _ = std::fs::remove_file(cert);
    let _ = std::fs::remove_file(key);
}
