//! Injecting the schedule's faults into the running stack, each at its time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use demo_services::events;

use super::{Fault, Relay, Service};
use crate::stack::Stack;

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

/// One look at the stream's placement.
async fn try_stream_placement(stack: &Stack) -> anyhow::Result<(String, Vec<String>)> {
    let client = demo_services::platform::NatsConfig {
        url: stack.nats_url.clone(),
        ..demo_services::platform::NatsConfig::default()
    }
    .connect()
    .await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(events::STREAM).await?;
    let info = stream.info().await?;
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

/// The process of `relay`.
fn process(stack: &mut Stack, relay: Relay) -> &mut testkit::Process {
    match relay {
        Relay::Order => &mut stack.order_relay,
        Relay::Inventory => &mut stack.inventory_relay,
    }
}

/// Injects one fault, and undoes it (restart, resume, restore) before returning.
async fn inject(stack: &mut Stack, fault: Fault) -> anyhow::Result<()> {
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
    Ok(())
}

/// Injects `faults`, each at its offset from `started`; returns how many were injected.
pub(super) async fn run_faults(
    stack: &mut Stack,
    faults: Vec<(Duration, Fault)>,
    started: Instant,
) -> anyhow::Result<usize> {
    let mut done = 0;
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
        inject(stack, fault)
            .await
            .with_context(|| format!("injecting {fault}"))?;
        done += 1;
    }
    Ok(done)
}
