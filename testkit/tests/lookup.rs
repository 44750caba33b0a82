//! Binary lookup: explicit locations must be right, old nats-server versions are refused, and
//! the errors are one line naming the install command.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::PermissionsExt;

use testkit::{Error, find_nats_server, find_postgres_bin_dir};

fn assert_one_line_naming(error: &Error, command: &str) {
    let message = error.to_string();
    assert!(message.contains(command), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[test]
fn a_wrong_nats_server_bin_is_an_error_naming_make_tools() {
    let error = find_nats_server(Some(OsStr::new("/nonexistent"))).expect_err("no binary there");
    assert!(matches!(error, Error::NatsServerNotFound { .. }), "{error}");
    assert!(error.to_string().contains("/nonexistent"), "{error}");
    assert_one_line_naming(&error, "make tools");
}

#[test]
fn nats_server_older_than_2_10_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = dir.path().join("nats-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.9.10'\n").expect("write fake");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod fake");
    // Another test thread forking while the file was open for writing makes exec fail with
    // ETXTBSY until that child has exec'd; retry a bounded number of times.
    let error = (0..100)
        .map(|_| find_nats_server(Some(fake.as_os_str())))
        .find(|result| {
            !matches!(result, Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::ExecutableFileBusy)
        })
        .expect("the fake binary runs")
        .expect_err("2.9.10 is too old");
    assert!(matches!(error, Error::NatsServerTooOld { .. }), "{error}");
    assert!(error.to_string().contains("v2.9.10"), "{error}");
    assert_one_line_naming(&error, "make tools");
}

#[test]
fn the_default_nats_server_lookup_finds_a_recent_server() {
    let path = find_nats_server(None).expect("nats-server in .tools/bin or PATH");
    assert!(path.ends_with("nats-server"), "{}", path.display());
}

#[test]
fn a_wrong_pg_bin_is_an_error_naming_apt_get() {
    let error = find_postgres_bin_dir(Some(OsStr::new("/nonexistent"))).expect_err("no binaries");
    assert!(matches!(error, Error::PostgresNotFound { .. }), "{error}");
    assert!(error.to_string().contains("/nonexistent"), "{error}");
    assert_one_line_naming(&error, "apt-get install postgresql");
}

#[test]
fn the_default_postgres_lookup_finds_server_binaries() {
    let dir = find_postgres_bin_dir(None).expect("PostgreSQL installed");
    assert!(
        dir.join("postgres").is_file() && dir.join("initdb").is_file(),
        "{}",
        dir.display()
    );
}
