-- Public revocation reports (server `leaks::revoke`) answered 202 and not yet worked off: kept so
-- that a kill, a crash or a stop loses none. Only the SHA-256 of each reported token is kept (what
-- `credentials.secret_hash` holds), never a token. A replica works a report off under a lease
-- (`lease_id` until `locked_until_ms`) and deletes it once done; a report whose lease ran out (its
-- replica died, or the store failed its work) is taken again by any replica. Times are Unix
-- milliseconds, so both backends compare them alike.
CREATE TABLE leak_reports (
    id               UUID PRIMARY KEY,
    -- The reported tokens' SHA-256 hashes, 32 bytes each, end to end.
    token_hashes     BYTEA NOT NULL,
    -- The reporting request, for the `credential.leaked` events.
    request_id       TEXT,
    client_ip        TEXT,
    user_agent       TEXT,
    received_at_ms   BIGINT NOT NULL,
    -- Leases taken so far, the first one at receipt.
    attempts         INTEGER NOT NULL,
    lease_id         UUID NOT NULL,
    locked_until_ms  BIGINT NOT NULL
);

CREATE INDEX leak_reports_by_lease ON leak_reports (locked_until_ms);
CREATE INDEX leak_reports_by_age ON leak_reports (received_at_ms);
