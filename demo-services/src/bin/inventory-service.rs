//! inventory-service (port 3003). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `RUST_LOG`.

use demo_services::{inventory, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::init_telemetry(inventory::NAME);
    let started = match platform::ServiceConfig::from_env(inventory::DEFAULT_PORT) {
        Ok(config) => inventory::start(config).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(service) => {
            service.run_until_signal().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inventory-service: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
