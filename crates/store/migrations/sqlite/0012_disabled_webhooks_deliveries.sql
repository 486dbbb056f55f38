-- A webhook that is disabled fails its pending deliveries in the same transaction (store
-- `webhooks::FAIL_PENDING_DELIVERIES`). Those of webhooks disabled before that was so stayed
-- pending for good: failed now alike, with the same error.
UPDATE webhook_deliveries
SET status = 'failed', locked_until_ms = 0, lease_id = NULL,
    last_error = 'the webhook was disabled before the delivery was made'
WHERE status = 'pending' AND webhook_id IN (SELECT id FROM webhooks WHERE enabled = FALSE);
