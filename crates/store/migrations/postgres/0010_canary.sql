-- Canary credentials: indistinguishable from real ones by their token, they authenticate nowhere
-- and every presentation is recorded. Set at creation, never changed.
ALTER TABLE credentials ADD COLUMN canary BOOLEAN NOT NULL DEFAULT FALSE;
