-- Idempotency-Key records (ARCHITECTURE.md, "Safe retries"). The key itself is never stored:
-- `lookup_id` is derived from it (HKDF, per tenant and caller) and `response` is the reply's body
-- encrypted under another key derived from it. Times are Unix milliseconds, so both backends
-- compare them alike in SQL (the expiry and the prune).
CREATE TABLE idempotency_keys (
    lookup_id        BYTEA PRIMARY KEY,
    tenant_id        UUID NOT NULL,
    principal_id     UUID NOT NULL,
    -- SHA-256 of the request's method, path and body.
    fingerprint      BYTEA NOT NULL,
    -- The attempt holding the key; only it may complete or release the record.
    claim_id         UUID NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    locked_until_ms  BIGINT NOT NULL,
    -- NULL while the first request is in flight.
    status           INTEGER,
    nonce            BYTEA,
    response         BYTEA
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms);
