//! A small WebDriver client for the browser tests: `chromedriver` (Debian's
//! `chromium-driver`) driving headless Chromium, over the W3C WebDriver protocol (JSON over
//! HTTP) with the runner's HTTP client.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use demo_runner::client;
use serde_json::{Value, json};

/// The element reference key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` child process; killed (by its pid) when dropped.
pub(crate) struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub(crate) struct Session {
    base: String,
    _driver: Driver,
}

/// Starts `chromedriver` on a free port and opens a headless Chromium session in a fresh
/// profile, with the flags that work on these machines.
pub(crate) async fn start() -> anyhow::Result<Session> {
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    for path in [&driver, &chromium] {
        if !std::path::Path::new(path).exists() {
            bail!(
                "{path} is missing: run `make test-browser` (it installs chromium and chromium-driver)"
            );
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {driver}"))?;
    let profile = tempfile::tempdir()?;
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _profile: profile,
    };
    testkit::wait_for(
        Duration::from_secs(20),
        "chromedriver to answer",
        || async {
            Ok::<_, anyhow::Error>(
                client::get(&format!("{}/status", driver.url))
                    .await
                    .ok()
                    .filter(|r| r.json["value"]["ready"] == json!(true))
                    .map(|_| ()),
            )
        },
    )
    .await?;
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        &format!("--user-data-dir={}", driver._profile.path().display()),
    ];
    let created = client::post_json(
        &format!("{}/session", driver.url),
        &json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        } } }),
    )
    .await?;
    let id = created.json["value"]["sessionId"]
        .as_str()
        .ok_or_else(|| anyhow!("no session: {}", created.text))?
        .to_owned();
    Ok(Session {
        base: format!("{}/session/{id}", driver.url),
        _driver: driver,
    })
}

impl Session {
    async fn call(&self, method: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let body = if method == "GET" {
            Vec::new()
        } else {
            serde_json::to_vec(&body)?
        };
        let r = client::send(method, &url, Some("application/json"), body).await?;
        if r.status >= 400 {
            bail!("{method} {path}: {} {}", r.status, r.text);
        }
        Ok(r.json["value"].clone())
    }

    /// Opens `url` and waits for it to load.
    pub(crate) async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", "/url", json!({ "url": url }))
            .await
            .map(drop)
    }

    /// The first element matching the CSS `selector`.
    pub(crate) async fn find(&self, selector: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": selector }),
            )
            .await
            .with_context(|| format!("find {selector}"))?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no element {selector}: {v}"))
    }

    /// How many elements match `selector`.
    pub(crate) async fn count(&self, selector: &str) -> anyhow::Result<usize> {
        let v = self
            .call(
                "POST",
                "/elements",
                json!({ "using": "css selector", "value": selector }),
            )
            .await?;
        Ok(v.as_array().map_or(0, Vec::len))
    }

    /// Clicks the element matching `selector` (a submit button submits its form, and the
    /// call returns once the next page has loaded).
    pub(crate) async fn click(&self, selector: &str) -> anyhow::Result<()> {
        let element = self.find(selector).await?;
        self.call("POST", &format!("/element/{element}/click"), json!({}))
            .await
            .map(drop)
    }

    /// Types `text` into the input matching `selector`.
    pub(crate) async fn type_into(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        let element = self.find(selector).await?;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    /// The visible text of the element matching `selector`.
    pub(crate) async fn text(&self, selector: &str) -> anyhow::Result<String> {
        let element = self.find(selector).await?;
        let v = self
            .call("GET", &format!("/element/{element}/text"), Value::Null)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// What `script` (a function body) returns in the page.
    pub(crate) async fn execute(&self, script: &str) -> anyhow::Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// The current page's URL.
    pub(crate) async fn url(&self) -> anyhow::Result<String> {
        let v = self.call("GET", "/url", Value::Null).await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// A PNG of the window, written to `path`.
    pub(crate) async fn screenshot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use base64::Engine;
        let v = self.call("GET", "/screenshot", Value::Null).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .context("screenshot")?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Session {
    /// Ends the session (the browser closes).
    pub(crate) async fn quit(self) {
        let url = self.base.clone();
        let _ = client::send("DELETE", &url, None, Vec::new()).await;
    }
}
