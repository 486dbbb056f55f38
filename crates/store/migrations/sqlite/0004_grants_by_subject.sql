-- A user's rights are the live grants naming it in any tenant: looked up by subject alone.
CREATE INDEX grants_live_by_subject ON grants (subject_type, subject_id) WHERE revoked_at IS NULL;
