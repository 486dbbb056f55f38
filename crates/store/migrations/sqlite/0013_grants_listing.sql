-- A tenant's grants in creation order, a page at a time from a cursor (the authorizations list).
CREATE INDEX grants_listing ON grants (tenant_id, id);
