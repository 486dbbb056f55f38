-- One-time secrets waiting to be shown in a console session, several per session (two tabs each
-- creating a token), oldest first. Each is written in the transaction of the change that made it,
-- sealed under the session's cookie value as before; a pending one from before this migration
-- moves here.
CREATE TABLE console_session_secrets (
    seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id_hash  BYTEA NOT NULL REFERENCES console_sessions (id_hash) ON DELETE CASCADE,
    sealed   BYTEA NOT NULL
);

CREATE INDEX console_session_secrets_by_session ON console_session_secrets (id_hash, seq);

INSERT INTO console_session_secrets (id_hash, sealed)
    SELECT id_hash, sealed_secret FROM console_sessions WHERE sealed_secret IS NOT NULL;

ALTER TABLE console_sessions DROP COLUMN sealed_secret;
