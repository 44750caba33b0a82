-- Claims become row locks held by the relay's claim transaction instead of a row state.
--
-- A relay claims a batch with SELECT ... FOR UPDATE SKIP LOCKED inside a transaction that
-- stays open while the batch is published, and marks the published rows (or records the
-- failures) in that same transaction before committing. A claim therefore no longer rewrites
-- the row: it only locks it. If the relay dies, PostgreSQL ends its session and the locks go
-- with it, so there is no claimed state to expire and no rescuer to run; a relay that hangs
-- is ended by idle_in_transaction_session_timeout, which each claim transaction sets.
--
-- Row states are now pending -> published (-> deleted by the cleaner), or deleted into
-- dead_letter. Stop relays of earlier versions before applying this migration: rows they had
-- claimed go back to pending here.
UPDATE outbox_message SET status = 'pending' WHERE status = 'claimed';

DROP INDEX outbox_message_claim_expiry_idx;

ALTER TABLE outbox_message
    DROP CONSTRAINT outbox_message_claim_check,
    DROP CONSTRAINT outbox_message_status_check,
    DROP COLUMN claimed_by,
    DROP COLUMN claimed_until,
    ADD CONSTRAINT outbox_message_status_check CHECK (status IN ('pending', 'published'));
