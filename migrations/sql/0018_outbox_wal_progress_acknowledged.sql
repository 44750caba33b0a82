-- The messages the WAL relay had acknowledged past its confirmed position.
--
-- The relay confirms a prefix of transactions: a key whose message cannot be published yet
-- (a PubAck timed out, a retry waiting) holds back the position while later transactions of
-- other keys are published and acknowledged. A relay that crashed then resumed from the
-- held-back position and published all of those again; under repeated broker faults the
-- position lagged past the stream's duplicate window, and the stream stored hundreds of
-- messages twice (chaos seed 13). The relay now writes, with its position, the ids of the
-- messages acknowledged past it (in commit order, at most 10 000) and the end of the last
-- transaction they cover; a relay resuming from the record resolves those without
-- publishing them again, and drops the list once it has confirmed past that end (or at
-- once, if the end is not past where it starts: the list of an older position).
ALTER TABLE outbox_wal_progress
    ADD COLUMN acknowledged_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN acknowledged_until pg_lsn;
