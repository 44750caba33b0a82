//! The operator console over the stack's three databases, served in the runner's process
//! (`demo up`, the browser test).

use std::net::SocketAddr;

use crate::stack::Stack;

/// A console being served.
#[derive(Debug)]
pub struct ConsoleServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ConsoleServer {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ConsoleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the console for `stack`'s orders, inventory and email databases on 127.0.0.1:`port`
/// (0: a free port), with actions allowed and payloads shown (demo data), open access
/// (loopback only), and the stack's broker (durable consumers, the streams' window).
pub async fn serve(stack: &Stack, port: u16) -> anyhow::Result<ConsoleServer> {
    let broker = async_nats::ConnectOptions::new()
        .name("outbox-console")
        .retry_on_initial_connect()
        .connect(stack.nats_url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("the console cannot reach the broker: {e}"))?;
    let config = console::Config {
        allow_actions: true,
        show_payloads: true,
        broker: Some(broker),
        ..console::Config::new(vec![
            console::Database::new("orders", stack.db.orders.clone()),
            console::Database::new("inventory", stack.db.inventory.clone()),
            console::Database::new("email", stack.db.email.clone()),
        ])
    };
    let app = console::router(config).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            anyhow::anyhow!("the console cannot listen on 127.0.0.1:{port}: {e} (set CONSOLE_PORT)")
        })?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("demo: the console stopped: {e}");
        }
    });
    Ok(ConsoleServer { addr, task })
}
