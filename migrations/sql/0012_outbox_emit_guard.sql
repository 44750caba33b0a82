-- The log storage's one way in: refuse to write what no relay could ever read.
--
-- A logical decoding message is written to the write-ahead log whatever the server's
-- wal_level, but only wal_level = logical lets a slot decode it, and only a slot that exists
-- when it is written keeps it: a message emitted before the relay's slot is created is never
-- published. outbox_emit_encoded(...) checks both, in the caller's transaction, then emits its
-- arguments in order (transactional, prefix 'outbox'); the Rust `Outbox` with log storage
-- and outbox_emit(...) both go through it. The check is a guard, not a proof: any permanent
-- pgoutput slot of this database whose WAL is not lost passes it.

CREATE FUNCTION outbox_emit_encoded(VARIADIC messages bytea[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    message bytea;
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'outbox: log storage needs wal_level = logical, this server has wal_level = %',
                current_setting('wal_level')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'set wal_level = logical and restart PostgreSQL, or use table storage';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_replication_slots
                   WHERE plugin = 'pgoutput' AND database = current_database()
                     AND NOT temporary AND wal_status IS DISTINCT FROM 'lost') THEN
        RAISE EXCEPTION 'outbox: no logical replication slot reads database %, so messages written now would never be published',
                current_database()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'create the relay''s slot first: relay slot create';
    END IF;
    FOREACH message IN ARRAY messages LOOP
        IF message IS NULL THEN
            RAISE EXCEPTION 'outbox: a message must not be null';
        END IF;
        PERFORM pg_logical_emit_message(true, 'outbox', message);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION outbox_emit(
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
-- outbox_wal_field and outbox_emit_encoded resolve in the schema the migration ran in.
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
    PERFORM outbox_emit_encoded(
        '\x6f627801'::bytea
        || uuid_send(id)
        || int8send(floor(extract(epoch FROM occurred_at) * 1000000)::int8)
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
