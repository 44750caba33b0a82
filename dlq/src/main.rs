//! The `dlq` CLI: inspect, retry and purge dead letters.
//!
//! Exit codes: 0 done; 1 failed (e.g. the database is unreachable); 2 bad usage or a refused
//! confirmation; 3 an id that does not exist, or nothing matched.
//!
//! Text output (tables, `show`, messages) escapes control characters, so a dead letter cannot
//! drive the operator's terminal (see `display`); `--json` output is exact.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dlq::actions::{self, ActionError};
use dlq::display;
use dlq::store::{self, Filter, Stored};
use sqlx::{Connection, PgConnection};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;

/// Inspect, retry and purge dead letters.
#[derive(Parser, Debug)]
#[command(name = "dlq", version, about)]
struct Cli {
    /// PostgreSQL URL of the service database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// Longest wait for the database, in seconds, before the command gives up (exit 1); a
    /// change it had not committed is rolled back. Time at a confirmation prompt does not
    /// count.
    #[arg(long, env = "DLQ_TIMEOUT", default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Default)]
struct Filters {
    /// Only this consumer (`relay` for relay dead letters).
    #[arg(long)]
    consumer: Option<String>,
    /// Only this subject.
    #[arg(long)]
    subject: Option<String>,
    /// Only this reason (e.g. decode, attempts_exhausted, no_stream).
    #[arg(long)]
    reason: Option<String>,
    /// Only this status: dead, retry_requested or retried.
    #[arg(long)]
    status: Option<String>,
    /// Failed at or after: RFC 3339 time or an age such as 2h.
    #[arg(long)]
    since: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List dead letters, newest failure first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: headers, payload, error chain, history.
    Show {
        /// Its id.
        id: i64,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Retry dead letters: consumers re-run their handler once; relay ones return to the outbox.
    Retry {
        /// Dead letter ids.
        ids: Vec<i64>,
        /// Every dead letter in status `dead`.
        #[arg(long)]
        all: bool,
        /// Every `dead` one of this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Every `dead` one on this subject.
        #[arg(long)]
        subject: Option<String>,
        /// Say what would be retried, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters (asks for confirmation unless --yes).
    Purge {
        #[command(flatten)]
        filters: Filters,
        /// Only those whose last failure is older than this age (e.g. 7d).
        #[arg(long)]
        older_than: Option<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Counts by consumer, reason and status.
    Stats {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn fail<T>(code: u8, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        code,
        message: message.into(),
    })
}

/// Exit 3 for what names nothing to act on, 1 for what failed.
fn action_failure(e: ActionError) -> Failure {
    let code = match e {
        ActionError::NotFound(_) | ActionError::NotDead { .. } | ActionError::NothingMatches => 3,
        _ => 1,
    };
    Failure {
        code,
        message: e.to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dlq: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let limit = std::time::Duration::from_secs(cli.timeout.max(1));
    let _ = STATEMENT_TIMEOUT.set(limit);
    // The server cancels a statement that runs past the limit (a lock wait, a slow scan),
    // so nothing completes behind the operator's back; the watchdog, a little later, covers
    // a connection that does not answer at all.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = execute(cli) => outcome,
            () = watchdog(limit + std::time::Duration::from_secs(2)) => fail(1, format!(
                "the database did not answer within {}s (--timeout); if it is reachable again, check with `dlq list` whether the change was made",
                limit.as_secs()
            )),
        }
    })
    .map_err(|failure| {
        if failure.message.contains("canceling statement due to statement timeout") {
            Failure {
                code: 1,
                message: format!(
                    "the database did not answer within {}s (--timeout): the statement was cancelled and nothing was changed",
                    limit.as_secs()
                ),
            }
        } else {
            failure
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!(
                "dlq: {}",
                display::line(&failure.message.replace('\n', " "))
            );
            ExitCode::from(failure.code)
        }
    }
}

/// `--timeout`, set as the session's `statement_timeout` when connecting.
static STATEMENT_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// When the current step began: the command's start, or the end of a confirmation prompt
/// (the time a person takes to answer does not count against `--timeout`).
static STEP_STARTED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

fn restart_step() {
    *STEP_STARTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
}

/// Completes once the current step has waited longer than `limit`. (A blocking prompt holds
/// the single runtime thread, so this cannot fire while a person is answering.)
async fn watchdog(limit: std::time::Duration) {
    restart_step();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let started = *STEP_STARTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if started.is_some_and(|at| at.elapsed() > limit) {
            return;
        }
    }
}

async fn connect(url: Option<&str>) -> Result<PgConnection, Failure> {
    let Some(url) = url else {
        return fail(2, "no database: set DATABASE_URL or pass --database-url");
    };
    let connect = PgConnection::connect(url);
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Ok(mut conn)) => {
            if let Some(limit) = STATEMENT_TIMEOUT.get() {
                let ms = limit.as_millis();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET statement_timeout = {ms}")))
                    .execute(&mut conn)
                    .await?;
            }
            Ok(conn)
        }
        Ok(Err(e)) => fail(1, format!("cannot connect to the database: {e}")),
        Err(_) => fail(1, "cannot connect to the database: timed out after 10s"),
    }
}

