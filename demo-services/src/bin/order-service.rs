//! order-service (port 3001). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `PAYMENT_SUCCESS_RATE`, `PAYMENT_SEED`, `RUST_LOG`.

use demo_services::{order, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::init_telemetry(order::NAME);
    let started = match order::OrderConfig::from_env() {
        Ok(config) => order::start(config).await,
        Err(e) => Err(e),
    };
    match started {
        Ok(service) => {
            service.run_until_signal().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("order-service: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
