//! The whole demo topology as separate OS processes, and the demo scenario.
//!
//! [`Stack::start`] starts (or reuses, when `DATABASE_URL` / `NATS_URL` are set) PostgreSQL
//! and nats-server, recreates the three databases `demo_orders`, `demo_inventory`,
//! `demo_email`, then starts order-service, inventory-service and email-service and a `relay`
//! sidecar for each service that publishes, waiting until each reports ready. Every process
//! logs to `<dir>/logs/<name>.log`; emails land in `<dir>/mail` unless SMTP is configured.
//! [`run_demo`] seeds the catalogue, places the demo's orders, waits until each is
//! final, prints a summary and checks the saga's invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use sqlx::PgPool;
use testkit::{NatsServer, Postgres, Process, ProcessSpec, TcpProxy};

use crate::client;
use crate::events;
use crate::order::PaymentSimulation;

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Run directory: `logs/` and `mail/` go here (emptied first).
    pub dir: PathBuf,
    /// Where the `order-service`, `inventory-service` and `email-service` binaries are.
    pub bin_dir: PathBuf,
    /// The `relay` binary.
    pub relay_bin: PathBuf,
    /// HTTP ports of order-, email- and inventory-service; `None` picks free ports.
    pub ports: Option<[u16; 3]>,
    /// The payment simulation order-service runs with.
    pub payment: PaymentSimulation,
    /// `SMTP_URL` for email-service; `None` writes `.eml` files to `<dir>/mail`.
    pub smtp_url: Option<String>,
    /// Connect order-service's relay to the broker through a [`TcpProxy`] (for fault
    /// injection: latency, cuts); see [`Stack::order_relay_proxy`].
    pub proxy_order_relay: bool,
    /// Run a 3-node JetStream cluster on loopback with an R3 stream instead of one server.
    pub cluster: bool,
}

/// Base URLs of the running processes.
#[derive(Debug, Clone)]
pub struct Urls {
    /// order-service, e.g. `http://127.0.0.1:3001`.
    pub order: String,
    /// email-service.
    pub email: String,
    /// inventory-service.
    pub inventory: String,
    /// order-service's relay (health and metrics).
    pub order_relay: String,
    /// inventory-service's relay.
    pub inventory_relay: String,
}

/// Connections to the three databases (for checks; the services own them).
#[derive(Debug, Clone)]
pub struct Databases {
    /// order-service's.
    pub orders: PgPool,
    /// inventory-service's.
    pub inventory: PgPool,
    /// email-service's.
    pub email: PgPool,
}

/// The running topology. Dropping it kills every process (the services and relays before
/// the servers they use); [`Stack::stop`] stops them gracefully first.
pub struct Stack {
    /// order-service.
    pub order: Process,
    /// inventory-service.
    pub inventory: Process,
    /// email-service.
    pub email: Process,
    /// order-service's relay sidecar.
    pub order_relay: Process,
    /// inventory-service's relay sidecar.
    pub inventory_relay: Process,
    /// PostgreSQL (started here, or the external `DATABASE_URL` server).
    pub postgres: Postgres,
    /// nats-server (started here, or the external `NATS_URL` server); with `cluster`, the
    /// first node.
    pub nats: NatsServer,
    /// The other nodes of the cluster (empty without `cluster`).
    pub nats_peers: Vec<NatsServer>,
    /// The broker URL(s) the services and relays use (comma-separated for a cluster).
    pub nats_url: String,
    /// The proxy between order-service's relay and the broker, when asked for.
    pub order_relay_proxy: Option<TcpProxy>,
    /// Where everything listens.
    pub urls: Urls,
    /// The databases.
    pub db: Databases,
    /// Logs directory.
    pub log_dir: PathBuf,
    /// Mail directory (when not using SMTP).
    pub mail_dir: PathBuf,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// `url` with its database name replaced by `name` (the query string, if any, is kept).
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL without scheme")? + 3;
    let rest = &url[scheme_end..];
    let query_at = rest.find('?').unwrap_or(rest.len());
    let authority_end = rest[..query_at].find('/').unwrap_or(query_at);
    Ok(format!(
        "{}{}/{name}{}",
        &url[..scheme_end],
        &rest[..authority_end],
        &rest[query_at..]
    ))
}

