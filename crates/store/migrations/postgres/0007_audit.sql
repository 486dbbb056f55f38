-- The audit trail. Each tenant's events form a hash chain ordered by `seq` (1, 2, ...), assigned
-- under the tenant's row in audit_chain_heads, which every writing transaction updates.
CREATE TABLE audit_events (
    tenant_id     UUID NOT NULL,
    seq           BIGINT NOT NULL,
    id            UUID NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    action        TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    actor_type    TEXT NOT NULL,
    actor_id      UUID,
    actor_issuer  TEXT,
    actor_sub     TEXT,
    target_type   TEXT,
    target_id     UUID,
    target_name   TEXT,
    request_id    TEXT,
    client_ip     TEXT,
    user_agent    TEXT,
    details       TEXT NOT NULL,
    -- Lowercase hex SHA-256(previous chain_hash || canonical bytes).
    chain_hash    TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE UNIQUE INDEX audit_events_id ON audit_events (tenant_id, id);
CREATE INDEX audit_events_age ON audit_events (occurred_at);

-- The newest event of each tenant's chain.
CREATE TABLE audit_chain_heads (
    tenant_id   UUID PRIMARY KEY,
    seq         BIGINT NOT NULL,
    chain_hash  TEXT NOT NULL
);

-- Where a pruned chain starts: the last pruned event's seq and chain_hash.
CREATE TABLE audit_chain_anchors (
    tenant_id   UUID PRIMARY KEY,
    seq         BIGINT NOT NULL,
    chain_hash  TEXT NOT NULL
);

-- How far each export (`serve --audit-log`) has written each tenant's chain.
CREATE TABLE audit_export_cursors (
    consumer   TEXT NOT NULL,
    tenant_id  UUID NOT NULL,
    seq        BIGINT NOT NULL,
    PRIMARY KEY (consumer, tenant_id)
);
