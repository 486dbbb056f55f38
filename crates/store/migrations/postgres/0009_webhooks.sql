-- Webhooks (ARCHITECTURE.md, "Webhooks"). Times compared in SQL are Unix milliseconds, so both
-- backends compare them alike.
CREATE TABLE webhooks (
    id                        UUID PRIMARY KEY,
    tenant_id                 UUID NOT NULL,
    url                       TEXT NOT NULL,
    -- The patterns as the caller wrote them (JSON list), for reading back.
    events                    TEXT NOT NULL,
    description               TEXT NOT NULL,
    enabled                   BOOLEAN NOT NULL,
    -- `whsec_...`, kept as it is: every replica signs with it (HMAC needs the key itself).
    secret                    TEXT NOT NULL,
    previous_secret           TEXT,
    previous_secret_until_ms  BIGINT,
    failing_since_ms          BIGINT,
    created_at                TIMESTAMPTZ NOT NULL,
    updated_at                TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id);

-- The patterns again, one row each, so that appending an audit event queues its deliveries with
-- one INSERT ... SELECT. `pattern` is the exact action, or the prefix when `is_prefix`.
CREATE TABLE webhook_event_patterns (
    webhook_id  UUID NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    pattern     TEXT NOT NULL,
    is_prefix   BOOLEAN NOT NULL,
    PRIMARY KEY (webhook_id, pattern, is_prefix)
);

-- One event to one webhook. The event id is the delivery id and the `webhook-id` header.
CREATE TABLE webhook_deliveries (
    webhook_id        UUID NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id          UUID NOT NULL,
    tenant_id         UUID NOT NULL,
    action            TEXT NOT NULL,
    -- pending, succeeded, failed
    status            TEXT NOT NULL,
    attempts          BIGINT NOT NULL,
    -- How many delays of the retry schedule are used up.
    schedule_step     BIGINT NOT NULL,
    created_ms        BIGINT NOT NULL,
    next_attempt_ms   BIGINT NOT NULL,
    -- A replica sending it holds it until then (0: nobody); `lease_id` names that claim.
    locked_until_ms   BIGINT NOT NULL,
    lease_id          UUID,
    last_attempt_ms   BIGINT,
    last_status_code  BIGINT,
    last_latency_ms   BIGINT,
    last_error        TEXT,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_ms) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_lease ON webhook_deliveries (lease_id);
CREATE INDEX webhook_deliveries_age ON webhook_deliveries (created_ms);
