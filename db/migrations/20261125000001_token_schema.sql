-- migrate:up

-- Roles the services run as. They are cluster-wide, so another database of the
-- same cluster may have created them already. Deployment grants them to login users.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'token_service') THEN
    CREATE ROLE token_service NOLOGIN;
  END IF;
END
$$;

CREATE SCHEMA token;
REVOKE ALL ON SCHEMA token FROM PUBLIC;
GRANT USAGE ON SCHEMA token TO token_service;

-- Plans are the single source of allowances.
CREATE TABLE token.plan (
  code              text PRIMARY KEY CHECK (code ~ '^[a-z][a-z0-9_]{0,31}$'),
  name              text NOT NULL,
  monthly_allowance bigint NOT NULL CHECK (monthly_allowance >= 0),
  signup_grant      bigint NOT NULL CHECK (signup_grant >= 0),
  created_at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO token.plan (code, name, monthly_allowance, signup_grant) VALUES
  ('free', 'Free', 50, 100),
  ('pro', 'Pro', 1000, 100);

CREATE TABLE token.app_user (
  id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- Stored trimmed and lower-cased, so the unique index is case-insensitive.
  email      text NOT NULL CHECK (email = lower(btrim(email)) AND char_length(email) BETWEEN 3 AND 254),
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT app_user_email_key UNIQUE (email)
);

CREATE TABLE token.token_account (
  user_id    uuid PRIMARY KEY REFERENCES token.app_user (id) ON DELETE CASCADE,
  balance    bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
  plan_code  text NOT NULL REFERENCES token.plan (code),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_token_account_plan ON token.token_account (plan_code);

-- Append-only: every balance change, with the balance it left.
CREATE TABLE token.token_ledger (
  id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  -- Insertion order; breaks ties between entries of one instant.
  seq           bigint GENERATED ALWAYS AS IDENTITY,
  user_id       uuid NOT NULL REFERENCES token.token_account (user_id),
  delta         bigint NOT NULL CHECK (delta <> 0 AND abs(delta) <= 1000000000000),
  reason        text NOT NULL CHECK (reason IN (
                  'GENERATION', 'GENERATION_REFUND', 'MONTHLY_REFILL',
                  'PURCHASE', 'SIGNUP_BONUS', 'ADJUSTMENT')),
  reference_id  text NOT NULL CHECK (char_length(reference_id) BETWEEN 1 AND 200),
  balance_after bigint NOT NULL CHECK (balance_after >= 0),
  occurred_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
  CONSTRAINT token_ledger_user_reference_key UNIQUE (user_id, reference_id)
);

CREATE INDEX idx_token_ledger_user_time ON token.token_ledger (user_id, occurred_at DESC, seq DESC);

CREATE FUNCTION token.reject_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'token_ledger is append-only: % is not allowed', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER token_ledger_append_only
  BEFORE UPDATE OR DELETE ON token.token_ledger
  FOR EACH ROW EXECUTE FUNCTION token.reject_ledger_change();

CREATE TRIGGER token_ledger_no_truncate
  BEFORE TRUNCATE ON token.token_ledger
  FOR EACH STATEMENT EXECUTE FUNCTION token.reject_ledger_change();

-- One-time-password login challenges; only a keyed hash of the code is kept.
CREATE TABLE token.auth_otp (
  id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  email          text NOT NULL CHECK (email = lower(btrim(email))),
  user_id        uuid REFERENCES token.app_user (id) ON DELETE SET NULL,
  code_hash      bytea NOT NULL CHECK (octet_length(code_hash) = 32),
  created_at     timestamptz NOT NULL DEFAULT now(),
  expires_at     timestamptz NOT NULL,
  attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  consumed_at    timestamptz,
  -- Set when a newer challenge supersedes this one or its attempts run out.
  invalidated_at timestamptz,
  CHECK (expires_at > created_at)
);

-- One active challenge per email.
CREATE UNIQUE INDEX idx_auth_otp_email_active ON token.auth_otp (email)
  WHERE consumed_at IS NULL AND invalidated_at IS NULL;
-- Rate limit: requests per email in the last hour.
CREATE INDEX idx_auth_otp_email_time ON token.auth_otp (email, created_at);
-- Daily cleanup of expired challenges.
CREATE INDEX idx_auth_otp_expires ON token.auth_otp (expires_at);

GRANT SELECT ON token.plan TO token_service;
GRANT SELECT, INSERT, UPDATE ON token.app_user, token.token_account TO token_service;
GRANT SELECT, INSERT ON token.token_ledger TO token_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON token.auth_otp TO token_service;

-- migrate:down

DROP SCHEMA token CASCADE;

-- The role stays while another database of the cluster still grants it rights.
DO $$
BEGIN
  DROP ROLE IF EXISTS token_service;
EXCEPTION WHEN dependent_objects_still_exist THEN
  RAISE NOTICE 'role token_service is still used elsewhere in the cluster; kept';
END
$$;
