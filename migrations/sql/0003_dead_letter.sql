-- The dead-letter store: messages that could not be published (source 'relay') or handled
-- (source 'consumer'), parked with their reason and original bytes, never lost.
-- Owner: the dlq crate (the relay and the inbox write through it).
--
-- Row states (see docs/state-machines.md):
--   dead            -> retry_requested  `dlq retry` asked for another attempt
--   retry_requested -> retried          the message went back (outbox row or consumer re-run)
--   retried         -> dead             it failed again (attempts and history grow)
--   any             -> (deleted)        `dlq purge`
CREATE TABLE dead_letter (
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    source              text        NOT NULL,
    -- The consumer whose handler failed, or the relay's name.
    consumer            text        NOT NULL,
    message_id          text        NOT NULL,
    subject             text        NOT NULL,
    partition_key       text,
    headers             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload             bytea       NOT NULL,
    -- A short machine-readable cause, e.g. 'decode', 'handler', 'attempts_exhausted',
    -- 'no_stream', 'payload_too_large'.
    reason              text        NOT NULL,
    -- The error and its causes, outermost first.
    error_chain         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    attempts            integer     NOT NULL DEFAULT 0,
    first_failed_at     timestamptz NOT NULL DEFAULT now(),
    last_failed_at      timestamptz NOT NULL DEFAULT now(),
    status              text        NOT NULL DEFAULT 'dead',
    -- One object per retry or failure: {"at": ..., "action": ..., "detail": ...}.
    history             jsonb       NOT NULL DEFAULT '[]'::jsonb,
    stream              text,
    stream_seq          bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letter_pkey PRIMARY KEY (id),
    CONSTRAINT dead_letter_source_check CHECK (source IN ('relay', 'consumer')),
    CONSTRAINT dead_letter_status_check CHECK (status IN ('dead', 'retry_requested', 'retried')),
    CONSTRAINT dead_letter_attempts_check CHECK (attempts >= 0),
    CONSTRAINT dead_letter_headers_check CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT dead_letter_error_chain_check CHECK (jsonb_typeof(error_chain) = 'array'),
    CONSTRAINT dead_letter_history_check CHECK (jsonb_typeof(history) = 'array')
);

-- One live dead letter per (consumer, message): a second failure updates the row.
CREATE UNIQUE INDEX dead_letter_consumer_message_idx ON dead_letter (consumer, message_id);
-- Listing and filtering.
CREATE INDEX dead_letter_subject_idx ON dead_letter (subject);
CREATE INDEX dead_letter_last_failed_at_idx ON dead_letter (last_failed_at);
-- A consumer's runtime picks its retry requests.
CREATE INDEX dead_letter_retry_requested_idx ON dead_letter (consumer) WHERE status = 'retry_requested';