/// The earliest time an age may reach back to. PostgreSQL's `timestamptz` starts in 4713 BC and
/// `time` in year -9999: an age reaching before this is a mistake, refused before any
/// arithmetic can overflow or the database refuses the value.
const EARLIEST: OffsetDateTime = datetime!(0001-01-01 0:00 UTC);

/// Why an age such as `2h` was refused.
enum AgeError {
    /// Not a duration ([`outbox::duration::parse`]: digits and ms, s, m, h or d).
    Malformed,
    /// Well formed, but reaching back before [`EARLIEST`] (or overflowing on the way).
    TooFar,
}

/// The time `text` (a duration as the relay's flags take it: `30m`, `2h`, `7d`) before now.
/// Never panics: the conversion and the subtraction are checked.
fn age_ago(text: &str) -> Result<OffsetDateTime, AgeError> {
    use outbox::duration::{DurationError, parse};
    let age = parse(text).map_err(|e| match e {
        DurationError::TooLarge { .. } => AgeError::TooFar,
        _ => AgeError::Malformed,
    })?;
    let age = time::Duration::try_from(age).map_err(|_| AgeError::TooFar)?;
    OffsetDateTime::now_utc()
        .checked_sub(age)
        .filter(|t| *t >= EARLIEST)
        .ok_or(AgeError::TooFar)
}

fn too_far(flag: &str, text: &str) -> Failure {
    Failure {
        code: 2,
        message: format!(
            "{flag} {text:?} reaches back too far: an age can go back at most to the year 1"
        ),
    }
}

/// `--older-than`: an age only.
fn parse_age(flag: &str, text: &str) -> Result<OffsetDateTime, Failure> {
    age_ago(text).map_err(|e| match e {
        AgeError::Malformed => Failure {
            code: 2,
            message: format!("{flag} {text:?} is not an age like 30m, 2h or 7d"),
        },
        AgeError::TooFar => too_far(flag, text),
    })
}

/// `--since`: an RFC 3339 time or an age.
fn parse_time(flag: &str, text: &str) -> Result<OffsetDateTime, Failure> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    age_ago(text).map_err(|e| match e {
        AgeError::Malformed => Failure {
            code: 2,
            message: format!(
                "{flag} {text:?} is neither an RFC 3339 time nor an age like 30m, 2h or 7d"
            ),
        },
        AgeError::TooFar => too_far(flag, text),
    })
}

fn filter(f: &Filters) -> Result<Filter, Failure> {
    if let Some(status) = &f.status
        && !["dead", "retry_requested", "retried"].contains(&status.as_str())
    {
        return fail(
            2,
            format!("--status must be dead, retry_requested or retried, not {status:?}"),
        );
    }
    Ok(Filter {
        consumer: f.consumer.clone(),
        subject: f.subject.clone(),
        reason: f.reason.clone(),
        status: f.status.clone(),
        since: f
            .since
            .as_deref()
            .map(|t| parse_time("--since", t))
            .transpose()?,
        ..Filter::default()
    })
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn json_of(letter: &Stored) -> serde_json::Value {
    let mut value = serde_json::to_value(letter).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("payload_bytes".into(), letter.payload.len().into());
        obj.insert("payload".into(), payload_json(&letter.payload));
    }
    value
}

