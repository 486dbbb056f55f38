-- Indexes for the queries over tables that grow without bound, so that each reads about the rows
-- it returns (store `query_plans` checks that each is used).

-- The audit list's filters (store `audit_query`), newest first by seq within the tenant.
CREATE INDEX audit_events_by_target ON audit_events (tenant_id, target_id, seq);
CREATE INDEX audit_events_by_actor ON audit_events (tenant_id, actor_id, seq);
CREATE INDEX audit_events_by_action ON audit_events (tenant_id, action, seq);
CREATE INDEX audit_events_by_time ON audit_events (tenant_id, occurred_at);

-- The expiry sweep, one index a stage (days before expiry: 0 and `EXPIRY_WARNING_DAYS`): each
-- holds only the credentials still to announce at that stage, its predicate the very text of
-- the stage's query (store `expiry_notice_sql`). The one index of all four held those already
-- announced too, which every sweep read again.
CREATE INDEX credentials_expiry_stage_0 ON credentials (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL
      AND (expiry_notice_days IS NULL OR expiry_notice_days > 0);
CREATE INDEX credentials_expiry_stage_1 ON credentials (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL
      AND (expiry_notice_days IS NULL OR expiry_notice_days > 1);
CREATE INDEX credentials_expiry_stage_7 ON credentials (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL
      AND (expiry_notice_days IS NULL OR expiry_notice_days > 7);
CREATE INDEX credentials_expiry_stage_30 ON credentials (expires_at)
    WHERE revoked_at IS NULL AND expires_at IS NOT NULL
      AND (expiry_notice_days IS NULL OR expiry_notice_days > 30);
DROP INDEX credentials_expiry_sweep;

-- Grace periods in the order they end: the sweep's next wake-up, the retirement pages, the
-- ended ones to clear (store `in_grace_sql`, `retiring_previous_sql`, `ENDED_PREVIOUS_SECRETS`).
CREATE INDEX credentials_previous_secret_expiry ON credentials (previous_secret_expires_at, id)
    WHERE previous_secret_hash IS NOT NULL;

-- `?expiring_within_days=`: a tenant's live credentials of a kind by expiry.
CREATE INDEX credentials_expiring ON credentials (tenant_id, kind, expires_at)
    WHERE revoked_at IS NULL;

-- A webhook's deliveries of one status, newest first (`?status=`), and its pending ones, which
-- disabling it fails.
CREATE INDEX webhook_deliveries_by_status ON webhook_deliveries (webhook_id, status, event_id);

-- The claim (store `CLAIM_DELIVERIES`): the webhooks with pending deliveries, and each one's
-- oldest due few, which is all it may lease, rather than its whole backlog.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, next_attempt_ms, event_id)
    WHERE status = 'pending';
