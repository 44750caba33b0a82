//! email-service (port 3002). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `SMTP_URL` or `MAIL_DIR`, `RUST_LOG`.

use demo_services::{email, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::init_telemetry(email::NAME);
    let started = match email::EmailConfig::from_env() {
        Ok(config) => email::start(config).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(service) => {
            service.run_until_signal().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("email-service: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
