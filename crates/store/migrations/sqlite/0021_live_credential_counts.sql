-- How many live (unrevoked) credentials each organization holds, kept by the triggers below in
-- the transaction that changes them, so that `serve --max-live-credentials-per-org` is checked by
-- reading one row (`Store::insert_credential_within_limit`) rather than by counting a tenant's
-- credentials on every create. Rotation, suspension and last-use updates leave it alone (one
-- credential stays one). SQLite has one writer at a time: no create can slip between another's
-- count and its commit.
CREATE TABLE live_credential_counts (
    tenant_id  BLOB PRIMARY KEY NOT NULL,
    live       INTEGER NOT NULL
);

CREATE TRIGGER credentials_counted_on_insert AFTER INSERT ON credentials
WHEN NEW.revoked_at IS NULL
BEGIN
    INSERT INTO live_credential_counts (tenant_id, live) VALUES (NEW.tenant_id, 1)
    ON CONFLICT (tenant_id) DO UPDATE SET live = live + 1;
END;

CREATE TRIGGER credentials_counted_on_revoke AFTER UPDATE OF revoked_at ON credentials
WHEN (OLD.revoked_at IS NULL) <> (NEW.revoked_at IS NULL)
BEGIN
    UPDATE live_credential_counts
    SET live = live + CASE WHEN NEW.revoked_at IS NULL THEN 1 ELSE -1 END
    WHERE tenant_id = NEW.tenant_id;
END;

CREATE TRIGGER credentials_counted_on_delete AFTER DELETE ON credentials
WHEN OLD.revoked_at IS NULL
BEGIN
    UPDATE live_credential_counts SET live = live - 1 WHERE tenant_id = OLD.tenant_id;
END;

INSERT INTO live_credential_counts (tenant_id, live)
SELECT tenant_id, COUNT(*) FROM credentials WHERE revoked_at IS NULL GROUP BY tenant_id;
