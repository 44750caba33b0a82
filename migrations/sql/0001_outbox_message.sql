-- The outbox: one row per message to publish, written in the producer's own transaction.
-- Owner: the outbox crate inserts; the relay claims, marks, dead-letters and cleans.
--
-- Row states (see docs/state-machines.md):
--   pending   -> claimed    the relay took it (claimed_by, claimed_until set)
--   claimed   -> published  PubAck received (stream, stream_seq, published_at set)
--   claimed   -> pending    publish failed transiently or the claim expired (attempts, available_at, last_error)
--   claimed   -> (deleted)  moved to dead_letter after a permanent error, in one transaction
--   published -> (deleted)  by the cleaner after the retention period
CREATE TABLE outbox_message (
    id              uuid        NOT NULL,
    -- Commit-ordered position: per-key order is seq order (same-key writers are serialised
    -- by the aggregate's row lock, so insert order is commit order there).
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    subject         text        NOT NULL,
    event_type      text        NOT NULL,
    source          text        NOT NULL,
    partition_key   text        NOT NULL,
    -- One of 256 fixed partitions; relay instances own partitions, never two at once.
    -- Computed here so that rows written by any producer (SQL, other languages) agree.
    partition_id    smallint    GENERATED ALWAYS AS ((hashtextextended(partition_key, 0) & 255)::smallint) STORED,
    occurred_at     timestamptz NOT NULL,
    correlation_id  text,
    causation_id    uuid,
    traceparent     text,
    tracestate      text,
    content_type    text,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload         bytea       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    available_at    timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    claimed_until   timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    -- Where the PubAck says the message was stored (for reconcile after broker data loss).
    stream          text,
    stream_seq      bigint,
    CONSTRAINT outbox_message_pkey PRIMARY KEY (id),
    CONSTRAINT outbox_message_seq_key UNIQUE (seq),
    CONSTRAINT outbox_message_status_check CHECK (status IN ('pending', 'claimed', 'published')),
    CONSTRAINT outbox_message_attempts_check CHECK (attempts >= 0),
    CONSTRAINT outbox_message_subject_check CHECK (length(subject) BETWEEN 1 AND 255),
    CONSTRAINT outbox_message_partition_key_check CHECK (length(partition_key) BETWEEN 1 AND 256),
    CONSTRAINT outbox_message_headers_check CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_message_claim_check CHECK (
        (status = 'claimed') = (claimed_by IS NOT NULL AND claimed_until IS NOT NULL)
    ),
    CONSTRAINT outbox_message_published_check CHECK (
        (status = 'published') = (published_at IS NOT NULL)
    )
);

-- The relay's claim: pending rows in commit order (filtered by owned partition). Ordered by
-- seq alone so a claim reads the head of the backlog instead of sorting all of it.
CREATE INDEX outbox_message_claim_idx
    ON outbox_message (seq)
    WHERE status = 'pending';

-- Per-key ordering: the earliest unpublished row of a key blocks later ones.
CREATE INDEX outbox_message_unpublished_key_idx
    ON outbox_message (partition_key, seq)
    WHERE status <> 'published';

-- The rescuer: expired claims.
CREATE INDEX outbox_message_claim_expiry_idx
    ON outbox_message (claimed_until)
    WHERE status = 'claimed';

-- The cleaner and reconcile: published rows by time.
CREATE INDEX outbox_message_published_at_idx
    ON outbox_message (published_at)
    WHERE status = 'published';
