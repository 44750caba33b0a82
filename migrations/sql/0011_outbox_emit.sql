-- The log storage's producer function, for producers in any language.
--
-- outbox_emit(...) writes one outbox message to the write-ahead log as a transactional
-- logical decoding message (prefix 'outbox'), in the caller's transaction: no row, nothing to
-- mark or vacuum. It becomes visible to a WAL relay when the transaction commits, and never if
-- it rolls back. The bytes follow format version 1 of the envelope crate's `wal` module
-- (docs/schema.md): magic 'obx' and version 1, the id, occurred_at in microseconds since
-- 1970, then length-prefixed fields (-1 for null). The relay validates every field as the
-- table path does and dead-letters a message it cannot read.
-- Returns the message id.

-- One field: a signed 32-bit big-endian length and the bytes, or -1 for null.
CREATE FUNCTION outbox_wal_field(value bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN '\xffffffff'::bytea
                ELSE int4send(length(value)) || value END
$$;

CREATE FUNCTION outbox_emit(
    subject        text,
    event_type     text,
    source         text,
    partition_key  text,
    payload        bytea,
    headers        jsonb       DEFAULT '{}',
    id             uuid        DEFAULT gen_random_uuid(),
    occurred_at    timestamptz DEFAULT now(),
    correlation_id text        DEFAULT NULL,
    causation_id   uuid        DEFAULT NULL,
    traceparent    text        DEFAULT NULL,
    tracestate     text        DEFAULT NULL,
    content_type   text        DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
-- outbox_wal_field resolves in the schema the migration ran in, whatever the caller's path.
SET search_path FROM CURRENT
AS $$
BEGIN
    IF subject IS NULL OR event_type IS NULL OR source IS NULL OR partition_key IS NULL
       OR payload IS NULL OR id IS NULL OR occurred_at IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: subject, event_type, source, partition_key, payload, id and occurred_at must not be null';
    END IF;
    IF id = '00000000-0000-0000-0000-000000000000' THEN
        RAISE EXCEPTION 'outbox_emit: id must not be the nil UUID';
    END IF;
    IF headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object of strings, got %', headers;
    END IF;
    PERFORM pg_logical_emit_message(true, 'outbox',
        '\x6f627801'::bytea
        || uuid_send(id)
        || int8send((extract(epoch FROM occurred_at) * 1000000)::int8)
        || outbox_wal_field(convert_to(subject, 'UTF8'))
        || outbox_wal_field(convert_to(event_type, 'UTF8'))
        || outbox_wal_field(convert_to(source, 'UTF8'))
        || outbox_wal_field(convert_to(partition_key, 'UTF8'))
        || outbox_wal_field(convert_to(correlation_id, 'UTF8'))
        || outbox_wal_field(uuid_send(causation_id))
        || outbox_wal_field(convert_to(traceparent, 'UTF8'))
        || outbox_wal_field(convert_to(tracestate, 'UTF8'))
        || outbox_wal_field(convert_to(content_type, 'UTF8'))
        || outbox_wal_field(convert_to(headers::text, 'UTF8'))
        || outbox_wal_field(payload));
    RETURN id;
END
$$;
