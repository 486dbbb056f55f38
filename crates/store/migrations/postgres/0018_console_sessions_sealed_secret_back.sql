-- The column 0016 dropped, back (nullable, unused by this release): keyplane releases before
-- 0016 read and write it (console sessions' one-time secret), and during a rolling upgrade they
-- keep serving the store this release migrated; without it, every console request they answer
-- failed (500). A secret such an older replica keeps here is shown only by older replicas, one
-- kept in console_session_secrets only by newer ones.
-- Drop it only in a release that must be upgraded to from one with 0016 or later: no replica
-- older than 0016 can then still be serving when the drop runs.
ALTER TABLE console_sessions ADD COLUMN sealed_secret BYTEA;
