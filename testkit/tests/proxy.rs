//! The fault-injecting TCP proxy, in front of an echo server and of PostgreSQL.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use testkit::{Postgres, TcpProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// A TCP server that writes back whatever it reads.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut buf = vec![0; message.len()];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

const BOUND: Duration = Duration::from_secs(5);

#[tokio::test]
async fn cut_closes_connections_and_refuses_new_ones_until_restore() {
    let proxy = TcpProxy::start(echo_server().await)
        .await
        .expect("start proxy");
    let mut conn = TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy");
    assert_eq!(
        round_trip(&mut conn, b"hello").await.expect("round trip"),
        b"hello"
    );

    proxy.cut();
    let mut buf = [0u8; 1];
    let read = timeout(BOUND, conn.read(&mut buf))
        .await
        .expect("cut ends the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "read {read:?} after cut");
    let fresh = timeout(BOUND, async {
        let mut conn = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut conn, b"again").await
    })
    .await
    .expect("bounded");
    assert!(
        fresh.is_err(),
        "a new connection worked while cut: {fresh:?}"
    );

    proxy.restore();
    let mut conn = TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy");
    assert_eq!(
        round_trip(&mut conn, b"back").await.expect("round trip"),
        b"back"
    );
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let proxy = TcpProxy::start(echo_server().await)
        .await
        .expect("start proxy");
    let mut conn = TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy");
    proxy.set_latency(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(
        round_trip(&mut conn, b"slow").await.expect("round trip"),
        b"slow"
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "round trip took only {elapsed:?}"
    );
    proxy.set_latency(Duration::ZERO);
    assert_eq!(
        round_trip(&mut conn, b"fast").await.expect("round trip"),
        b"fast"
    );
}

#[tokio::test]
async fn stall_holds_data_until_unstall() {
    let proxy = TcpProxy::start(echo_server().await)
        .await
        .expect("start proxy");
    let conn = TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy");
    let (mut read, mut write) = conn.into_split();

    proxy.stall();
    write.write_all(b"held").await.expect("write");
    let mut reply = tokio::spawn(async move {
        let mut buf = [0u8; 4];
        read.read_exact(&mut buf).await.map(|_| buf)
    });
    assert!(
        timeout(Duration::from_millis(300), &mut reply)
            .await
            .is_err(),
        "data passed a stalled proxy"
    );

    proxy.unstall();
    let buf = timeout(BOUND, reply)
        .await
        .expect("delivered after unstall")
        .expect("task")
        .expect("read");
    assert_eq!(&buf, b"held");
}

#[tokio::test]
async fn postgres_through_the_proxy_breaks_on_cut_and_works_after_restore() {
    let pg = Postgres::start().await.expect("start postgres");
    let proxy = TcpProxy::start(pg.addr()).await.expect("start proxy");
    let url = format!("postgres://postgres@{}/postgres", proxy.addr());
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("connect through the proxy");
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("query through the proxy");

    proxy.cut();
    let query = timeout(BOUND, sqlx::query("SELECT 1").execute(&mut conn))
        .await
        .expect("bounded");
    assert!(query.is_err(), "a query passed a cut proxy");
    let connect = timeout(BOUND, PgConnection::connect(&url))
        .await
        .expect("bounded");
    assert!(connect.is_err(), "connected through a cut proxy");

    proxy.restore();
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("connect after restore");
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("query after restore");
}
