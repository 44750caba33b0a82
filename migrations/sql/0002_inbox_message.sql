-- The inbox: one row per (consumer, message id) whose handler has taken effect.
-- Owner: the inbox crate. The row is inserted in the same transaction as the handler's
-- writes, so its presence means "already applied": a redelivery is acked without running
-- the handler again. Rows are deleted by the inbox cleaner after a retention that must
-- exceed the redelivery horizon.
CREATE TABLE inbox_message (
    consumer        text        NOT NULL,
    -- Text, not uuid: the id of a message from any producer (ce-id or Nats-Msg-Id).
    message_id      text        NOT NULL,
    subject         text        NOT NULL,
    stream          text,
    stream_seq      bigint,
    received_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_message_pkey PRIMARY KEY (consumer, message_id),
    CONSTRAINT inbox_message_consumer_check CHECK (length(consumer) BETWEEN 1 AND 255),
    CONSTRAINT inbox_message_message_id_check CHECK (length(message_id) BETWEEN 1 AND 256)
);

-- The cleaner: old rows by time.
CREATE INDEX inbox_message_received_at_idx ON inbox_message (received_at);
