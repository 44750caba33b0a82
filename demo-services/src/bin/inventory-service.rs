//! inventory-service (port 3003). Environment: `DATABASE_URL`, `NATS_URL`, `HTTP_ADDR`,
//! `RUST_LOG`.

use demo_services::{inventory, platform};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::run_main(inventory::NAME, async {
        inventory::start(platform::ServiceConfig::from_env(inventory::DEFAULT_PORT)?).await
    })
    .await
}
