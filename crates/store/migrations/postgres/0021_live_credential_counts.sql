-- How many live (unrevoked) credentials each organization holds, kept by the triggers below in
-- the transaction that changes them, so that `serve --max-live-credentials-per-org` is checked by
-- reading one row (`Store::insert_credential_within_limit`) rather than by counting a tenant's
-- credentials on every create. The count row is locked by the write that changes it until that
-- commits: concurrent creates in one tenant take turns, and each reads the count with its own
-- row in it. Rotation, suspension and last-use updates leave it alone (one credential stays one).

-- No writer changes credentials while the count is made (the triggers' own lock, taken first).
LOCK TABLE credentials IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE live_credential_counts (
    tenant_id  UUID PRIMARY KEY,
    live       BIGINT NOT NULL
);

-- Per statement: an import's batch of 10,000 rows is one upsert per tenant, not one per row.
CREATE FUNCTION keyplane_count_inserted_credentials() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO live_credential_counts (tenant_id, live)
    SELECT tenant_id, COUNT(*) FROM inserted WHERE revoked_at IS NULL
    GROUP BY tenant_id ORDER BY tenant_id
    ON CONFLICT (tenant_id) DO UPDATE SET live = live_credential_counts.live + EXCLUDED.live;
    RETURN NULL;
END;
$$;

-- Per row (a column list and transition tables do not go together): only a change of liveness.
CREATE FUNCTION keyplane_count_revoked_credential() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE live_credential_counts
    SET live = live + CASE WHEN NEW.revoked_at IS NULL THEN 1 ELSE -1 END
    WHERE tenant_id = NEW.tenant_id;
    RETURN NULL;
END;
$$;

CREATE FUNCTION keyplane_count_deleted_credential() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE live_credential_counts SET live = live - 1 WHERE tenant_id = OLD.tenant_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER credentials_counted_on_insert AFTER INSERT ON credentials
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION keyplane_count_inserted_credentials();
CREATE TRIGGER credentials_counted_on_revoke AFTER UPDATE OF revoked_at ON credentials
    FOR EACH ROW WHEN ((OLD.revoked_at IS NULL) <> (NEW.revoked_at IS NULL))
    EXECUTE FUNCTION keyplane_count_revoked_credential();
CREATE TRIGGER credentials_counted_on_delete AFTER DELETE ON credentials
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL)
    EXECUTE FUNCTION keyplane_count_deleted_credential();

INSERT INTO live_credential_counts (tenant_id, live)
SELECT tenant_id, COUNT(*) FROM credentials WHERE revoked_at IS NULL GROUP BY tenant_id;
