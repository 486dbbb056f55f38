CREATE TABLE tenants (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE credentials (
    id                  UUID PRIMARY KEY,
    tenant_id           UUID NOT NULL REFERENCES tenants(id),
    kind                TEXT NOT NULL,
    name                TEXT NOT NULL,
    secret_hash         BYTEA NOT NULL,
    display_prefix      TEXT NOT NULL,
    public_id           TEXT,
    last4               TEXT NOT NULL,
    scopes              TEXT NOT NULL,
    expires_at          TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    last_used_at        TIMESTAMPTZ,
    revoked_at          TIMESTAMPTZ,
    created_by_user_id  UUID,
    revoked_by_user_id  UUID
);

CREATE UNIQUE INDEX credentials_secret_hash ON credentials (secret_hash);
-- Names are unique per tenant and kind among live credentials only: a revoked name can be reused.
CREATE UNIQUE INDEX credentials_live_name ON credentials (tenant_id, kind, name) WHERE revoked_at IS NULL;
CREATE INDEX credentials_listing ON credentials (tenant_id, kind, id);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
