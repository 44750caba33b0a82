//! The `dlq retry` runner: re-runs this consumer's handler for the dead letters an operator
//! asked to retry, from their parked bytes.

use std::sync::Arc;

use sqlx::{Acquire, PgConnection};
use tokio_util::sync::CancellationToken;

use super::connection::ClosedUnlessReleased;
use crate::consumer::Consumer;
use crate::consumer::failure::{Failure, Fault, database_unreachable, release_failed};
use crate::consumer::lane::LANE_BACKEND;
use crate::consumer::transaction::commit;
use crate::handler::{Delivery, HandlerError};
use crate::metrics as m;
use crate::store;

/// Runs `dlq retry` requests for this consumer: each re-runs the handler from the parked
/// bytes in one transaction with the dead letter's new status, so it takes effect once; it
/// does not go through the broker, so no other consumer sees the message again. A handler
/// that panics here is caught like in a lane: the retry is recorded as failed with reason
/// `panic`, and the other requests still run.
pub(in crate::consumer) async fn dlq_retries(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.retry_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Stopped with the consumer even mid-retry: its transaction then rolls back and the
        // request stays for the next start.
        let ran = tokio::select! {
            _ = stop.cancelled() => return,
            ran = run_retry_requests(&consumer) => ran,
        };
        if let Err(e) = ran {
            if database_unreachable(&e) {
                consumer.health.set_database(false);
            }
            tracing::warn!(consumer = %consumer.config.name, error = %e, "running dlq retries failed");
        }
    }
}

/// Runs up to 16 retry requests in one transaction, each letter's handler in a savepoint.
/// If the database refuses that transaction's COMMIT, the letters are run again one at a
/// time ([`retry_alone`]), so that the others go through and only the one whose commit fails
/// is recorded as failed (reason `commit_failed`).
async fn run_retry_requests(consumer: &Consumer) -> Result<(), sqlx::Error> {
    let mut conn = ClosedUnlessReleased::acquire(consumer).await?;
    let mut tx = consumer.db(conn.begin()).await?;
    let letters = consumer
        .db(dlq::store::take_retry_requests(
            &mut tx,
            &consumer.config.name,
            16,
        ))
        .await?;
    if letters.is_empty() {
        consumer.db(tx.commit()).await?;
        conn.release();
        // The poll doubles as the database probe of an idle consumer's readiness.
        consumer.health.set_database(true);
        return Ok(());
    }
    let backend_pid = consumer.db(store::backend_pid(&mut tx)).await?;
    let mut results = Vec::with_capacity(letters.len());
    for letter in &letters {
        let retried = LANE_BACKEND.scope(backend_pid, retry_letter(consumer, &mut tx, letter));
        results.push(retried.await?);
    }
    let committed = commit(tx, consumer.config.db_timeout).await;
    if !matches!(committed, Err(Fault::Database(_))) {
        conn.release();
    }
    match committed {
        Ok(()) => {
            for (letter, result) in letters.iter().zip(&results) {
                report_retry(consumer, letter, result);
            }
            Ok(())
        }
        Err(Fault::Database(e)) => Err(e),
        Err(Fault::Commit(e)) => {
            consumer.count_commit_failure();
            tracing::warn!(consumer = %consumer.config.name, letters = letters.len(), error = %e, "the database refused the COMMIT of a group of dlq retries; retrying them one at a time");
            for letter in &letters {
                retry_alone(consumer, letter).await?;
            }
            Ok(())
        }
    }
}

/// Runs one retry request in a transaction of its own, if it is still requested. A COMMIT
/// the database refuses is recorded as the retry's failure (reason `commit_failed`), in a
/// new transaction.
async fn retry_alone(consumer: &Consumer, letter: &dlq::store::Stored) -> Result<(), sqlx::Error> {
    let mut conn = ClosedUnlessReleased::acquire(consumer).await?;
    let mut tx = consumer.db(conn.begin()).await?;
    if !consumer
        .db(store::lock_retry_request(&mut tx, letter.id))
        .await?
    {
        consumer.db(tx.commit()).await?;
        conn.release();
        return Ok(());
    }
    let backend_pid = consumer.db(store::backend_pid(&mut tx)).await?;
    let result = LANE_BACKEND
        .scope(backend_pid, retry_letter(consumer, &mut tx, letter))
        .await?;
    let result = match commit(tx, consumer.config.db_timeout).await {
        Ok(()) => result,
        Err(Fault::Database(e)) => return Err(e),
        Err(Fault::Commit(e)) => {
            consumer.count_commit_failure();
            let failure = Err(Failure::Commit(e));
            let mut tx = consumer.db(conn.begin()).await?;
            if !consumer
                .db(store::lock_retry_request(&mut tx, letter.id))
                .await?
            {
                consumer.db(tx.commit()).await?;
                conn.release();
                return Ok(());
            }
            consumer
                .db(record_retry_failure(&mut tx, letter, &failure))
                .await?;
            consumer.db(tx.commit()).await?;
            failure
        }
    };
    conn.release();
    report_retry(consumer, letter, &result);
    Ok(())
}

