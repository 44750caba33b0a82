//! email-service (port 3002). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `SMTP_URL` or `MAIL_DIR`, `RUST_LOG`.

use demo_services::{email, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::run_main(email::NAME, async {
        email::start(email::EmailConfig::from_env()?).await
    })
    .await
}
