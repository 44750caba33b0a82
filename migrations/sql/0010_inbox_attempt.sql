-- Handler attempts of messages still being retried, one row per (consumer, message id).
-- Owner: the inbox crate.
--
-- A message is dead-lettered after `max_attempts` *handler attempts*: runs of its handler
-- that failed with a retry, panicked, or whose transaction's COMMIT the database refused.
-- JetStream's delivery count is no such count: it also grows when the inbox NAKs a message
-- because the database failed, at shutdown, and when ack_wait expires, so a short outage
-- used to park messages whose handler had not run once. The count must survive a
-- redelivery to another instance of the consumer, so it lives here.
--
-- Written in a short transaction of its own after a failed attempt (the handler's
-- transaction is rolled back); read (and deleted) in the handler's transaction only when
-- the broker's delivery count is above 1, so a message that succeeds at its first delivery
-- costs no statement on this table; deleted when the message commits or is parked. Rows left
-- behind (a message handled by another instance meanwhile) are deleted by the inbox cleaner
-- after `inbox_retention`. The table holds only messages currently failing: no index beyond
-- the key.
CREATE TABLE inbox_attempt (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    -- Failed handler attempts so far.
    attempts    integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_attempt_pkey PRIMARY KEY (consumer, message_id)
);
