//! `relay --help` never prints a secret from the environment, e.g. a password in `NATS_URL`.

use std::process::Command;

/// Runs the relay binary with `args` and `NATS_URL` set; returns (exit code, stdout, stderr).
fn relay_with_nats_url(args: &[&str], nats_url: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("NATS_URL", nats_url)
        .env("RUST_LOG", "error")
        .output()
        .expect("run relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_does_not_print_the_nats_url_from_the_environment() {
    let url = "nats://u:secret@127.0.0.1:1";
    for args in [&["run", "--help"][..], &["--help"], &["stream", "--help"]] {
        let (code, out, err) = relay_with_nats_url(args, url);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            out.contains("NATS_URL"),
            "{args:?} documents NATS_URL:\n{out}"
        );
        assert!(
            !out.contains("secret") && !err.contains("secret"),
            "{args:?} prints the NATS password:\n{out}{err}"
        );
    }
}
