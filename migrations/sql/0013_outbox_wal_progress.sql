-- The WAL relay's confirmed position, kept where a crash cannot set it back.
--
-- A logical replication slot's confirmed position is saved to disk only at a checkpoint or
-- when its restart position moves; after a PostgreSQL crash the slot resumes from the last
-- saved one, which can be minutes old, and a relay that trusted it would publish again what
-- it had confirmed since (stored twice once the broker's duplicate window has passed). So
-- the relay writes its position here, committed, before it reports it to the slot, and on
-- every start asks the server to stream from the greater of the two. One row per slot; the
-- WAL relay (`relay::wal::store`) is its only writer. `relay slot drop` deletes the row.
CREATE TABLE outbox_wal_progress (
    slot_name     text PRIMARY KEY,
    confirmed_lsn pg_lsn NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
