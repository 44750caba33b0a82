-- Cheaper claims and cheaper inserts.
--
-- A claim skips the keys that have a row claimed by ANOTHER relay instance or waiting out a
-- retry backoff. Both sets are small: the claim computes them once per statement (the first
-- from outbox_message_claim_expiry_idx, the second from the index below) instead of probing
-- every unpublished row of every candidate's key, which made a claim cost O(backlog).
-- Rows claimed by the claiming instance itself are ordered in its memory (one in-flight
-- message per key).
DROP INDEX outbox_message_unpublished_key_idx;

CREATE INDEX outbox_message_retrying_key_idx
    ON outbox_message (partition_key)
    WHERE status = 'pending' AND attempts > 0;

-- seq is an identity column (GENERATED ALWAYS): its values are unique without a second
-- unique index on every insert.
ALTER TABLE outbox_message DROP CONSTRAINT outbox_message_seq_key;
