//! All SQL that producers run on `outbox_message`.

use envelope::{Envelope, MessageId};
use sqlx::PgConnection;
use sqlx::postgres::PgDatabaseError;
use uuid::Uuid;

use crate::error::Error;

const INSERT: &str = "INSERT INTO outbox_message (
        id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// Rows keep the order of the arrays: `WITH ORDINALITY` plus `ORDER BY` makes the identity
/// column `seq` follow the caller's order.
const INSERT_MANY: &str = "INSERT INTO outbox_message (
        id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload)
    SELECT id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::uuid[], $9::text[], $10::text[], $11::text[], $12::jsonb[], $13::bytea[])
        WITH ORDINALITY AS m(id, subject, event_type, source, partition_key, occurred_at,
            correlation_id, causation_id, traceparent, tracestate, content_type, headers,
            payload, ord)
    ORDER BY ord";

/// Inserts one validated envelope as a `pending` row.
pub async fn insert(conn: &mut PgConnection, env: &Envelope) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT)
        .bind(env.id.as_uuid())
        .bind(env.subject.as_str())
        .bind(env.event_type.to_string())
        .bind(env.source.as_str())
        .bind(env.partition_key.as_str())
        .bind(env.occurred_at)
        .bind(env.correlation_id.as_ref().map(|c| c.as_str()))
        .bind(env.causation_id.map(|c| c.as_uuid()))
        .bind(env.trace.as_ref().map(|t| t.traceparent()))
        .bind(env.trace.as_ref().and_then(|t| t.tracestate()))
        .bind(env.content_type.as_ref().map(|c| c.as_str()))
        .bind(headers_json(env))
        .bind(env.payload.as_ref())
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts validated envelopes as `pending` rows with one statement, in slice order.
pub async fn insert_many(conn: &mut PgConnection, envs: &[Envelope]) -> Result<(), sqlx::Error> {
    let n = envs.len();
    let mut ids = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut causations = Vec::with_capacity(n);
    let mut parents = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut content_types = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for env in envs {
        ids.push(env.id.as_uuid());
        subjects.push(env.subject.as_str());
        types.push(env.event_type.to_string());
        sources.push(env.source.as_str());
        keys.push(env.partition_key.as_str());
        times.push(env.occurred_at);
        correlations.push(env.correlation_id.as_ref().map(|c| c.as_str()));
        causations.push(env.causation_id.map(|c| c.as_uuid()));
        parents.push(env.trace.as_ref().map(|t| t.traceparent()));
        states.push(env.trace.as_ref().and_then(|t| t.tracestate()));
        content_types.push(env.content_type.as_ref().map(|c| c.as_str()));
        headers.push(headers_json(env));
        payloads.push(env.payload.as_ref());
    }
    sqlx::query(INSERT_MANY)
        .bind(ids)
        .bind(subjects)
        .bind(types)
        .bind(sources)
        .bind(keys)
        .bind(times)
        .bind(correlations)
        .bind(causations)
        .bind(parents)
        .bind(states)
        .bind(content_types)
        .bind(headers)
        .bind(payloads)
        .execute(conn)
        .await?;
    Ok(())
}

fn headers_json(env: &Envelope) -> serde_json::Value {
    serde_json::Value::Object(
        env.headers
            .iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
            .collect(),
    )
}

/// Maps an insert failure to the crate error: a primary-key violation names the duplicate id.
pub(crate) fn classify(e: sqlx::Error, envs: &[Envelope]) -> Error {
    let duplicate = e
        .as_database_error()
        .filter(|db| db.constraint() == Some("outbox_message_pkey"))
        .map(|db| {
            let detail = db
                .try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::detail)
                .unwrap_or_default();
            // "Key (id)=(0190...) already exists."
            envs.iter()
                .map(|env| env.id)
                .find(|id| detail.contains(&id.to_string()))
                .or_else(|| first_repeated(envs))
                .unwrap_or_else(|| envs.first().map_or_else(MessageId::new, |env| env.id))
        });
    match duplicate {
        Some(id) => Error::DuplicateId(id),
        None => Error::Database(e),
    }
}

fn first_repeated(envs: &[Envelope]) -> Option<MessageId> {
    let mut seen = std::collections::HashSet::<Uuid>::new();
    envs.iter()
        .map(|env| env.id)
        .find(|id| !seen.insert(id.as_uuid()))
}
