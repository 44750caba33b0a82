//! `relay notify`: installs, removes or reports the NOTIFY trigger.

use clap::{Args, ValueEnum};

use super::Global;

#[derive(Args, Debug)]
pub(super) struct NotifyArgs {
    #[arg(value_enum)]
    action: NotifyAction,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NotifyAction {
    /// Install the trigger (producers then pay one NOTIFY per transaction).
    Enable,
    /// Remove it (relays poll only).
    Disable,
    /// Say whether it is installed.
    Status,
}

/// Carries out `args.action`.
pub(super) async fn notify(global: &Global, args: NotifyArgs) -> anyhow::Result<()> {
    let pool = global.pool(1)?;
    let mut conn = pool.acquire().await?;
    match args.action {
        NotifyAction::Enable => {
            relay::store::enable_notify(&mut conn).await?;
            println!("notify trigger installed: run relays with --listen-notify");
        }
        NotifyAction::Disable => {
            relay::store::disable_notify(&mut conn).await?;
            println!("notify trigger removed");
        }
        NotifyAction::Status => {
            let on = relay::store::notify_enabled(&mut conn).await?;
            println!(
                "notify trigger {}",
                if on { "installed" } else { "not installed" }
            );
        }
    }
    Ok(())
}
