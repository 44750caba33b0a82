//! Small chaos runs (the `chaos` binary, as `make chaos`, `make chaos CHAOS_ARGS="--source
//! wal"` and `make chaos-cluster` run it, with fewer orders and fixed seeds): every fault of
//! the schedule, then the invariants.

mod common;

use std::process::Command;
use std::sync::Mutex;

/// One chaos run at a time: each is a whole topology on 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos(args: &[&str]) -> String {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .env("RELAY_BIN", common::relay_bin())
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn a_small_chaos_run_loses_nothing_and_applies_nothing_twice() {
    let stdout = chaos(&["--orders", "200", "--rate", "20", "--seed", "11"]);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("chaos seed=11 orders=200 terminal=")
            && last.contains(" lost=0 duplicate_effects=0 ")
            && last.contains(" faults=13 ")
            && last.ends_with(" source=table resends=0"),
        "final line: {last}\n{stdout}"
    );
    let faults = stdout.lines().filter(|l| l.contains(" fault ")).count();
    assert_eq!(faults, 13, "{stdout}");
}

/// The WAL source: log storage, probes on both storages, relays streaming slots, and a relay
/// kept down longer than the duplicate window, whose re-sends the inboxes absorb.
#[test]
fn a_small_wal_chaos_run_loses_nothing_and_only_resends_what_was_unconfirmed() {
    let stdout = chaos(&[
        "--source", "wal", "--orders", "200", "--rate", "20", "--seed", "12",
    ]);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("chaos seed=12 orders=200 terminal=")
            && last.contains(" lost=0 duplicate_effects=0 ")
            && last.contains(" faults=14 ")
            && last.contains(" stream_missing=0 stream_dups=0 ")
            && last.contains(" source=wal resends="),
        "final line: {last}\n{stdout}"
    );
    assert!(stdout.contains("(past the duplicate window)"), "{stdout}");
    let resends: usize = last
        .rsplit("resends=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("resends count");
    assert!(
        resends > 0,
        "the relay killed in full flow re-sent its unconfirmed tail after the window: {last}"
    );
}

#[test]
fn a_small_cluster_chaos_run_survives_losing_the_stream_leader_and_a_follower() {
    let stdout = chaos(&[
        "--cluster",
        "--orders",
        "200",
        "--rate",
        "20",
        "--seed",
        "5",
    ]);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("chaos seed=5 orders=200 terminal=")
            && last.contains(" lost=0 duplicate_effects=0 ")
            && last.contains(" faults=2 "),
        "final line: {last}\n{stdout}"
    );
    assert!(
        stdout.contains("SIGKILL the stream leader node"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SIGKILL a stream follower node"),
        "{stdout}"
    );
}
