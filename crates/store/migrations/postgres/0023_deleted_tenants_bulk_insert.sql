-- 0020's check on `credentials`, once per statement instead of once per row, on every path: the
-- bulk import writes 500 rows to a statement, and a plpgsql call per row made a 1M import 26%
-- slower (BENCHMARKS.md). A single insert is a statement of one row.
--
-- It locks the tenant rows of the rows the statement inserted FOR SHARE, one at a time in id
-- order, as 0020's did row by row: an insert either commits before `admin delete-org`'s final
-- transaction (which updates the tenant's row first, and then sees the row live and refuses) or
-- waits for it and fails. The trigger is AFTER (transition tables exist only there): the rows are
-- inserted, uncommitted, when it refuses, and go with the statement; the deletion's final
-- transaction reads and deletes only committed rows, so it never waits for them. The message is
-- the one the store's error mapping looks for (`DELETED_TENANT`).
CREATE FUNCTION keyplane_refuse_deleted_tenants_of_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tenant UUID;
    deleted TIMESTAMPTZ;
BEGIN
    FOR tenant IN SELECT DISTINCT inserted.tenant_id FROM inserted ORDER BY 1 LOOP
        SELECT deleted_at INTO deleted FROM tenants WHERE id = tenant FOR SHARE;
        IF deleted IS NOT NULL THEN
            RAISE EXCEPTION 'keyplane: the organization is deleted';
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER credentials_of_live_tenants ON credentials;
CREATE TRIGGER credentials_of_live_tenants AFTER INSERT ON credentials
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION keyplane_refuse_deleted_tenants_of_inserted();
