-- Timestamps are RFC 3339 text written by sqlx/chrono; ids are 16-byte UUID blobs.
CREATE TABLE tenants (
    id          BLOB PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE credentials (
    id                  BLOB PRIMARY KEY NOT NULL,
    tenant_id           BLOB NOT NULL REFERENCES tenants(id),
    kind                TEXT NOT NULL,
    name                TEXT NOT NULL,
    secret_hash         BLOB NOT NULL,
    display_prefix      TEXT NOT NULL,
    public_id           TEXT,
    last4               TEXT NOT NULL,
    scopes              TEXT NOT NULL,
    expires_at          TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    last_used_at        TEXT,
    revoked_at          TEXT,
    created_by_user_id  BLOB,
    revoked_by_user_id  BLOB
);

CREATE UNIQUE INDEX credentials_secret_hash ON credentials (secret_hash);
-- Names are unique per tenant and kind among live credentials only: a revoked name can be reused.
CREATE UNIQUE INDEX credentials_live_name ON credentials (tenant_id, kind, name) WHERE revoked_at IS NULL;
CREATE INDEX credentials_listing ON credentials (tenant_id, kind, id);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL
);
