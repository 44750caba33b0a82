-- Cheaper claims and cheaper inserts.
--
-- A claim skips a row while an earlier row of its key is claimed by ANOTHER relay instance
-- or waits out a retry backoff; both sets are small, so each gets a small partial index and
-- the claim probes them instead of walking every unpublished row of the key (which made
-- claims cost O(backlog) per key). Rows claimed by the claiming instance itself are ordered
-- in its memory (one in-flight message per key).
DROP INDEX outbox_message_unpublished_key_idx;

CREATE INDEX outbox_message_claimed_key_idx
    ON outbox_message (partition_key, seq)
    WHERE status = 'claimed';

CREATE INDEX outbox_message_retrying_key_idx
    ON outbox_message (partition_key, seq)
    WHERE status = 'pending' AND attempts > 0;

-- seq is an identity column (GENERATED ALWAYS): its values are unique without a second
-- unique index on every insert.
ALTER TABLE outbox_message DROP CONSTRAINT outbox_message_seq_key;
