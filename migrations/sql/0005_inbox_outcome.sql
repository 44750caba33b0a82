-- Why an inbox row exists: the handler's effects committed ('processed'), or the message was
-- parked in dead_letter ('dead_lettered'). Either way a redelivery is acknowledged without
-- running the handler; a `dlq retry` runs it from the dead letter and turns the row into
-- 'processed' in the same transaction.
ALTER TABLE inbox_message
    ADD COLUMN outcome text NOT NULL DEFAULT 'processed',
    ADD CONSTRAINT inbox_message_outcome_check CHECK (outcome IN ('processed', 'dead_lettered'));
