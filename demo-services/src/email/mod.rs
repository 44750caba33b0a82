//! email-service (port 3002): one confirmation or cancellation email per order, exactly once.
//!
//! - `store`: all SQL on its `email` table.
//!
//! The inbox handler for `order.confirmed.v1` / `order.cancelled.v1` only *records* the email
//! (one row per order, a stable `Message-ID`), in the inbox transaction. A sender task then
//! delivers unsent rows and marks them sent. A crash between delivering and marking sends the
//! same message again with the same `Message-ID` (receivers and mail stores deduplicate on
//! it); in the mail-directory mode the file is named by order and replaced atomically, so
//! there is exactly one file per order whatever happens.
//!
//! Delivery: SMTP through lettre when `SMTP_URL` is set (`smtp://host:port`, plain, for a
//! local relay), otherwise `.eml` files in `MAIL_DIR` (default `./mail`). HTTP: only
//! `/health`, `/health/ready`, `/metrics`.

pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use inbox::{Delivery, Handler, HandlerError};
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::store::EmailRow;
use crate::events::{OrderCancelled, OrderConfirmed, OrderLine};
use crate::platform::money;
use crate::platform::{Runtime, ServiceConfig, ServiceHandle};

/// The documented port.
pub const DEFAULT_PORT: u16 = 3002;
/// Consumer and NATS connection name.
pub const NAME: &str = "email-service";
/// The sender address.
pub const FROM: &str = "Demo Shop <shop@demo.outbox-toolkit.invalid>";

/// Where emails go.
#[derive(Debug, Clone)]
pub enum MailTarget {
    /// `.eml` files, one per order, in this directory.
    Directory(PathBuf),
    /// An SMTP server, `smtp://host:port` (no TLS, no auth: a local relay).
    Smtp(String),
}

/// email-service's configuration.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    /// Database, broker, HTTP address.
    pub service: ServiceConfig,
    /// `SMTP_URL` or `MAIL_DIR`.
    pub target: MailTarget,
}

impl EmailConfig {
    /// Reads the environment: [`ServiceConfig::from_env`], `SMTP_URL`, `MAIL_DIR`.
    pub fn from_env() -> anyhow::Result<EmailConfig> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let target = match var("SMTP_URL") {
            Some(url) => MailTarget::Smtp(url),
            None => MailTarget::Directory(var("MAIL_DIR").unwrap_or_else(|| "mail".into()).into()),
        };
        Ok(EmailConfig {
            service: ServiceConfig::from_env(DEFAULT_PORT)?,
            target,
        })
    }
}

/// Delivers formatted messages.
enum Mailer {
    Directory(PathBuf),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

impl Mailer {
    fn new(target: &MailTarget) -> anyhow::Result<Mailer> {
        Ok(match target {
            MailTarget::Directory(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the mail directory {}", dir.display()))?;
                Mailer::Directory(dir.clone())
            }
            MailTarget::Smtp(url) => {
                let (host, port) = parse_smtp_url(url)?;
                let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_secs(10)))
                    .build();
                Mailer::Smtp(transport)
            }
        })
    }

    async fn deliver(&self, email: &EmailRow) -> anyhow::Result<()> {
        let message = lettre::Message::builder()
            .message_id(Some(format!("<{}>", email.message_id)))
            .from(FROM.parse()?)
            .to(email.recipient.parse()?)
            .subject(&email.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.clone())?;
        match self {
            Mailer::Directory(dir) => {
                let path = dir.join(format!("{}.eml", email.order_id));
                let temp = dir.join(format!(".{}.eml.tmp", email.order_id));
                tokio::fs::write(&temp, message.formatted()).await?;
                tokio::fs::rename(&temp, &path).await?;
            }
            Mailer::Smtp(transport) => {
                transport.send(message).await?;
            }
        }
        Ok(())
    }
}

