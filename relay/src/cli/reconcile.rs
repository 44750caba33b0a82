//! `relay reconcile`: republishes rows the stream no longer holds.

use std::time::Duration;

use clap::Args;
use relay::publisher::jetstream::JetStreamPublisher;

use super::Global;
use super::duration::parse_duration;

#[derive(Args, Debug)]
pub(super) struct ReconcileArgs {
    /// RFC 3339 time (2026-11-22T10:00:00Z) or an age (30m, 2h).
    #[arg(long)]
    since: String,
    /// Only report what would be republished.
    #[arg(long)]
    dry_run: bool,
}

/// Compares the rows published since `--since` with the stream and republishes (or, with
/// `--dry-run`, counts) the missing ones.
pub(super) async fn reconcile(global: &Global, args: ReconcileArgs) -> anyhow::Result<()> {
    let ReconcileArgs { since, dry_run } = args;
    let since = parse_since(&since)?;
    let pool = global.pool(2)?;
    let client = global.nats_config(None).connect().await?;
    let publisher = JetStreamPublisher::new(client, Duration::from_secs(5), 1);
    let report =
        relay::reconcile::reconcile(&pool, publisher.context(), &global.stream, since, dry_run)
            .await?;
    println!(
        "checked={} present={} {}={}",
        report.checked,
        report.present,
        if dry_run {
            "would_republish"
        } else {
            "republished"
        },
        report.republished
    );
    Ok(())
}

/// An RFC 3339 time, or an age (a duration flag) before now.
fn parse_since(text: &str) -> anyhow::Result<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(at) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let age = parse_duration(text)
        .map_err(|e| anyhow::anyhow!("--since: {e}; or give an RFC 3339 time"))?;
    // Checked: an age from the command line must not overflow into a panic.
    time::Duration::try_from(age)
        .ok()
        .and_then(|age| time::OffsetDateTime::now_utc().checked_sub(age))
        .ok_or_else(|| anyhow::anyhow!("--since {text:?} reaches back too far"))
}
