-- migrate:up

-- Wrong login codes, counted per (email, client) and per client, instead of against the codes:
-- a wrong guess no longer kills a code, so someone else's guesses never take away the codes a
-- person holds (docs/security.md). The client is the calling service and the end user's address
-- it passed on, or the calling service alone. DeleteExpiredOtps deletes the rows before its
-- cutoff (at least an hour, the longest window). auth_otp.attempts is no longer written (kept for migrating down).
CREATE TABLE token.auth_otp_failure (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  email text NOT NULL,
  client text NOT NULL CHECK (char_length(client) <= 256),
  failed_at timestamptz NOT NULL
);
CREATE INDEX idx_auth_otp_failure_email_client ON token.auth_otp_failure (email, client, failed_at);
CREATE INDEX idx_auth_otp_failure_client ON token.auth_otp_failure (client, failed_at);
CREATE INDEX idx_auth_otp_failure_time ON token.auth_otp_failure (failed_at);

GRANT SELECT, INSERT, DELETE ON token.auth_otp_failure TO token_service;

-- migrate:down

DROP TABLE token.auth_otp_failure;