const READY_DEADLINE: Duration = Duration::from_secs(90);

/// Deletes the saga's stream (and with it the durable consumers) if a previous run left it
/// on the broker: each run starts from empty databases, so it must start from an empty
/// stream too.
async fn reset_stream(nats_url: &str) -> anyhow::Result<()> {
    let client = crate::platform::NatsConfig {
        url: nats_url.to_owned(),
        ..crate::platform::NatsConfig::default()
    }
    .connect()
    .await
    .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    let start = tokio::time::Instant::now();
    loop {
        match js.delete_stream(events::STREAM).await {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return Ok(());
            }
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                return Err(anyhow!(e).context(format!("deleting the stream {}", events::STREAM)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// How [`wait_ready`] ended.
enum Started {
    Ready,
    /// Another process holds the port: it answered there while ours did not listen, or ours
    /// exited because the address was in use.
    PortTaken,
}

/// Waits until `process` answers ready on `port`, from a socket it listens on itself.
async fn wait_ready(name: &str, port: u16, process: &mut Process) -> anyhow::Result<Started> {
    let url = format!("http://127.0.0.1:{port}");
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(r) = client::get(&format!("{url}/health/ready")).await
            && r.status == 200
        {
            // One listener per port: if it is not ours, ours cannot bind it.
            return Ok(if process.listens_on(port) {
                Started::Ready
            } else {
                Started::PortTaken
            });
        }
        if let Some(status) = process.exit_status() {
            let log = process.log_tail();
            if log.contains("in use") {
                return Ok(Started::PortTaken);
            }
            bail!("{name} exited ({status}) before getting ready; its log ends with:\n{log}");
        }
        if start.elapsed() > READY_DEADLINE {
            bail!(
                "{name} not ready after {READY_DEADLINE:?}; its log ends with:\n{}",
                process.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `process` is ready on `port` (see [`wait_ready`]). A free port can be handed
/// out to two starters at once ([`testkit::free_port`]); when another process got it first,
/// ours is started again by `spawn_on` on another free port (unless the ports are `fixed`),
/// up to 5 times, and `port` updated.
async fn ready_on_own_port(
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

fn port_or_free(ports: Option<[u16; 3]>, i: usize) -> anyhow::Result<u16> {
    match ports {
        Some(p) => Ok(p[i]),
        None => Ok(testkit::free_port()?),
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

impl Stack {
    /// Starts everything and waits until each service and relay is ready.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        for name in ["logs", "mail"] {
            let dir = options.dir.join(name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("emptying {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log_dir = options.dir.join("logs");
        let mail_dir = options.dir.join("mail");
        for bin in ["order-service", "inventory-service", "email-service"] {
            let path = options.bin_dir.join(bin);
            if !path.exists() {
                bail!(
                    "{} is missing: run `cargo build -p demo-services`",
                    path.display()
                );
            }
        }
        if !options.relay_bin.exists() {
            bail!(
                "{} is missing: run `cargo build -p relay`",
                options.relay_bin.display()
            );
        }

        let brokers = async {
            if options.cluster {
                NatsServer::start_cluster(3).await
            } else {
                NatsServer::start().await.map(|n| vec![n])
            }
        };
        let (postgres, brokers) = tokio::join!(Postgres::start(), brokers);
        let postgres = postgres.context("starting PostgreSQL")?;
        let mut brokers = brokers.context("starting nats-server")?;
        let nats_url = brokers
            .iter()
            .map(|b| b.url().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        let nats = brokers.remove(0);
        let nats_peers = brokers;
        reset_stream(&nats_url).await?;
        let replicas = if options.cluster { "3" } else { "1" };
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(postgres.url())
            .await
            .context("connecting to PostgreSQL")?;
        let mut urls_db = BTreeMap::new();
        for name in ["demo_orders", "demo_inventory", "demo_email"] {
            crate::store::recreate_database(&mut admin, name)
                .await
                .with_context(|| format!("creating database {name}"))?;
            urls_db.insert(name, with_database(postgres.url(), name)?);
        }
        drop(admin);

        let mut ports = [
            port_or_free(options.ports, 0)?,
            port_or_free(options.ports, 1)?,
            port_or_free(options.ports, 2)?,
        ];
        let fixed_ports = options.ports.is_some();
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let spawn = |name: &'static str,
                     program: PathBuf,
                     args: &[&str],
                     vars: Vec<(OsString, OsString)>| {
            Process::spawn(ProcessSpec {
                name,
                program,
                args: args.iter().map(OsString::from).collect(),
                env: vars,
                cwd: options.dir.clone(),
                log: log_dir.join(format!("{name}.log")),
            })
            .with_context(|| format!("starting {name}"))
        };
        let common = |db: &str, port: u16| {
            env(&[
                ("DATABASE_URL", db),
                ("NATS_URL", &nats_url),
                ("STREAM_REPLICAS", replicas),
                ("HTTP_ADDR", &format!("127.0.0.1:{port}")),
                ("RUST_LOG", "info,sqlx=warn,async_nats=warn"),
            ])
        };
        let spawn_order = |port: u16| {
            let mut vars = common(&urls_db["demo_orders"], port);
            vars.extend(env(&[
                ("PAYMENT_SEED", &options.payment.seed.to_string()),
                (
                    "PAYMENT_SUCCESS_RATE",
                    &options.payment.success_rate.to_string(),
                ),
            ]));
            spawn(
                "order-service",
                options.bin_dir.join("order-service"),
                &[],
                vars,
            )
        };
        let spawn_email = |port: u16| {
            let mut vars = common(&urls_db["demo_email"], port);
            match &options.smtp_url {
                Some(smtp) => vars.extend(env(&[("SMTP_URL", smtp)])),
                None => vars.extend(env(&[("MAIL_DIR", &mail_dir.to_string_lossy())])),
            }
            spawn(
                "email-service",
                options.bin_dir.join("email-service"),
                &[],
                vars,
            )
        };
        let spawn_inventory = |port: u16| {
            spawn(
                "inventory-service",
                options.bin_dir.join("inventory-service"),
                &[],
                common(&urls_db["demo_inventory"], port),
            )
        };
        // Started together, then each waited for (and moved if its port was taken).
        let mut order = spawn_order(ports[0])?;
        let mut email = spawn_email(ports[1])?;
        let mut inventory = spawn_inventory(ports[2])?;
        let fixed = fixed_ports;
        ready_on_own_port(
            "order-service",
            &mut order,
            &mut ports[0],
            fixed,
            spawn_order,
        )
        .await?;
        ready_on_own_port(
            "email-service",
            &mut email,
            &mut ports[1],
            fixed,
            spawn_email,
        )
        .await?;
        ready_on_own_port(
            "inventory-service",
            &mut inventory,
            &mut ports[2],
            fixed,
            spawn_inventory,
        )
        .await?;

        let order_relay_proxy = if options.proxy_order_relay {
            Some(
                TcpProxy::start(nats.addr())
                    .await
                    .context("starting the relay proxy")?,
            )
        } else {
            None
        };
        let order_relay_nats = match &order_relay_proxy {
            Some(proxy) => format!("nats://{}", proxy.addr()),
            None => nats_url.clone(),
        };
        let mut relay_ports = [testkit::free_port()?, testkit::free_port()?];
        let subjects = events::STREAM_SUBJECTS.join(",");
        let relay_env = |db: &str, nats: &str, port: u16, id: &str| {
            env(&[
                ("DATABASE_URL", db),
                ("NATS_URL", nats),
                ("RELAY_STREAM", events::STREAM),
                ("RELAY_STREAM_SUBJECTS", &subjects),
                ("RELAY_HTTP_ADDR", &format!("127.0.0.1:{port}")),
                ("RELAY_INSTANCE_ID", id),
                ("RELAY_LOG_FORMAT", "json"),
                // Published rows are kept an hour (the relay's default, pinned): the chaos
                // run's stream check reads them (`id`, `seq`, `stream`, `stream_seq`).
                ("RELAY_RETENTION", "1h"),
                ("RUST_LOG", "info"),
            ])
        };
        let spawn_order_relay = |port: u16| {
            spawn(
                "order-relay",
                options.relay_bin.clone(),
                &["run"],
                relay_env(
                    &urls_db["demo_orders"],
                    &order_relay_nats,
                    port,
                    "order-relay",
                ),
            )
        };
        let spawn_inventory_relay = |port: u16| {
            spawn(
                "inventory-relay",
                options.relay_bin.clone(),
                &["run"],
                relay_env(
                    &urls_db["demo_inventory"],
                    &nats_url,
                    port,
                    "inventory-relay",
                ),
            )
        };
        let mut order_relay = spawn_order_relay(relay_ports[0])?;
        let mut inventory_relay = spawn_inventory_relay(relay_ports[1])?;
        ready_on_own_port(
            "order-relay",
            &mut order_relay,
            &mut relay_ports[0],
            false,
            spawn_order_relay,
        )
        .await?;
        ready_on_own_port(
            "inventory-relay",
            &mut inventory_relay,
            &mut relay_ports[1],
            false,
            spawn_inventory_relay,
        )
        .await?;

        let pool = |db: String| async move {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&db)
                .await
                .context("connecting to a demo database")
        };
        let db = Databases {
            orders: pool(urls_db["demo_orders"].clone()).await?,
            inventory: pool(urls_db["demo_inventory"].clone()).await?,
            email: pool(urls_db["demo_email"].clone()).await?,
        };
        Ok(Stack {
            postgres,
            nats,
            nats_peers,
            nats_url,
            order,
            inventory,
            email,
            order_relay,
            inventory_relay,
            order_relay_proxy,
            urls: Urls {
                order: url(ports[0]),
                email: url(ports[1]),
                inventory: url(ports[2]),
                order_relay: url(relay_ports[0]),
                inventory_relay: url(relay_ports[1]),
            },
            db,
            log_dir,
            mail_dir,
        })
    }

    /// SIGTERMs the relays and services (each finishes what it started), then stops the
    /// servers it started.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let deadline = Duration::from_secs(20);
        let mut problems = Vec::new();
        for (name, process) in [
            ("order-service", &mut self.order),
            ("inventory-service", &mut self.inventory),
            ("email-service", &mut self.email),
            ("order-relay", &mut self.order_relay),
            ("inventory-relay", &mut self.inventory_relay),
        ] {
            if process.is_running()
                && let Err(e) = process.terminate(deadline).await
            {
                problems.push(format!("{name}: {e}"));
            }
        }
        self.db.orders.close().await;
        self.db.inventory.close().await;
        self.db.email.close().await;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "not everything stopped cleanly: {}",
                problems.join("; ")
            ))
        }
    }

    /// Creates the two demo products (an existing one is left as it is) and waits until
    /// order-service's catalogue knows them.
    pub async fn seed(&self) -> anyhow::Result<()> {
        self.seed_with(&SEED_PRODUCTS).await
    }

    /// Like [`Stack::seed`] with other quantities: (id, name, quantity, price); ids and
    /// names should be those of [`SEED_PRODUCTS`], which [`Stack::place_order`] uses.
    pub async fn seed_with(&self, products: &[(&str, &str, i64, f64)]) -> anyhow::Result<()> {
        for (id, name, quantity, price) in products {
            let r = client::post_json(
                &format!("{}/inventory", self.urls.inventory),
                &json!({ "product_id": id, "name": name, "quantity": quantity, "price": price }),
            )
            .await?;
            if r.status != 201 && r.status != 409 {
                bail!("creating {id}: {} {}", r.status, r.text);
            }
        }
        let catalogue = format!("{}/products", self.urls.order);
        wait_for(
            Duration::from_secs(30),
            "order-service to learn the catalogue",
            || async {
                let r = client::get(&catalogue).await?;
                let known = r.json["products"].as_array().map_or(0, Vec::len);
                Ok(known >= products.len())
            },
        )
        .await
    }

    /// Places an order; returns its id (the response must be 201 PENDING).
    pub async fn place_order(&self, user: &str, items: &[(&str, i64)]) -> anyhow::Result<String> {
        let items: Vec<Value> = items
            .iter()
            .map(|(product, quantity)| {
                let (_, name, _, price) = SEED_PRODUCTS
                    .iter()
                    .find(|p| p.0 == *product)
                    .copied()
                    .unwrap_or((product, "Unknown", 0, 1.0));
                json!({ "productId": product, "productName": name, "quantity": quantity, "price": price })
            })
            .collect();
        let r = client::post_json(
            &format!("{}/orders", self.urls.order),
            &json!({ "userId": user, "items": items }),
        )
        .await?;
        if r.status != 201 || r.json["status"] != "PENDING" {
            bail!("placing {user}'s order: {} {}", r.status, r.text);
        }
        r.json["orderId"]
            .as_str()
            .map(str::to_owned)
            .context("no orderId in the response")
    }

    /// The order's history as `"<direction> <type>"` entries (`GET /orders/{id}/events`).
    pub async fn history(&self, order_id: &str) -> anyhow::Result<Vec<String>> {
        let r = client::get(&format!("{}/orders/{order_id}/events", self.urls.order)).await?;
        if r.status != 200 {
            bail!("GET events of {order_id}: {} {}", r.status, r.text);
        }
        Ok(r.json["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} {}",
                    e["direction"].as_str().unwrap_or_default(),
                    e["type"].as_str().unwrap_or_default()
                )
            })
            .collect())
    }

    /// `GET /orders/{id}`.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<Value> {
        let r = client::get(&format!("{}/orders/{order_id}", self.urls.order)).await?;
        if r.status != 200 {
            bail!("GET order {order_id}: {} {}", r.status, r.text);
        }
        Ok(r.json)
    }

    /// Waits until every order is CONFIRMED or CANCELLED; returns them.
    pub async fn wait_terminal(
        &self,
        order_ids: &[String],
        deadline: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let start = tokio::time::Instant::now();
        loop {
            let mut orders = Vec::with_capacity(order_ids.len());
            for id in order_ids {
                orders.push(self.order(id).await?);
            }
            let pending: Vec<&Value> = orders
                .iter()
                .filter(|o| o["status"] != "CONFIRMED" && o["status"] != "CANCELLED")
                .collect();
            if pending.is_empty() {
                return Ok(orders);
            }
            if start.elapsed() > deadline {
                bail!(
                    "{} of {} orders not final after {deadline:?}, e.g. {} is {}",
                    pending.len(),
                    orders.len(),
                    pending[0]["orderId"],
                    pending[0]["status"]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks the saga's invariants for `orders` (all final) and `initial` stock, waiting
    /// (bounded) for the tail of the saga (stock commits, emails, outboxes) to settle.
    /// Returns the first violation as the error.
    pub async fn check_invariants(
        &self,
        orders: &[Value],
        initial: &[(&str, i64)],
    ) -> anyhow::Result<Invariants> {
        let confirmed: Vec<&Value> = orders
            .iter()
            .filter(|o| o["status"] == "CONFIRMED")
            .collect();
        let mut sold: BTreeMap<String, i64> = BTreeMap::new();
        for order in &confirmed {
            for item in order["items"].as_array().into_iter().flatten() {
                *sold
                    .entry(item["productId"].as_str().unwrap_or_default().to_owned())
                    .or_default() += item["quantity"].as_i64().unwrap_or_default();
            }
        }
        let expected_emails = orders.len() as i64;
        let settle = Duration::from_secs(60);
        let start = tokio::time::Instant::now();
        loop {
            let last = match self.settled(initial, &sold, expected_emails).await {
                Ok(invariants) => return Ok(invariants),
                Err(e) => e,
            };
            if start.elapsed() > settle {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn settled(
        &self,
        initial: &[(&str, i64)],
        sold: &BTreeMap<String, i64>,
        expected_emails: i64,
    ) -> anyhow::Result<Invariants> {
        let mut stock = Vec::new();
        for (product, start) in initial {
            let p = client::get(&format!("{}/inventory/{product}", self.urls.inventory))
                .await?
                .json;
            let available = p["available"].as_i64().unwrap_or(-1);
            let reserved = p["reserved"].as_i64().unwrap_or(-1);
            let expected = start - sold.get(*product).copied().unwrap_or(0);
            if reserved != 0 {
                bail!("stock: {product} still has {reserved} reserved after every order is final");
            }
            if available != expected {
                bail!(
                    "stock: {product} has {available} available, expected {start} - {} confirmed = {expected}",
                    sold.get(*product).copied().unwrap_or(0)
                );
            }
            stock.push((
                product.to_string(),
                p["name"].as_str().unwrap_or_default().to_owned(),
                *start,
                available,
            ));
        }
        let (sent, unsent) =
            crate::email::store::counts(&mut *self.db.email.acquire().await?).await?;
        if sent + unsent != expected_emails {
            bail!(
                "emails: {} recorded for {expected_emails} final orders",
                sent + unsent
            );
        }
        if unsent > 0 {
            bail!("emails: {unsent} not sent yet");
        }
        let mut mail_files = BTreeSet::new();
        if self.mail_dir.exists() {
            for entry in std::fs::read_dir(&self.mail_dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".eml") {
                    mail_files.insert(id.to_owned());
                }
            }
        }
        for (name, pool) in [
            ("orders", &self.db.orders),
            ("inventory", &self.db.inventory),
        ] {
            let backlog = outbox::store::backlog(&mut *pool.acquire().await?).await?;
            if backlog.unpublished > 0 {
                bail!(
                    "outbox of {name}: {} rows not published",
                    backlog.unpublished
                );
            }
        }
        let mut dead = 0;
        for pool in [&self.db.orders, &self.db.inventory, &self.db.email] {
            dead += dlq::store::count(&mut *pool.acquire().await?, &dlq::store::Filter::default())
                .await?;
        }
        if dead > 0 {
            bail!("dead letters: {dead} messages were dead-lettered (see `dlq list`)");
        }
        Ok(Invariants {
            stock,
            emails_sent: sent,
            mail_files,
        })
    }
}

/// What [`Stack::check_invariants`] found, for the summary.
#[derive(Debug, Clone)]
pub struct Invariants {
    /// (id, name, initial, available now) per product.
    pub stock: Vec<(String, String, i64, i64)>,
    /// Emails sent.
    pub emails_sent: i64,
    /// Order ids with an `.eml` file (directory mode).
    pub mail_files: BTreeSet<String>,
}

/// The demo's products: (id, name, quantity, price).
pub const SEED_PRODUCTS: [(&str, &str, i64, f64); 2] = [
    ("prod-001", "Laptop", 10, 999.99),
    ("prod-002", "Mouse", 50, 29.99),
];

/// The demo's orders: (user, items). The third asks for more laptops than exist.
pub const DEMO_ORDERS: [(&str, &[(&str, i64)]); 12] = [
    ("alice", &[("prod-001", 1), ("prod-002", 1)]),
    ("bob", &[("prod-002", 2)]),
    ("carol", &[("prod-001", 20)]),
    ("dave", &[("prod-001", 1)]),
    ("erin", &[("prod-002", 3)]),
    ("frank", &[("prod-001", 2), ("prod-002", 2)]),
    ("grace", &[("prod-001", 1)]),
    ("heidi", &[("prod-002", 1)]),
    ("ivan", &[("prod-001", 1), ("prod-002", 1)]),
    ("judy", &[("prod-002", 5)]),
    ("mallory", &[("prod-001", 2)]),
    ("oscar", &[("prod-002", 1)]),
];

/// Polls `condition` until it is true or `deadline` passes.
pub async fn wait_for<F, Fut>(
    deadline: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = tokio::time::Instant::now();
    let mut last_error = None;
    loop {
        match condition().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > deadline {
            let cause = last_error
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {deadline:?} waiting for {what}{cause}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The trace id of the log line of `log` whose message is `message` and whose `order_id`
/// field is `order_id` (JSON log lines, as the services write them).
pub fn trace_id_of(log: &Path, message: &str, order_id: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["fields"]["message"] == message && v["fields"]["order_id"] == order_id)
        .and_then(|v| {
            v["spans"]
                .as_array()?
                .iter()
                .find_map(|s| s["trace_id"].as_str().map(str::to_owned))
        })
}

/// How many lines of `log` mention `needle`.
pub fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}

/// Runs the demo on a started stack: seeds, places [`DEMO_ORDERS`], waits until every order
/// is final, checks the invariants and returns the printable summary.
pub async fn run_demo(stack: &Stack) -> anyhow::Result<String> {
    let mut out = String::new();
    stack.seed().await?;
    let mut ids = Vec::new();
    for (user, items) in DEMO_ORDERS {
        ids.push(stack.place_order(user, items).await?);
    }
    let orders = stack.wait_terminal(&ids, Duration::from_secs(120)).await?;
    let initial: Vec<(&str, i64)> = SEED_PRODUCTS.iter().map(|p| (p.0, p.2)).collect();
    let invariants = stack.check_invariants(&orders, &initial).await?;

    let _ = writeln!(out, "Orders ({}):", orders.len());
    for o in &orders {
        let _ = writeln!(
            out,
            "  {:<8} {}  {:<9} {:>9.2}  {}",
            o["userId"].as_str().unwrap_or_default(),
            o["orderId"].as_str().unwrap_or_default(),
            o["status"].as_str().unwrap_or_default(),
            o["total"].as_f64().unwrap_or_default(),
            o["reason"].as_str().unwrap_or(""),
        );
    }
    let _ = writeln!(out, "Stock:");
    for (id, name, initial, available) in &invariants.stock {
        let _ = writeln!(
            out,
            "  {id} {name:<7} started {initial:>3}, available {available:>3}, sold {:>3}, reserved 0",
            initial - available
        );
    }
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let cancelled = orders.len() - confirmed;
    let _ = writeln!(
        out,
        "Emails: {} sent ({confirmed} confirmations, {cancelled} cancellations){}",
        invariants.emails_sent,
        if invariants.mail_files.is_empty() {
            String::new()
        } else {
            format!(", files in {}", stack.mail_dir.display())
        }
    );

    // Checks specific to the demo's orders.
    let carol = &orders[2];
    if carol["status"] != "CANCELLED"
        || !carol["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("insufficient stock")
    {
        bail!(
            "carol's order of 20 laptops should be CANCELLED for insufficient stock, got {carol}"
        );
    }
    let payment_failures = orders
        .iter()
        .filter(|o| {
            o["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("payment failed")
        })
        .count();
    if !invariants.mail_files.is_empty() {
        let expected: BTreeSet<String> = ids.iter().cloned().collect();
        if invariants.mail_files != expected {
            bail!(
                "mail directory: expected one .eml per order, found {:?}",
                invariants.mail_files
            );
        }
    }
    let _ = writeln!(
        out,
        "Events of alice's order: {}",
        stack.history(&ids[0]).await?.join(" -> ")
    );
    // A declined payment's compensation: inventory releases the stock, order-service
    // records the release.
    if let Some(declined) = orders.iter().find(|o| {
        o["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("payment failed")
    }) {
        let id = declined["orderId"].as_str().unwrap_or_default();
        let released = "received inventory.released.v1".to_owned();
        wait_for(
            Duration::from_secs(30),
            "the release to reach the order's history",
            || async { Ok(stack.history(id).await?.contains(&released)) },
        )
        .await?;
        let _ = writeln!(
            out,
            "Events of {}'s order (payment declined): {}",
            declined["userId"].as_str().unwrap_or_default(),
            stack.history(id).await?.join(" -> ")
        );
    }

    match trace_id_of(
        &stack.log_dir.join("order-service.log"),
        "order created",
        &ids[0],
    ) {
        Some(trace) => {
            let counts: Vec<String> = ["order-service", "inventory-service", "email-service"]
                .iter()
                .map(|s| {
                    format!(
                        "{s} {}",
                        count_lines(&stack.log_dir.join(format!("{s}.log")), &trace)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "Trace {trace} (alice's order), log lines: {}",
                counts.join(", ")
            );
            if counts.iter().any(|c| c.ends_with(" 0")) {
                bail!(
                    "trace {trace} does not reach every service's log: {}",
                    counts.join(", ")
                );
            }
        }
        None => bail!(
            "no trace id on order-service's 'order created' log line for {}",
            ids[0]
        ),
    }
    let _ = writeln!(
        out,
        "Invariants: every order final; {payment_failures} payment failures compensated; stock balances, nothing left reserved; one email per order; outboxes drained; no dead letters."
    );
    let _ = writeln!(out, "Logs: {}", stack.log_dir.display());
    Ok(out)
}

/// The payment seed `make demo` uses: with the default 90% success rate it declines two of
/// the demo's eleven payments, so the summary shows compensation.
pub const DEMO_PAYMENT_SEED: u64 = 14;

/// The curl commands `make up` prints.
pub fn curl_examples(urls: &Urls) -> String {
    format!(
        r#"Try:
  curl -s -X POST {order}/orders -H 'content-type: application/json' \
       -d '{{"userId":"u1","items":[{{"productId":"prod-002","productName":"Mouse","quantity":2,"price":29.99}}]}}'
  curl -s {order}/orders/<orderId>
  curl -s {order}/orders/<orderId>/events
  curl -s {order}/orders/user/u1
  curl -s -X POST {order}/orders/<orderId>/cancel
  curl -s {inventory}/inventory/prod-002
  curl -s -X POST {inventory}/inventory/prod-002/restock -H 'content-type: application/json' -d '{{"quantity":5}}'
  curl -s {order}/health/ready; curl -s {order}/metrics | grep orders_"#,
        order = urls.order,
        inventory = urls.inventory
    )
}

#[cfg(test)]
mod tests {
    use super::{ready_on_own_port, with_database};
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

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        let cases = [
            ("postgres://u@h:5432/postgres", "postgres://u@h:5432/demo_x"),
            (
                "postgres://u@h:5432/postgres?sslmode=require",
                "postgres://u@h:5432/demo_x?sslmode=require",
            ),
            ("postgres://u@h:5432", "postgres://u@h:5432/demo_x"),
            (
                "postgres://u@h:5432?sslmode=disable",
                "postgres://u@h:5432/demo_x?sslmode=disable",
            ),
            (
                "postgres://?host=/run/pg",
                "postgres:///demo_x?host=/run/pg",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "demo_x").expect(url), expected);
        }
        assert!(with_database("no-scheme", "x").is_err());
    }
}
