//! The fault schedule: which faults a run injects, and when, from its seed.

use std::fmt;
use std::time::Duration;

/// A small seeded generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform milliseconds in `[lo, hi)`.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// Which relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// order-service's.
    Order,
    /// inventory-service's.
    Inventory,
}

/// Which consumer service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// inventory-service.
    Inventory,
    /// email-service.
    Email,
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL nats-server, restart it on the same store after `down`.
    KillBroker {
        /// Time down.
        down: Duration,
    },
    /// SIGSTOP nats-server for `hung`, then SIGKILL it (a hung broker killed by a watchdog):
    /// what clients sent during the hang dies in its socket buffers. Restart after `down`.
    HangThenKillBroker {
        /// Time frozen before the kill (longer than the relays' 5 s publish timeout).
        hung: Duration,
        /// Time down.
        down: Duration,
    },
    /// SIGSTOP nats-server for `paused` (longer than the relays' 5 s publish timeout).
    PauseBroker {
        /// Time frozen.
        paused: Duration,
    },
    /// SIGKILL a relay, restart it after `down`.
    KillRelay {
        /// Which.
        relay: Relay,
        /// Time down.
        down: Duration,
    },
    /// SIGKILL a WAL relay and keep it down for `down`, longer than the stream's duplicate
    /// window: on restart it re-sends what its slot had not confirmed, and the stream stores
    /// those again (the inboxes absorb them; the stream check counts them as re-sends).
    KillRelayPastWindow {
        /// Which.
        relay: Relay,
        /// Time down.
        down: Duration,
    },
    /// SIGTERM a relay while it drains, restart it.
    TermRelay {
        /// Which.
        relay: Relay,
    },
    /// SIGKILL a consumer service (mid-handler under load), restart it after `down`.
    KillService {
        /// Which.
        service: Service,
        /// Time down.
        down: Duration,
    },
    /// PostgreSQL immediate shutdown (no checkpoint), restart after `down`.
    RestartPostgres {
        /// Time down.
        down: Duration,
    },
    /// 200 ms latency each way on order-service's relay link for `during`.
    SlowRelayLink {
        /// How long.
        during: Duration,
    },
    /// Cut order-service's relay link (every connection closed, new ones refused) for `during`.
    CutRelayLink {
        /// How long.
        during: Duration,
    },
    /// SIGKILL the cluster node that leads the saga's stream, restart it after `down`.
    KillStreamLeader {
        /// Time down.
        down: Duration,
    },
    /// SIGKILL a cluster node that follows the saga's stream, restart it after `down`.
    KillStreamFollower {
        /// Time down.
        down: Duration,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillBroker { down } => write!(f, "SIGKILL nats-server, restart after {down:?}"),
            Fault::PauseBroker { paused } => write!(f, "SIGSTOP nats-server for {paused:?}"),
            Fault::HangThenKillBroker { hung, down } => write!(
                f,
                "SIGSTOP nats-server for {hung:?}, then SIGKILL it, restart after {down:?}"
            ),
            Fault::KillRelay { relay, down } => {
                write!(f, "SIGKILL {relay:?} relay, restart after {down:?}")
            }
            Fault::KillRelayPastWindow { relay, down } => write!(
                f,
                "SIGKILL {relay:?} relay, restart after {down:?} (past the duplicate window)"
            ),
            Fault::TermRelay { relay } => {
                write!(f, "SIGTERM {relay:?} relay while draining, restart")
            }
            Fault::KillService { service, down } => {
                write!(f, "SIGKILL {service:?} service, restart after {down:?}")
            }
            Fault::RestartPostgres { down } => {
                write!(f, "PostgreSQL immediate shutdown, restart after {down:?}")
            }
            Fault::SlowRelayLink { during } => write!(
                f,
                "200 ms latency on the order relay's broker link for {during:?}"
            ),
            Fault::CutRelayLink { during } => {
                write!(f, "cut the order relay's broker link for {during:?}")
            }
            Fault::KillStreamLeader { down } => {
                write!(f, "SIGKILL the stream leader node, restart after {down:?}")
            }
            Fault::KillStreamFollower { down } => {
                write!(f, "SIGKILL a stream follower node, restart after {down:?}")
            }
        }
    }
}

