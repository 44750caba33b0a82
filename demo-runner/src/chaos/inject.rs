//! Injecting the schedule's faults into the running stack, each at its time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use demo_services::events;

use super::{Fault, Relay, ResendAllowance, Service};
use crate::stack::{INVENTORY_SLOT, ORDER_SLOT, Stack};
use crate::store;

/// The names of the saga stream's leader and followers, as the cluster reports them
/// (asking again for up to 30 s while a new leader is being elected).
async fn stream_placement(stack: &Stack) -> anyhow::Result<(String, Vec<String>)> {
    let placement = testkit::wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "the cluster to report the stream's placement",
        || async { try_stream_placement(stack).await.map(Some) },
    )
    .await?;
    Ok(placement)
}

/// The saga stream's info, on a connection of its own.
async fn saga_stream_info(stack: &Stack) -> anyhow::Result<async_nats::jetstream::stream::Info> {
    let client = demo_services::platform::NatsConfig {
        url: stack.nats_url.clone(),
        ..demo_services::platform::NatsConfig::default()
    }
    .connect()
    .await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(events::STREAM).await?;
    Ok(stream.info().await?.clone())
}

/// One look at the stream's placement.
async fn try_stream_placement(stack: &Stack) -> anyhow::Result<(String, Vec<String>)> {
    let info = saga_stream_info(stack).await?;
    let cluster = info
        .cluster
        .clone()
        .context("the stream has no cluster info")?;
    let leader = cluster.leader.context("the stream has no leader")?;
    let followers = cluster.replicas.iter().map(|r| r.name.clone()).collect();
    Ok((leader, followers))
}

/// The cluster node called `name`.
fn node<'a>(stack: &'a mut Stack, name: &str) -> anyhow::Result<&'a mut testkit::NatsServer> {
    if stack.nats.server_name().as_deref() == Some(name) {
        return Ok(&mut stack.nats);
    }
    stack
        .nats_peers
        .iter_mut()
        .find(|n| n.server_name().as_deref() == Some(name))
        .with_context(|| format!("no cluster node named {name}"))
}

/// The saga stream's last sequence (asking again for up to 30 s while the broker starts).
async fn stream_last_sequence(stack: &Stack) -> anyhow::Result<u64> {
    testkit::wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "the stream's last sequence",
        || async { anyhow::Ok(Some(saga_stream_info(stack).await?.state.last_sequence)) },
    )
    .await
    .map_err(Into::into)
}

/// The confirmed position of `relay` (where a new session resumes: the greater of its slot's
/// and its own record) once no walsender streams the slot any more (the killed relay's
/// walsender notices the lost connection and lets go).
async fn released_slot_position(stack: &Stack, relay: Relay) -> anyhow::Result<i64> {
    let pool = relay_database(stack, relay);
    let slot = match relay {
        Relay::Order => ORDER_SLOT,
        Relay::Inventory => INVENTORY_SLOT,
    };
    testkit::wait_for(
        Duration::from_secs(30),
        &format!("the slot {slot} to be released by its killed relay"),
        || async {
            let mut conn = pool.acquire().await?;
            match store::slot_position(&mut conn, slot).await? {
                Some((false, confirmed)) => anyhow::Ok(Some(confirmed)),
                Some((true, _)) => Ok(None),
                None => Err(anyhow::anyhow!("the slot {slot} does not exist")),
            }
        },
    )
    .await
    .map_err(Into::into)
}

/// The database `relay` reads.
fn relay_database(stack: &Stack, relay: Relay) -> &sqlx::PgPool {
    match relay {
        Relay::Order => &stack.db.orders,
        Relay::Inventory => &stack.db.inventory,
    }
}

/// The name of `relay`'s outbox in the stream check.
fn outbox_of(relay: Relay) -> &'static str {
    match relay {
        Relay::Order => "orders",
        Relay::Inventory => "inventory",
    }
}

/// The process of `relay`.
fn process(stack: &mut Stack, relay: Relay) -> &mut testkit::Process {
    match relay {
        Relay::Order => &mut stack.order_relay,
        Relay::Inventory => &mut stack.inventory_relay,
    }
}

