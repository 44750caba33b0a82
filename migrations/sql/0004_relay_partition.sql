-- Relay coordination: live instances and the ownership of the 256 outbox partitions.
-- Owner: the relay crate. A partition has at most one owner whose lease has not expired;
-- the relay claims outbox rows only of partitions it owns (the claim joins this table), so
-- two instances never publish the same partition at once.
CREATE TABLE relay_instance (
    instance_id     text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT relay_instance_pkey PRIMARY KEY (instance_id),
    CONSTRAINT relay_instance_id_check CHECK (length(instance_id) BETWEEN 1 AND 200)
);

CREATE TABLE relay_partition_lease (
    partition_id    smallint    NOT NULL,
    owner           text,
    lease_until     timestamptz,
    acquired_at     timestamptz,
    CONSTRAINT relay_partition_lease_pkey PRIMARY KEY (partition_id),
    CONSTRAINT relay_partition_lease_partition_check CHECK (partition_id BETWEEN 0 AND 255),
    CONSTRAINT relay_partition_lease_owner_check CHECK ((owner IS NULL) = (lease_until IS NULL))
);

INSERT INTO relay_partition_lease (partition_id)
SELECT g::smallint FROM generate_series(0, 255) AS g;
