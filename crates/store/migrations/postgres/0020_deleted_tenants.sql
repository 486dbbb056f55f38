-- `admin delete-org`: a deleted organization stays as a tombstone (its name, for `admin audit`
-- and the access review; its audit events until retention prunes them; its registry's row, so
-- the project name stays taken), marked by `deleted_at`. Lookups treat it as unknown.
ALTER TABLE tenants ADD COLUMN deleted_at TIMESTAMPTZ;

-- Nothing is created in a deleted organization, whichever path tries (an API or admin command
-- racing the deletion, or one added later): the store refuses the row. The message is the one
-- the store's error mapping looks for (`DELETED_TENANT`). The tenant's row is read FOR SHARE:
-- the deletion's final transaction updates that row first, so an insert either commits before
-- it (and the deletion, seeing a live row, refuses) or waits for it and finds it deleted.
CREATE FUNCTION keyplane_refuse_deleted_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deleted TIMESTAMPTZ;
BEGIN
    SELECT deleted_at INTO deleted FROM tenants WHERE id = NEW.tenant_id FOR SHARE;
    IF deleted IS NOT NULL THEN
        RAISE EXCEPTION 'keyplane: the organization is deleted';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER credentials_of_live_tenants BEFORE INSERT ON credentials
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
CREATE TRIGGER grants_of_live_tenants BEFORE INSERT ON grants
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
CREATE TRIGGER registries_of_live_tenants BEFORE INSERT ON registries
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
CREATE TRIGGER webhooks_of_live_tenants BEFORE INSERT ON webhooks
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
CREATE TRIGGER credential_policies_of_live_tenants BEFORE INSERT ON credential_policies
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
CREATE TRIGGER console_sessions_of_live_tenants BEFORE INSERT ON console_sessions
    FOR EACH ROW EXECUTE FUNCTION keyplane_refuse_deleted_tenant();
