-- The credential lifecycle (ARCHITECTURE.md, "Credential lifecycle"): rotation with a grace
-- period keeps the replaced secret as the previous one; suspension; expiry warnings; the tenant's
-- credential policy.
ALTER TABLE credentials ADD COLUMN suspended_at TEXT;
ALTER TABLE credentials ADD COLUMN rotated_at TEXT;
ALTER TABLE credentials ADD COLUMN previous_secret_hash BLOB;
ALTER TABLE credentials ADD COLUMN previous_secret_expires_at TEXT;
ALTER TABLE credentials ADD COLUMN previous_secret_last_used_at TEXT;
ALTER TABLE credentials ADD COLUMN retire_previous_when_unused_seconds INTEGER;
-- The expiry warning stage (days before expires_at: 30, 7, 1; 0 = expired) already announced for
-- the current expires_at; NULL when none was. The sweep moves it down with a compare-and-set, so
-- each stage is announced once, whatever the number of replicas.
ALTER TABLE credentials ADD COLUMN expiry_notice_days INTEGER;

-- The verification lookup of a previous secret (only rows within a grace period have one).
CREATE INDEX credentials_previous_secret_hash ON credentials (previous_secret_hash)
    WHERE previous_secret_hash IS NOT NULL;
-- The expiry sweep: live expiring credentials whose expiry has not been announced yet.
CREATE INDEX credentials_expiry_sweep ON credentials (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL
      AND (expiry_notice_days IS NULL OR expiry_notice_days > 0);

-- One policy per tenant, as its canonical JSON text (crates/store/src/rows.rs).
CREATE TABLE credential_policies (
    tenant_id   BLOB PRIMARY KEY NOT NULL REFERENCES tenants(id),
    policy      TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
