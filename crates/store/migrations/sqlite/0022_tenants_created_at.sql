-- `admin list-orgs` pages through the live organizations in creation order from a cursor (store
-- `tenant_list_query`), which read every organization and sorted them; with `--name`, and
-- `admin create-org`'s check that no live organization has the name (store
-- `SELECT_LIVE_TENANT_NAMED`, run under the creation's lock), only those of the name. Not
-- CONCURRENTLY: each migration runs in a transaction, as the earlier index migrations do, and the
-- table holds one row per organization, so the build is brief.
CREATE INDEX tenants_listing ON tenants (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX tenants_by_name ON tenants (name, created_at, id) WHERE deleted_at IS NULL;
