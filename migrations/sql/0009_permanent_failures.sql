-- Permanent publish failures are counted on their own.
--
-- `attempts` counts every failed publish of a row, transient ones (broker unreachable, no
-- PubAck in time) included. The relay dead-letters a row after `max_permanent_attempts`
-- *permanent* failures (no stream for the subject, message too large, refused); counting
-- those with `attempts` dead-lettered a row with an outage behind it at its first permanent
-- error. The relay is the only writer of this column. A constant default: adding the column
-- rewrites nothing, and inserts do not name it.
ALTER TABLE outbox_message
    ADD COLUMN permanent_failures integer NOT NULL DEFAULT 0;
