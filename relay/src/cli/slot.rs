//! `relay slot`: creates, inspects and drops the replication slot of `run --source wal`.

use clap::{Args, Subcommand};
use relay::wal::SlotName;
use relay::wal::store;

use super::Global;

#[derive(Args, Debug)]
pub(super) struct SlotArgs {
    #[command(subcommand)]
    action: SlotAction,
    /// The slot and publication name.
    #[arg(long, env = "RELAY_SLOT", default_value = SlotName::DEFAULT, global = true)]
    slot: String,
}

#[derive(Subcommand, Debug)]
enum SlotAction {
    /// Create the publication and the pgoutput slot (from now on: create it before producers
    /// write to the log).
    Create,
    /// Show the slot: active, confirmed position, retained WAL, lag (JSON).
    Status,
    /// Drop the slot and its publication (refused while a relay streams it).
    Drop,
}

/// Carries out `args.action`.
pub(super) async fn slot(global: &Global, args: SlotArgs) -> anyhow::Result<()> {
    let slot = SlotName::new(args.slot)?;
    let pool = global.pool(1)?;
    let mut conn = pool.acquire().await?;
    match args.action {
        SlotAction::Create => {
            if store::create_slot(&mut conn, &slot).await? {
                println!("slot {slot} created: run relays with --source wal --slot {slot}");
            } else {
                println!("slot {slot} already exists");
            }
        }
        SlotAction::Status => match store::status(&mut conn, &slot).await? {
            Some(status) => println!("{}", serde_json::to_string_pretty(&status)?),
            None => anyhow::bail!("slot {slot} does not exist (relay slot create makes it)"),
        },
        SlotAction::Drop => {
            if store::drop_slot(&mut conn, &slot).await? {
                println!("slot {slot} and its publication dropped");
            } else {
                println!("slot {slot} does not exist");
            }
        }
    }
    Ok(())
}
