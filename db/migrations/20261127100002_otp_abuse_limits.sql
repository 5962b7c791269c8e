-- migrate:up

-- Login codes no longer supersede each other: every code mailed works until it expires, is
-- used, or its attempts run out, so a request made by someone else never takes away the code
-- a person already holds (docs/security.md). A successful login ends the email's other codes.
-- auth_otp stays small (challenges are deleted after they expire), so its locks are brief.
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX token.idx_auth_otp_email_active;

-- Who asked for the code: the calling service and the end user's address it passed on
-- (x-forwarded-for), for the limit per client. NULL for challenges from before.
ALTER TABLE token.auth_otp ADD COLUMN client text CHECK (char_length(client) <= 256);
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX idx_auth_otp_client_time ON token.auth_otp (client, created_at);
-- The ceiling on mail sent per minute counts every recent challenge.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX idx_auth_otp_created ON token.auth_otp (created_at);

-- migrate:down

DROP INDEX token.idx_auth_otp_created;
DROP INDEX token.idx_auth_otp_client_time;
ALTER TABLE token.auth_otp DROP COLUMN client;
-- Only the newest live challenge of each email stays active.
UPDATE token.auth_otp o SET invalidated_at = now()
WHERE consumed_at IS NULL AND invalidated_at IS NULL
  AND EXISTS (SELECT FROM token.auth_otp n WHERE n.email = o.email AND n.consumed_at IS NULL
              AND n.invalidated_at IS NULL AND (n.created_at, n.id) > (o.created_at, o.id));
CREATE UNIQUE INDEX idx_auth_otp_email_active ON token.auth_otp (email)
  WHERE consumed_at IS NULL AND invalidated_at IS NULL;