/// Injects one fault, and undoes it (restart, resume, restore) before returning; for a relay
/// kept down past the duplicate window, what it may re-send.
async fn inject(stack: &mut Stack, fault: Fault) -> anyhow::Result<Option<ResendAllowance>> {
    match fault {
        Fault::KillBroker { down } => {
            stack.nats.kill()?;
            tokio::time::sleep(down).await;
            stack.nats.restart().await?;
        }
        Fault::PauseBroker { paused } => {
            stack.nats.pause()?;
            tokio::time::sleep(paused).await;
            stack.nats.resume()?;
        }
        Fault::HangThenKillBroker { hung, down } => {
            stack.nats.pause()?;
            tokio::time::sleep(hung).await;
            stack.nats.kill()?;
            tokio::time::sleep(down).await;
            stack.nats.restart().await?;
        }
        Fault::KillRelay { relay, down } => {
            process(stack, relay).kill()?;
            tokio::time::sleep(down).await;
            process(stack, relay).restart()?;
        }
        Fault::KillRelayPastWindow { relay, down } => {
            // Killed in full flow (or after 20 s without it, if the load is over): the
            // stream has grown since the fault came up.
            let from = stream_last_sequence(stack).await?;
            let flowing = testkit::wait_for_every(
                Duration::from_secs(20),
                Duration::from_millis(100),
                "the stream to grow",
                || async {
                    let now = stream_last_sequence(stack).await?;
                    anyhow::Ok((now >= from + 100).then_some(()))
                },
            )
            .await
            .is_ok();
            if !flowing {
                println!("chaos:   (the stream did not grow: killing it idle)");
            }
            process(stack, relay).kill()?;
            let killed_at_lsn = {
                let mut conn = relay_database(stack, relay).acquire().await?;
                store::current_wal_position(&mut conn).await?
            };
            let confirmed_lsn = released_slot_position(stack, relay).await?;
            println!("chaos:   it had confirmed up to LSN {confirmed_lsn}");
            tokio::time::sleep(down).await;
            let stream_seq_at_restart = stream_last_sequence(stack).await?;
            process(stack, relay).restart()?;
            println!("chaos:   restarted at stream sequence {stream_seq_at_restart}");
            return Ok(Some(ResendAllowance {
                outbox: outbox_of(relay),
                confirmed_lsn,
                killed_at_lsn,
                stream_seq_at_restart,
            }));
        }
        Fault::TermRelay { relay } => {
            process(stack, relay)
                .terminate(Duration::from_secs(40))
                .await?;
            process(stack, relay).restart()?;
        }
        Fault::KillService { service, down } => {
            let p = match service {
                Service::Inventory => &mut stack.inventory,
                Service::Email => &mut stack.email,
            };
            p.kill()?;
            tokio::time::sleep(down).await;
            p.restart()?;
        }
        Fault::RestartPostgres { down } => {
            stack.postgres.stop_immediate().await?;
            tokio::time::sleep(down).await;
            stack.postgres.restart().await?;
        }
        Fault::SlowRelayLink { during } => {
            let proxy = stack.order_relay_proxy.as_ref().context("no relay proxy")?;
            proxy.set_latency(Duration::from_millis(200));
            tokio::time::sleep(during).await;
            proxy.set_latency(Duration::ZERO);
        }
        Fault::KillStreamLeader { down } | Fault::KillStreamFollower { down } => {
            let (leader, followers) = stream_placement(stack).await?;
            let name = match fault {
                Fault::KillStreamLeader { .. } => leader,
                _ => followers
                    .first()
                    .cloned()
                    .context("the stream has no follower")?,
            };
            println!("chaos:   node {name}");
            let victim = node(stack, &name)?;
            victim.kill()?;
            tokio::time::sleep(down).await;
            node(stack, &name)?.restart().await?;
        }
        Fault::CutRelayLink { during } => {
            let proxy = stack.order_relay_proxy.as_ref().context("no relay proxy")?;
            proxy.cut();
            tokio::time::sleep(during).await;
            proxy.restore();
        }
    }
    Ok(None)
}

/// Injects `faults`, each at its offset from `started`; returns how many were injected, and
/// what the relay kept down past the duplicate window (if one was) may re-send.
pub(super) async fn run_faults(
    stack: &mut Stack,
    faults: Vec<(Duration, Fault)>,
    started: Instant,
) -> anyhow::Result<(usize, Option<ResendAllowance>)> {
    let mut done = 0;
    let mut resends = None;
    for (at, fault) in faults {
        let now = started.elapsed();
        if at > now {
            tokio::time::sleep(at - now).await;
        }
        println!(
            "chaos: t={:>5.1}s fault {}: {fault}",
            started.elapsed().as_secs_f64(),
            done + 1
        );
        if let Some(allowed) = inject(stack, fault)
            .await
            .with_context(|| format!("injecting {fault}"))?
        {
            resends = Some(allowed);
        }
        done += 1;
    }
    Ok((done, resends))
}
