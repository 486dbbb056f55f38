-- Webhooks (ARCHITECTURE.md, "Webhooks"). Times compared in SQL are Unix milliseconds, so both
-- backends compare them alike.
CREATE TABLE webhooks (
    id                        BLOB PRIMARY KEY NOT NULL,
    tenant_id                 BLOB NOT NULL,
    url                       TEXT NOT NULL,
    -- The patterns as the caller wrote them (JSON list), for reading back.
    events                    TEXT NOT NULL,
    description               TEXT NOT NULL,
    enabled                   BOOLEAN NOT NULL,
    -- `whsec_...`, kept as it is: every replica signs with it (HMAC needs the key itself).
    secret                    TEXT NOT NULL,
    previous_secret           TEXT,
    previous_secret_until_ms  INTEGER,
    failing_since_ms          INTEGER,
    created_at                TEXT NOT NULL,
    updated_at                TEXT NOT NULL
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id);

-- The patterns again, one row each, so that appending an audit event queues its deliveries with
-- one INSERT ... SELECT. `pattern` is the exact action, or the prefix when `is_prefix`.
CREATE TABLE webhook_event_patterns (
    webhook_id  BLOB NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    pattern     TEXT NOT NULL,
    is_prefix   BOOLEAN NOT NULL,
    PRIMARY KEY (webhook_id, pattern, is_prefix)
);

-- One event to one webhook. The event id is the delivery id and the `webhook-id` header.
CREATE TABLE webhook_deliveries (
    webhook_id        BLOB NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id          BLOB NOT NULL,
    tenant_id         BLOB NOT NULL,
    action            TEXT NOT NULL,
    -- pending, succeeded, failed
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL,
    -- How many delays of the retry schedule are used up.
    schedule_step     INTEGER NOT NULL,
    created_ms        INTEGER NOT NULL,
    next_attempt_ms   INTEGER NOT NULL,
    -- A replica sending it holds it until then (0: nobody); `lease_id` names that claim.
    locked_until_ms   INTEGER NOT NULL,
    lease_id          BLOB,
    last_attempt_ms   INTEGER,
    last_status_code  INTEGER,
    last_latency_ms   INTEGER,
    last_error        TEXT,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_ms) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_lease ON webhook_deliveries (lease_id);
CREATE INDEX webhook_deliveries_age ON webhook_deliveries (created_ms);