/// Splits `smtp://host[:port]` (port 25 by default).
pub fn parse_smtp_url(url: &str) -> anyhow::Result<(String, u16)> {
    let bad = || anyhow::anyhow!("SMTP_URL {url:?} must look like smtp://host:port");
    let rest = url.strip_prefix("smtp://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
        None => (rest, 25),
    };
    if host.is_empty() || host.contains(['/', '@', '?']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Starts email-service: schema, consumer, sender, HTTP (health and metrics only).
pub async fn start(config: EmailConfig) -> anyhow::Result<ServiceHandle> {
    let mailer = Mailer::new(&config.target)?;
    let counters = ["emails_queued_total", "emails_sent_total"];
    let mut runtime = Runtime::connect(NAME, config.service, store::SCHEMA, &counters).await?;
    runtime.consume(
        inbox::Router::new()
            .route::<OrderConfirmed, _>(Compose)
            .route::<OrderCancelled, _>(Compose),
    );
    let sender = tokio::spawn(send_loop(
        runtime.pool.clone(),
        mailer,
        runtime.stop.clone(),
    ));
    runtime.spawn(sender);
    tracing::info!(target = ?config.target, "emails go to");
    runtime.serve(Router::new(), false).await
}

/// Delivers unsent emails until `stop` (finishing the batch in hand).
async fn send_loop(pool: PgPool, mailer: Mailer, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let sent = match send_batch(&pool, &mailer).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "email sender: database error; retrying");
                0
            }
        };
        if sent == 0 {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// Sends up to 20 due emails, each in its own transaction (lock, deliver, mark, commit), so
/// that a crash repeats at most the one email in hand.
async fn send_batch(pool: &PgPool, mailer: &Mailer) -> Result<usize, sqlx::Error> {
    let mut sent = 0;
    for _ in 0..20 {
        let mut tx = pool.begin().await?;
        let Some(email) = store::lock_next_unsent(&mut tx).await? else {
            break;
        };
        match mailer.deliver(&email).await {
            Ok(()) => {
                store::mark_sent(&mut tx, email.order_id).await?;
                tx.commit().await?;
                metrics::counter!("emails_sent_total").increment(1);
                tracing::info!(order_id = %email.order_id, kind = %email.kind, message_id = %email.message_id, "email sent");
                sent += 1;
            }
            Err(e) => {
                tracing::warn!(order_id = %email.order_id, error = %e, "email not delivered; will retry");
                store::mark_failed(&mut tx, email.order_id, &format!("{e:#}")).await?;
                tx.commit().await?;
            }
        }
    }
    Ok(sent)
}

/// A recipient address for a user id: `<user>@example.com`, the local part reduced to
/// characters every mail system accepts.
pub fn recipient(user_id: &str) -> String {
    let mut local = String::new();
    for c in user_id.chars().take(64) {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
            c
        } else {
            '_'
        };
        // No empty dot-separated parts: `a..b` and leading or trailing dots are invalid.
        if c == '.' && (local.is_empty() || local.ends_with('.')) {
            continue;
        }
        local.push(c);
    }
    let local = local.trim_end_matches('.');
    let address = format!(
        "{}@example.com",
        if local.is_empty() { "customer" } else { local }
    );
    if address.parse::<lettre::Address>().is_ok() {
        address
    } else {
        "customer@example.com".into()
    }
}

/// The stable Message-ID of an order's email.
pub fn message_id(order_id: Uuid, kind: &str) -> String {
    format!("{order_id}.{kind}@demo.outbox-toolkit.invalid")
}

#[cfg(test)]
mod tests {
    use super::recipient;

    #[test]
    fn recipients_are_always_valid_addresses() {
        assert_eq!(recipient("alice"), "alice@example.com");
        assert_eq!(recipient("john..doe"), "john.doe@example.com");
        assert_eq!(recipient(".x."), "x@example.com");
        assert_eq!(recipient("a b/c"), "a_b_c@example.com");
        assert_eq!(recipient("..."), "customer@example.com");
        for hostile in ["", "é", "a@b", "\0", &"x".repeat(500)] {
            assert!(
                recipient(hostile).parse::<lettre::Address>().is_ok(),
                "{hostile:?}"
            );
        }
    }
}

fn lines_text(items: &[OrderLine]) -> String {
    items
        .iter()
        .map(|l| {
            format!(
                "  {} x {} ({}) at {:.2}\n",
                l.quantity,
                l.product_name,
                l.product_id,
                money(l.price_cents)
            )
        })
        .collect()
}

/// Records emails in the inbox transaction.
#[derive(Debug, Clone, Copy)]
struct Compose;

async fn queue(conn: &mut PgConnection, email: EmailRow) -> Result<(), HandlerError> {
    let queued = store::queue(conn, &email)
        .await
        .map_err(HandlerError::retry)?;
    if queued {
        metrics::counter!("emails_queued_total").increment(1);
        tracing::info!(order_id = %email.order_id, kind = %email.kind, "email queued");
    } else {
        tracing::warn!(order_id = %email.order_id, "order already has an email; not queued again");
    }
    Ok(())
}

impl Handler<OrderConfirmed> for Compose {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderConfirmed,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let body = format!(
            "Hello {},\n\nyour order {} is confirmed.\n\n{}\nTotal: {:.2}\n",
            event.user_id,
            event.order_id,
            lines_text(&event.items),
            money(event.total_cents)
        );
        let email = EmailRow {
            order_id: event.order_id,
            kind: "confirmation".into(),
            recipient: recipient(&event.user_id),
            subject: format!("Order {} confirmed", event.order_id),
            body,
            message_id: message_id(event.order_id, "confirmation"),
        };
        queue(conn, email).await
    }
}

impl Handler<OrderCancelled> for Compose {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderCancelled,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let body = format!(
            "Hello {},\n\nyour order {} was cancelled: {}.\n\n{}\nNothing was charged.\n",
            event.user_id,
            event.order_id,
            event.reason,
            lines_text(&event.items)
        );
        let email = EmailRow {
            order_id: event.order_id,
            kind: "cancellation".into(),
            recipient: recipient(&event.user_id),
            subject: format!("Order {} cancelled", event.order_id),
            body,
            message_id: message_id(event.order_id, "cancellation"),
        };
        queue(conn, email).await
    }
}