/// The payload as JSON when it is JSON, as a string when it is text, else as hex.
fn payload_json(payload: &[u8]) -> serde_json::Value {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
        return v;
    }
    match std::str::from_utf8(payload) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "hex": hex(payload) }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn execute(cli: Cli) -> Result<(), Failure> {
    let url = cli.database_url.as_deref();
    match cli.command {
        Command::List {
            filters,
            limit,
            json,
        } => {
            let filter = filter(&filters)?;
            if limit < 1 {
                return fail(2, "--limit must be at least 1");
            }
            let mut conn = connect(url).await?;
            let letters = store::list(&mut conn, &filter, limit).await?;
            if json {
                for letter in &letters {
                    println!("{}", json_of(letter));
                }
            } else {
                println!(
                    "{:>6}  {:<20} {:<28} {:<20} {:>8}  {:<15} LAST FAILED",
                    "ID", "CONSUMER", "SUBJECT", "REASON", "ATTEMPTS", "STATUS"
                );
                for l in &letters {
                    println!(
                        "{:>6}  {:<20} {:<28} {:<20} {:>8}  {:<15} {}",
                        l.id,
                        display::line(&l.consumer),
                        display::line(&l.subject),
                        display::line(&l.reason),
                        l.attempts,
                        display::line(&l.status),
                        time_text(l.last_failed_at)
                    );
                }
                if letters.is_empty() {
                    println!("(no dead letters match)");
                }
            }
            Ok(())
        }
        Command::Show { id, json } => {
            let mut conn = connect(url).await?;
            let Some(letter) = store::get(&mut conn, id).await? else {
                return fail(3, format!("no dead letter with id {id}"));
            };
            if json {
                println!("{}", json_of(&letter));
                return Ok(());
            }
            let line = display::line;
            println!("id:           {}", letter.id);
            println!("message id:   {}", line(&letter.message_id));
            println!(
                "source:       {} ({})",
                line(&letter.source),
                line(&letter.consumer)
            );
            println!("subject:      {}", line(&letter.subject));
            println!("reason:       {}", line(&letter.reason));
            println!("status:       {}", line(&letter.status));
            println!("attempts:     {}", letter.attempts);
            println!("first failed: {}", time_text(letter.first_failed_at));
            println!("last failed:  {}", time_text(letter.last_failed_at));
            println!("headers:");
            if let Some(headers) = letter.headers.as_object() {
                for (k, v) in headers {
                    println!("  {}: {}", line(k), line(v.as_str().unwrap_or_default()));
                }
            }
            println!("error chain:");
            for (i, e) in letter
                .error_chain
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                println!("  {i}: {}", line(e.as_str().unwrap_or_default()));
            }
            println!("history:");
            for h in letter.history.as_array().into_iter().flatten() {
                println!("  {}", line(&h.to_string()));
            }
            println!("payload ({} bytes):", letter.payload.len());
            match payload_json(&letter.payload) {
                serde_json::Value::String(text) => println!("{}", display::block(&text)),
                value
                    if value.get("hex").is_some()
                        && value.as_object().is_some_and(|o| o.len() == 1) =>
                {
                    println!("{}", line(value["hex"].as_str().unwrap_or_default()))
                }
                // serde_json escapes C0 controls in strings, not DEL, C1 or bidi characters.
                value => println!(
                    "{}",
                    display::block(&serde_json::to_string_pretty(&value).unwrap_or_default())
                ),
            }
            Ok(())
        }
        Command::Retry {
            ids,
            all,
            consumer,
            subject,
            dry_run,
        } => {
            let selectors = usize::from(!ids.is_empty())
                + usize::from(all)
                + usize::from(consumer.is_some())
                + usize::from(subject.is_some());
            if selectors != 1 {
                return fail(
                    2,
                    "say what to retry: ids, --all, --consumer C or --subject S (exactly one)",
                );
            }
            let mut conn = connect(url).await?;
            let filter = Filter {
                consumer,
                subject,
                ids: (!ids.is_empty()).then_some(ids),
                ..Filter::default()
            };
            if dry_run {
                let letters = actions::retry_candidates(&mut conn, &filter)
                    .await
                    .map_err(action_failure)?;
                let relay = letters.iter().filter(|l| l.source == "relay").count();
                for l in &letters {
                    let how = if l.source == "relay" {
                        "back to the outbox"
                    } else {
                        "re-run by its consumer"
                    };
                    println!(
                        "would retry {} ({} {} on {}): {how}",
                        l.id,
                        display::line(&l.consumer),
                        display::line(&l.message_id),
                        display::line(&l.subject)
                    );
                }
                println!(
                    "would retry {} dead letters ({} by consumers, {} back to the outbox)",
                    letters.len(),
                    letters.len() - relay,
                    relay
                );
                return Ok(());
            }
            let retried = actions::retry(&mut conn, &filter)
                .await
                .map_err(action_failure)?;
            println!(
                "retry requested for {} dead letters ({} re-run by their consumers, {} back to the outbox)",
                retried.total(),
                retried.by_consumers,
                retried.to_outbox
            );
            Ok(())
        }
        Command::Purge {
            filters,
            older_than,
            yes,
        } => {
            let mut filter = filter(&filters)?;
            if let Some(age) = older_than {
                filter.until = Some(parse_age("--older-than", &age)?);
            }
            let mut conn = connect(url).await?;
            let n = store::count(&mut conn, &filter).await?;
            if n == 0 {
                println!("no dead letters match");
                return Ok(());
            }
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return fail(
                        2,
                        format!("purge would delete {n} dead letters; pass --yes to confirm"),
                    );
                }
                print!("delete {n} dead letters? [y/N] ");
                let _ = std::io::stdout().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().lock().read_line(&mut answer);
                restart_step();
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return fail(2, "purge cancelled");
                }
            }
            let deleted = actions::purge(&mut conn, &filter).await?;
            println!("purged {deleted} dead letters");
            Ok(())
        }
        Command::Stats { json } => {
            let mut conn = connect(url).await?;
            let stats = store::stats(&mut conn).await?;
            if json {
                println!("{}", serde_json::to_string(&stats).unwrap_or_default());
            } else {
                println!(
                    "{:<20} {:<20} {:<15} {:>7}  OLDEST",
                    "CONSUMER", "REASON", "STATUS", "COUNT"
                );
                for s in &stats {
                    println!(
                        "{:<20} {:<20} {:<15} {:>7}  {}",
                        display::line(&s.consumer),
                        display::line(&s.reason),
                        display::line(&s.status),
                        s.count,
                        time_text(s.oldest)
                    );
                }
                let total: i64 = stats.iter().map(|s| s.count).sum();
                println!("total: {total}");
            }
            Ok(())
        }
    }
}