/// The fault schedule for `seed` over a load of `load` duration: every fault the suite
/// promises, in a seeded order, at seeded times spread over the load. With
/// `past_window: Some(window)` (WAL relays and a stream whose duplicate window is `window`),
/// also a relay kept down 5 s longer than that, as the first fault.
pub fn schedule(
    seed: u64,
    load: Duration,
    past_window: Option<Duration>,
) -> Vec<(Duration, Fault)> {
    let mut rng = Rng::new(seed ^ 0x00c4_a05f_a017);
    let mut faults = vec![
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::KillBroker {
            down: rng.millis(500, 3000),
        },
        Fault::PauseBroker {
            paused: Duration::from_secs(7),
        },
        Fault::HangThenKillBroker {
            hung: Duration::from_secs(6),
            down: rng.millis(500, 2000),
        },
        Fault::KillRelay {
            relay: Relay::Order,
            down: rng.millis(200, 2000),
        },
        Fault::KillRelay {
            relay: Relay::Inventory,
            down: rng.millis(200, 2000),
        },
        Fault::TermRelay {
            relay: if rng.below(2) == 0 {
                Relay::Order
            } else {
                Relay::Inventory
            },
        },
        Fault::KillService {
            service: Service::Inventory,
            down: rng.millis(200, 2000),
        },
        Fault::KillService {
            service: Service::Email,
            down: rng.millis(200, 2000),
        },
        Fault::RestartPostgres {
            down: rng.millis(200, 1500),
        },
        Fault::SlowRelayLink {
            during: Duration::from_secs(4),
        },
        Fault::CutRelayLink {
            during: rng.millis(1000, 3000),
        },
    ];
    for i in (1..faults.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        faults.swap(i, j);
    }
    if let Some(window) = past_window {
        // First, so that it falls while the load flows (after no other fault): the relay
        // dies with a tail of published, unconfirmed messages, which it sends again after
        // the window.
        let relay = if rng.below(2) == 0 {
            Relay::Order
        } else {
            Relay::Inventory
        };
        faults.insert(
            0,
            Fault::KillRelayPastWindow {
                relay,
                down: window + Duration::from_secs(5),
            },
        );
    }
    let n = faults.len() as u32;
    let slot = load / n;
    faults
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let jitter = rng.millis(0, (slot.as_millis() as u64 / 2).max(1));
            (slot * i as u32 + slot / 4 + jitter, fault)
        })
        .collect()
}

/// The cluster schedule for `seed`: the stream leader SIGKILLed at about a third of the load,
/// a follower at about two thirds.
pub fn cluster_schedule(seed: u64, load: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = Rng::new(seed ^ 0x0c1_5e7e);
    vec![
        (
            load / 4 + rng.millis(0, (load.as_millis() as u64 / 8).max(1)),
            Fault::KillStreamLeader {
                down: rng.millis(1000, 4000),
            },
        ),
        (
            load * 3 / 5 + rng.millis(0, (load.as_millis() as u64 / 8).max(1)),
            Fault::KillStreamFollower {
                down: rng.millis(1000, 4000),
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_holds_every_promised_fault_and_follows_the_seed() {
        let load = Duration::from_secs(50);
        let a = schedule(5, load, None);
        assert_eq!(a, schedule(5, load, None), "same seed, same schedule");
        assert_ne!(a, schedule(6, load, None), "another seed, another schedule");
        assert!(
            !a.iter()
                .any(|(_, f)| matches!(f, Fault::KillRelayPastWindow { .. }))
        );
        let window = Duration::from_secs(20);
        let wal = schedule(5, load, Some(window));
        assert_eq!(wal.len(), a.len() + 1);
        assert_eq!(
            wal.iter()
                .filter(
                    |(_, f)| matches!(f, Fault::KillRelayPastWindow { down, .. } if *down > window)
                )
                .count(),
            1,
            "one relay kept down past the window: {wal:?}"
        );
        assert!(
            matches!(wal[0].1, Fault::KillRelayPastWindow { .. }),
            "first"
        );
        let count = |f: fn(&Fault) -> bool| a.iter().filter(|(_, x)| f(x)).count();
        assert_eq!(count(|f| matches!(f, Fault::KillBroker { .. })), 3);
        assert_eq!(
            count(
                |f| matches!(f, Fault::PauseBroker { paused } if *paused > Duration::from_secs(5))
            ),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::HangThenKillBroker { .. })), 1);
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillRelay {
                    relay: Relay::Order,
                    ..
                }
            )),
            1
        );
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillRelay {
                    relay: Relay::Inventory,
                    ..
                }
            )),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::TermRelay { .. })), 1);
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillService {
                    service: Service::Inventory,
                    ..
                }
            )),
            1
        );
        assert_eq!(
            count(|f| matches!(
                f,
                Fault::KillService {
                    service: Service::Email,
                    ..
                }
            )),
            1
        );
        assert_eq!(count(|f| matches!(f, Fault::RestartPostgres { .. })), 1);
        assert_eq!(count(|f| matches!(f, Fault::SlowRelayLink { .. })), 1);
        assert_eq!(count(|f| matches!(f, Fault::CutRelayLink { .. })), 1);
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        assert!(a.iter().all(|(at, _)| *at < load), "all during the load");
    }
}
