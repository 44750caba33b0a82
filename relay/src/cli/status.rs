//! `relay status`: backlog, instances and dead letters.

use clap::Args;

use super::Global;

#[derive(Args, Debug)]
pub(super) struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints the status as text or, with `--json`, as one JSON object.
pub(super) async fn status(global: &Global, args: StatusArgs) -> anyhow::Result<()> {
    let pool = global.pool(1)?;
    let mut conn = pool.acquire().await?;
    let backlog = outbox::store::backlog(&mut conn).await?;
    let instances = relay::store::instances(&mut conn).await?;
    let dead = dlq::store::count_dead(&mut conn, dlq::Source::Relay).await?;
    if args.json {
        let value = serde_json::json!({
            "backlog": backlog.unpublished,
            "retrying": backlog.retrying,
            "oldest_pending_age_seconds": backlog.oldest_age_seconds,
            "dead_letters": dead,
            "instances": instances.iter().map(|i| serde_json::json!({
                "instance_id": i.instance_id,
                "heartbeat_age_seconds": i.heartbeat_age_seconds,
                "partitions": i.partitions,
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        println!(
            "backlog:           {} unpublished ({} retrying)",
            backlog.unpublished, backlog.retrying
        );
        println!("oldest pending:    {:.1}s", backlog.oldest_age_seconds);
        println!("dead letters:      {dead} (relay)");
        println!("instances:         {}", instances.len());
        for i in &instances {
            println!(
                "  {:<40} {:>3} partitions, heartbeat {:.1}s ago",
                i.instance_id, i.partitions, i.heartbeat_age_seconds
            );
        }
    }
    Ok(())
}
