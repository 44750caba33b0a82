//! The runner's one HTTP client (every request the runner and the end-to-end tests make goes
//! through it): HTTP/1.1 JSON over hyper, one connection per request, plain `http://` only,
//! without a TLS stack.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use serde_json::Value;
use tokio::net::TcpStream;

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status and body (parsed as JSON when it is JSON, else `Value::Null`).
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body as JSON, or `Null` if it is not JSON.
    pub json: Value,
    /// The raw body.
    pub text: String,
}

/// `GET url`.
pub async fn get(url: &str) -> anyhow::Result<Response> {
    send("GET", url, None, Vec::new()).await
}

/// `POST url` with a JSON body.
pub async fn post_json(url: &str, body: &Value) -> anyhow::Result<Response> {
    send(
        "POST",
        url,
        Some("application/json"),
        serde_json::to_vec(body)?,
    )
    .await
}

/// Any method with any body and content type (for hostile-input tests).
pub async fn send(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> anyhow::Result<Response> {
    tokio::time::timeout(REQUEST_TIMEOUT, send_once(method, url, content_type, body))
        .await
        .map_err(|_| anyhow!("{method} {url}: no response within {REQUEST_TIMEOUT:?}"))?
}

async fn send_once(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> anyhow::Result<Response> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(anyhow!("only http:// URLs are supported, got {url}"));
    }
    let host = uri.host().context("URL without host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, authority);
    if let Some(content_type) = content_type {
        request = request.header(CONTENT_TYPE, content_type);
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response.into_body().collect().await?.to_bytes();
    driver.abort();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Response {
        status,
        content_type,
        json,
        text,
    })
}
