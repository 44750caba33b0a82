//! A small chaos run (the `chaos` binary, as `make chaos` runs it, with fewer orders and a
//! fixed seed): every fault of the schedule, then the invariants.

mod common;

use std::process::Command;

#[test]
fn a_small_chaos_run_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--orders", "200", "--rate", "20", "--seed", "11", "--dir"])
        .arg(dir.path())
        .env("RELAY_BIN", common::relay_bin())
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("chaos seed=11 orders=200 terminal=")
            && last.contains(" lost=0 duplicate_effects=0 ")
            && last.contains(" faults=13 "),
        "final line: {last}\n{stdout}"
    );
    let faults = stdout.lines().filter(|l| l.contains(" fault ")).count();
    assert_eq!(faults, 13, "{stdout}");
}
