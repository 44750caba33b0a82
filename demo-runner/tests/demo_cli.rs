//! The `demo` binary as `make demo` and `make up` run it, and email delivery over SMTP to a
//! real SMTP server (aiosmtpd, installed by `make tools`).

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use demo_runner::client;

use serde_json::json;
use testkit::{Process, ProcessSpec};

#[test]
fn demo_run_places_the_orders_prints_a_summary_and_exits_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_demo"))
        .arg("run")
        .arg("--dir")
        .arg(dir.path())
        .env("RELAY_BIN", common::relay_bin())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "Orders (12):",
        "insufficient stock for prod-001: requested 20",
        "payment failed: card declined (simulated)",
        "prod-001 Laptop  started  10, available   3, sold   7, reserved 0",
        "Emails: 12 sent (9 confirmations, 3 cancellations)",
        "received inventory.released.v1",
        "Invariants: every order final; 2 payment failures compensated",
        "demo: ok",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let trace_line = stdout
        .lines()
        .find(|l| l.starts_with("Trace "))
        .expect("a trace line");
    assert!(
        !trace_line.contains(" 0,") && !trace_line.ends_with(" 0"),
        "{trace_line}"
    );
    let emails = std::fs::read_dir(dir.path().join("mail"))
        .expect("mail dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        })
        .count();
    assert_eq!(emails, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_up_answers_the_readme_commands_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("demo-up.log");
    let mut demo = Process::spawn(ProcessSpec {
        name: "demo up",
        program: env!("CARGO_BIN_EXE_demo").into(),
        args: vec![
            "up".into(),
            "--dir".into(),
            dir.path().as_os_str().to_owned(),
        ],
        env: vec![(OsString::from("RELAY_BIN"), common::relay_bin().into())],
        cwd: dir.path().to_path_buf(),
        log: log.clone(),
    })
    .expect("start demo up");
    testkit::wait_for(Duration::from_secs(90), "demo up to be running", || {
        let log = log.clone();
        let exited = demo.exit_status();
        async move {
            if let Some(status) = exited {
                anyhow::bail!("demo up exited ({status})");
            }
            anyhow::Ok(
                std::fs::read_to_string(&log)?
                    .contains("demo: running")
                    .then_some(()),
            )
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", demo.log_tail()));

    // The README's curl commands, in order.
    let order = "http://127.0.0.1:3001";
    let inventory = "http://127.0.0.1:3003";
    let created = client::post_json(
        &format!("{order}/orders"),
        &json!({"userId":"u1","items":[{"productId":"prod-002","productName":"Mouse","quantity":2,"price":29.99}]}),
    )
    .await
    .expect("POST /orders");
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.json["status"], "PENDING");
    assert_eq!(created.json["total"], json!(59.98));
    let id = created.json["orderId"]
        .as_str()
        .expect("orderId")
        .to_owned();
    let r = client::get(&format!("{order}/orders/{id}"))
        .await
        .expect("GET order");
    assert_eq!(r.status, 200);
    testkit::wait_for(
        Duration::from_secs(30),
        "the order to be confirmed",
        || async {
            let order = client::get(&format!("{order}/orders/{id}")).await?;
            anyhow::Ok((order.json["status"] == "CONFIRMED").then_some(()))
        },
    )
    .await
    .expect("confirmed");
    let events = client::get(&format!("{order}/orders/{id}/events"))
        .await
        .expect("events");
    assert_eq!(events.json["events"][0]["type"], "order.created.v1");
    let mine = client::get(&format!("{order}/orders/user/u1"))
        .await
        .expect("user orders");
    assert_eq!(mine.json["orders"][0]["orderId"], id.as_str());
    let r = client::post_json(&format!("{order}/orders/{id}/cancel"), &json!({}))
        .await
        .expect("cancel");
    assert_eq!(
        r.status, 409,
        "a confirmed order cannot be cancelled: {}",
        r.text
    );
    let stock = client::get(&format!("{inventory}/inventory/prod-002"))
        .await
        .expect("stock");
    assert_eq!(stock.json["available"], 48);
    let restocked = client::post_json(
        &format!("{inventory}/inventory/prod-002/restock"),
        &json!({"quantity": 5}),
    )
    .await
    .expect("restock");
    assert_eq!(restocked.json["available"], 53);
    let keyboard = client::post_json(
        &format!("{inventory}/inventory"),
        &json!({"product_id":"prod-003","name":"Keyboard","quantity":20,"price":49.5}),
    )
    .await
    .expect("create product");
    assert_eq!(keyboard.status, 201, "{}", keyboard.text);
    assert_eq!(keyboard.json["available"], 20);
    let ready = client::get(&format!("{order}/health/ready"))
        .await
        .expect("ready");
    assert_eq!(ready.status, 200, "{}", ready.text);
    // The service's inbox consumer is part of its readiness.
    assert_eq!(ready.json["consumer"]["ready"], true, "{}", ready.text);
    assert_eq!(ready.json["consumer"]["database"], true, "{}", ready.text);
    let metrics = client::get(&format!("{order}/metrics"))
        .await
        .expect("metrics");
    assert!(
        metrics.text.contains("orders_created_total 1"),
        "{}",
        metrics.text
    );

    demo.interrupt(Duration::from_secs(60))
        .await
        .expect("demo up stops on ctrl-c");
    let out = std::fs::read_to_string(&log).expect("log");
    assert!(out.contains("demo: stopped"), "{out}");
    assert!(
        client::get(&format!("{order}/health")).await.is_err(),
        "order-service still answers after ctrl-c"
    );
}

/// `python3` with aiosmtpd on its path (installed into `.tools/python` by `make tools`).
fn aiosmtpd_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/python");
    assert!(
        path.join("aiosmtpd").exists(),
        "aiosmtpd is missing from {}: run `make tools`",
        path.display()
    );
    path
}

/// Starts aiosmtpd storing what it receives in the Maildir `<dir>/maildir`; returns the
/// process and its port.
async fn start_smtp_server(dir: &Path) -> (Process, u16) {
    let maildir = dir.join("maildir");
    let port = testkit::free_port().expect("port");
    let smtp = Process::spawn(ProcessSpec {
        name: "aiosmtpd",
        program: "python3".into(),
        args: [
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ]
        .iter()
        .map(OsString::from)
        .chain([maildir.as_os_str().to_owned()])
        .collect(),
        env: vec![(OsString::from("PYTHONPATH"), aiosmtpd_path().into())],
        cwd: dir.to_path_buf(),
        log: dir.join("smtp.log"),
    })
    .expect("start aiosmtpd");
    testkit::wait_until(
        Duration::from_secs(30),
        "the SMTP server to listen",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await
    .expect("smtp up");
    (smtp, port)
}

/// The messages in the Maildir's `new/`.
fn received(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("maildir/new")) else {
        return Vec::new();
    };
    entries
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_go_through_smtp_once_per_order_with_stable_message_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_smtp, port) = start_smtp_server(dir.path()).await;
    let always = common::always_pay();
    let (stack, _run) = common::start(always, Some(format!("smtp://127.0.0.1:{port}"))).await;
    stack.seed().await.expect("seed");
    let confirmed = stack
        .place_order("ann", &[("prod-002", 1)])
        .await
        .expect("order");
    let cancelled = stack
        .place_order("ben", &[("prod-001", 99)])
        .await
        .expect("order");
    let orders = stack
        .wait_terminal(
            &[confirmed.clone(), cancelled.clone()],
            Duration::from_secs(60),
        )
        .await
        .expect("final");
    let invariants = stack
        .check_invariants(&orders, &[("prod-001", 10), ("prod-002", 50)])
        .await
        .expect("invariants");
    assert_eq!(invariants.emails_sent, 2);
    assert!(
        invariants.mail_files.is_empty(),
        "SMTP mode writes no files"
    );

    let messages = received(dir.path());
    assert_eq!(messages.len(), 2, "one email per order: {messages:?}");
    for (order, kind, to) in [
        (&confirmed, "confirmation", "ann@example.com"),
        (&cancelled, "cancellation", "ben@example.com"),
    ] {
        let id = format!("Message-ID: <{order}.{kind}@demo.outbox-toolkit.invalid>");
        let message = messages
            .iter()
            .find(|m| m.contains(&id))
            .unwrap_or_else(|| panic!("no message with {id}: {messages:?}"));
        assert!(message.contains(&format!("To: {to}")), "{message}");
    }
    stack.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_service_killed_mid_send_sends_the_email_once_after_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_smtp, port) = start_smtp_server(dir.path()).await;
    // The SMTP connection goes through a proxy that we stall, so the send hangs mid-way.
    let proxy = testkit::TcpProxy::start(([127, 0, 0, 1], port).into())
        .await
        .expect("proxy");
    let always = common::always_pay();
    let (mut stack, _run) = common::start(always, Some(format!("smtp://{}", proxy.addr()))).await;
    stack.seed().await.expect("seed");
    proxy.stall();
    let order = stack
        .place_order("cy", &[("prod-002", 1)])
        .await
        .expect("order");
    stack
        .wait_terminal(std::slice::from_ref(&order), Duration::from_secs(60))
        .await
        .expect("final");
    let email_db = stack.db.email.clone();
    testkit::wait_for(
        Duration::from_secs(30),
        "the email to be recorded",
        || async {
            let counts =
                demo_services::email::store::counts(&mut *email_db.acquire().await?).await?;
            anyhow::Ok((counts == (0, 1)).then_some(()))
        },
    )
    .await
    .expect("recorded");

    stack.email.kill().expect("SIGKILL email-service");
    assert!(
        received(dir.path()).is_empty(),
        "nothing got through the stalled link"
    );
    proxy.unstall();
    stack.email.restart().expect("restart email-service");

    testkit::wait_for(Duration::from_secs(60), "the email to be sent", || async {
        let counts = demo_services::email::store::counts(&mut *email_db.acquire().await?).await?;
        anyhow::Ok((counts == (1, 0)).then_some(()))
    })
    .await
    .expect("sent");
    let messages = received(dir.path());
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0].contains(&format!("Message-ID: <{order}.confirmation@")));
    stack.stop().await.expect("clean stop");
}
