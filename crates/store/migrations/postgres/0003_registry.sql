-- Robot accounts' registry permissions (JSON list); NULL for other kinds.
ALTER TABLE credentials ADD COLUMN permissions TEXT;

CREATE TABLE registries (
    tenant_id   UUID PRIMARY KEY REFERENCES tenants(id),
    id          UUID NOT NULL UNIQUE,
    project     TEXT NOT NULL UNIQUE,
    quota_gb    BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- The registry token signing key, shared by every replica. At most one row.
CREATE TABLE registry_signing_keys (
    slot             TEXT PRIMARY KEY,
    key_id           TEXT NOT NULL,
    private_key_pem  TEXT NOT NULL,
    certificate_pem  TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
);
