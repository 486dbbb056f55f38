-- Who created each credential and grant, on its row, so that an access review outlives audit
-- retention: the actor its creation event names (type and id; no id for `system`), the way it
-- came in (`api`, `console`, `admin`, `bootstrap`), and for an admin command the operator who
-- ran it (the OS user, and the name given with --operator). Additive and nullable: a previous
-- release keeps inserting rows without them (read as unknown), and rows created before this
-- migration stay NULL, unknown.
ALTER TABLE credentials ADD COLUMN created_by_actor_type TEXT;
ALTER TABLE credentials ADD COLUMN created_by_actor_id UUID;
ALTER TABLE credentials ADD COLUMN created_by_via TEXT;
ALTER TABLE credentials ADD COLUMN created_by_os_user TEXT;
ALTER TABLE credentials ADD COLUMN created_by_operator TEXT;
ALTER TABLE grants ADD COLUMN created_by_actor_type TEXT;
ALTER TABLE grants ADD COLUMN created_by_actor_id UUID;
ALTER TABLE grants ADD COLUMN created_by_via TEXT;
ALTER TABLE grants ADD COLUMN created_by_os_user TEXT;
ALTER TABLE grants ADD COLUMN created_by_operator TEXT;
