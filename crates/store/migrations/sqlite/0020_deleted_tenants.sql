-- `admin delete-org`: a deleted organization stays as a tombstone (its name, for `admin audit`
-- and the access review; its audit events until retention prunes them; its registry's row, so
-- the project name stays taken), marked by `deleted_at`. Lookups treat it as unknown.
ALTER TABLE tenants ADD COLUMN deleted_at TEXT;

-- Nothing is created in a deleted organization, whichever path tries (an API or admin command
-- racing the deletion, or one added later): the store refuses the row. The message is the one
-- the store's error mapping looks for (`DELETED_TENANT`). SQLite has one writer at a time, so
-- the deletion's transaction and an insert cannot interleave.
CREATE TRIGGER credentials_of_live_tenants BEFORE INSERT ON credentials
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;

CREATE TRIGGER grants_of_live_tenants BEFORE INSERT ON grants
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;

CREATE TRIGGER registries_of_live_tenants BEFORE INSERT ON registries
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;

CREATE TRIGGER webhooks_of_live_tenants BEFORE INSERT ON webhooks
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;

CREATE TRIGGER credential_policies_of_live_tenants BEFORE INSERT ON credential_policies
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;

CREATE TRIGGER console_sessions_of_live_tenants BEFORE INSERT ON console_sessions
WHEN EXISTS (SELECT 1 FROM tenants WHERE id = NEW.tenant_id AND deleted_at IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'keyplane: the organization is deleted'); END;
