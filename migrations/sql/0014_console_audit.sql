-- The operator console's audit trail, and the index its dead-letter pages walk.
--
-- Every action the console takes (a retry, a purge) is written here in the same
-- transaction as the action: who (the authenticated user, or the trusted proxy's header),
-- what, on which database's dead letters, with which filter or ids, and how many changed.
-- The console (`console::store`) is its only writer; nothing deletes from it.
CREATE TABLE console_audit (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}',
    affected  bigint NOT NULL
);

-- Dead letters are listed newest failure first, a page at a time after the last one shown
-- (keyset pagination): (last_failed_at, id) in that order.
CREATE INDEX dead_letter_page_idx ON dead_letter (last_failed_at DESC, id DESC);
