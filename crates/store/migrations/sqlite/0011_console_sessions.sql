-- Web console sessions (server `console::session`). The browser's cookie value is never stored:
-- `id_hash` is its SHA-256, and the signed-in token (and a one-time secret waiting to be shown)
-- are sealed under a key derived from the cookie value, which only the browser holds. Times are
-- Unix milliseconds, so both backends compare them alike.
CREATE TABLE console_sessions (
    id_hash          BLOB PRIMARY KEY NOT NULL,
    tenant_id        BLOB NOT NULL,
    sealed_token     BLOB NOT NULL,
    label            TEXT NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    last_seen_at_ms  INTEGER NOT NULL,
    ends_at_ms       INTEGER NOT NULL,
    notice           TEXT,
    sealed_secret    BLOB
);

CREATE INDEX console_sessions_by_end ON console_sessions (ends_at_ms);
CREATE INDEX console_sessions_by_last_seen ON console_sessions (last_seen_at_ms);