/// Re-runs one parked message's handler from its bytes in a savepoint of `tx` and records
/// the outcome in `tx`: the letter retried and the message processed, or the letter dead
/// again with the new failure (a handler that left its savepoint aborted, which its
/// `RELEASE SAVEPOINT` tells, fails with reason `aborted_transaction`; one past
/// `handler_timeout` with `timeout`). Returns the outcome, to report once `tx` commits.
///
/// First it locks the message's inbox row ([`store::lock_outcome`]): if it says
/// `processed`, the handler's effects committed already (another instance processed the
/// message while this one parked it) and the letter is closed as retried without running
/// the handler.
async fn retry_letter(
    consumer: &Consumer,
    tx: &mut PgConnection,
    letter: &dlq::store::Stored,
) -> Result<Result<(), Failure>, sqlx::Error> {
    let outcome = consumer
        .db(store::lock_outcome(
            tx,
            &consumer.config.name,
            &letter.message_id,
            &letter.subject,
        ))
        .await?;
    if outcome == store::Outcome::Processed {
        // Processed meanwhile (by another instance, while this one parked it): running the
        // handler again would apply the message twice.
        consumer
            .db(store::mark_already_processed(tx, letter.id))
            .await?;
        tracing::info!(consumer = %consumer.config.name, dead_letter = letter.id, "dlq retry of a message processed already; the handler does not run again");
        return Ok(Ok(()));
    }
    let attempt = u32::try_from(letter.attempts)
        .unwrap_or(0)
        .saturating_add(1);
    let result = match letter.envelope() {
        Err(e) => Err(Failure::Returned(HandlerError::permanent_because(
            dlq::reason::DECODE,
            e,
        ))),
        Ok(envelope) => {
            let delivery = Delivery {
                envelope,
                consumer: Arc::from(consumer.config.name.as_str()),
                attempt,
                delivered: None,
                stream_seq: None,
            };
            let mut sp = consumer.db(tx.begin()).await?;
            let result = consumer
                .catching(consumer.handler.handle(&mut sp, &delivery))
                .await;
            match result {
                Ok(()) => match consumer.db(sp.commit()).await {
                    Ok(()) => Ok(()),
                    // Rolled back to the savepoint before the next statement.
                    Err(e) => Err(consumer.aborted(release_failed(e)?, &letter.message_id)),
                },
                Err(failure) => {
                    consumer.settle_after(&mut sp, &failure).await;
                    consumer.db(sp.rollback()).await?;
                    Err(failure)
                }
            }
        }
    };
    consumer
        .db(async {
            match &result {
                Ok(()) => {
                    dlq::store::mark_retried(tx, letter.id).await?;
                    store::mark_processed(tx, &consumer.config.name, &letter.message_id).await
                }
                Err(_) => record_retry_failure(tx, letter, &result).await,
            }
        })
        .await?;
    Ok(result)
}

/// Parks a retried letter again with its new failure (one more attempt, status `dead`).
async fn record_retry_failure(
    conn: &mut PgConnection,
    letter: &dlq::store::Stored,
    result: &Result<(), Failure>,
) -> Result<(), sqlx::Error> {
    let Err(failure) = result else {
        return Ok(());
    };
    let (reason, error_chain) = failure.reason("retry_failed");
    let again = dlq::DeadLetter {
        source: dlq::Source::Consumer,
        consumer: letter.consumer.clone(),
        message_id: letter.message_id.clone(),
        subject: letter.subject.clone(),
        partition_key: letter.partition_key.clone(),
        headers: letter.headers.as_object().cloned().unwrap_or_default(),
        payload: letter.payload.clone(),
        reason,
        error_chain,
        attempts: 1,
        stream: None,
        stream_seq: None,
    };
    dlq::store::record(conn, &again).await?;
    Ok(())
}

/// Counts and logs a retry whose transaction committed.
fn report_retry(consumer: &Consumer, letter: &dlq::store::Stored, result: &Result<(), Failure>) {
    let name = consumer.config.name.clone();
    match result {
        Ok(()) => {
            metrics::counter!(m::DLQ_RETRIES, "consumer" => name, "result" => "ok").increment(1);
            tracing::info!(consumer = %consumer.config.name, dead_letter = letter.id, "dlq retry succeeded");
        }
        Err(error) => {
            metrics::counter!(m::DLQ_RETRIES, "consumer" => name, "result" => "failed")
                .increment(1);
            tracing::warn!(consumer = %consumer.config.name, dead_letter = letter.id, error = %error, "dlq retry failed again");
        }
    }
}
