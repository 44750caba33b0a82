-- The log storage's guard, for the enqueue that rides with COMMIT: checked about once a
-- second per session instead of on every transaction.
--
-- outbox_emit_encoded (0012) checks wal_level and the slot on every call. Reading
-- pg_replication_slots and running PL/pgSQL costs a small business transaction about a
-- sixth of its rate (BENCHMARKS.md, session 13), where the emit itself costs a twelfth.
-- outbox_emit_check(checked_until) runs the same checks (raising the same errors) and, when
-- they pass and checked_until is given, notes it in the session setting
-- outbox.emit_checked_until (undone if the transaction rolls back). The Rust Outbox's
-- OutboxTransaction writes its first emit as
--   SELECT pg_logical_emit_message(true, 'outbox', ...)
--   WHERE coalesce(current_setting('outbox.emit_checked_until', true) COLLATE "C" BETWEEN '<now>' AND '<now + 1 s>', false)
--      OR outbox_emit_check('<now + 1 s>')
-- with both times from its own clock, as 20 digits of microseconds since 1970, so that the
-- server compares them bytewise and interprets neither.
--
-- What the cache gives up: a slot dropped under running producers is noticed by each of
-- their sessions within about a second instead of at once. Messages written in that second
-- would never be published; so would every message the slot had not sent when it was
-- dropped. Drop a slot only with its producers stopped (docs/operations.md).
-- outbox_emit(...) and the per-statement enqueue still check on every call.

CREATE FUNCTION outbox_emit_check(checked_until text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
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
    IF checked_until IS NOT NULL THEN
        PERFORM set_config('outbox.emit_checked_until', checked_until, false);
    END IF;
    RETURN true;
END
$$;

-- The checks now have one home.
CREATE OR REPLACE FUNCTION outbox_emit_encoded(VARIADIC messages bytea[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    message bytea;
BEGIN
    PERFORM outbox_emit_check();
    FOREACH message IN ARRAY messages LOOP
        IF message IS NULL THEN
            RAISE EXCEPTION 'outbox: a message must not be null';
        END IF;
        PERFORM pg_logical_emit_message(true, 'outbox', message);
    END LOOP;
END
$$;
