-- Registry signing key rotation: besides 'current', a staged 'next' key and the 'previous' one a
-- promotion replaced, with when it stopped signing (tokens it signed may be valid a token
-- lifetime longer, so it stays in the registry's bundle until then).
ALTER TABLE registry_signing_keys ADD COLUMN signed_until TEXT;
