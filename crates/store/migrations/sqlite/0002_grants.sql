CREATE TABLE grants (
    id                  BLOB PRIMARY KEY NOT NULL,
    tenant_id           BLOB NOT NULL REFERENCES tenants(id),
    grant_kind          TEXT NOT NULL,
    subject_type        TEXT NOT NULL,
    subject_id          BLOB NOT NULL,
    capability_key      TEXT,
    resource_type       TEXT,
    resource_id         TEXT,
    created_at          TEXT NOT NULL,
    revoked_at          TEXT,
    created_by_user_id  BLOB
);

-- One live grant per subject, kind, capability and resource.
CREATE UNIQUE INDEX grants_live_unique ON grants (
    tenant_id, subject_type, subject_id, grant_kind,
    COALESCE(capability_key, ''), COALESCE(resource_type, ''), COALESCE(resource_id, '')
) WHERE revoked_at IS NULL;
CREATE INDEX grants_by_subject ON grants (tenant_id, subject_type, subject_id);
