//! order-service (port 3001). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `PAYMENT_SUCCESS_RATE`, `PAYMENT_SEED`, `RUST_LOG`.

use demo_services::{order, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::run_main(order::NAME, async {
        order::start(order::OrderConfig::from_env()?).await
    })
    .await
}
