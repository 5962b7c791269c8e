-- migrate:up

DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'generation_service') THEN
    CREATE ROLE generation_service NOLOGIN;
  END IF;
END
$$;

CREATE SCHEMA generation;
REVOKE ALL ON SCHEMA generation FROM PUBLIC;
GRANT USAGE ON SCHEMA generation TO generation_service;

-- user_id refers to token.app_user, which belongs to the token service: it is
-- checked through that service (the charge), not by a foreign key across schemas.
CREATE TABLE generation.generation_job (
  id               uuid PRIMARY KEY,
  user_id          uuid NOT NULL,
  prompt           text NOT NULL CHECK (char_length(prompt) BETWEEN 1 AND 4000),
  params           jsonb NOT NULL,
  tokens_cost      bigint NOT NULL CHECK (tokens_cost >= 1),
  -- CHARGING (an intent being charged) and REJECTED (the charge was refused)
  -- are internal: such jobs are invisible through the API.
  status           text NOT NULL CHECK (status IN (
                     'CHARGING', 'REJECTED', 'QUEUED', 'RUNNING', 'SUCCEEDED',
                     'FAILED', 'ARCHIVED', 'PAUSED')),
  -- Digest of the create request, to tell a retry from a conflicting reuse of the id.
  request_digest   bytea NOT NULL,
  error_message    text CHECK (char_length(error_message) <= 2000),
  worker_id        text,
  lease_expires_at timestamptz,
  lost_leases      integer NOT NULL DEFAULT 0 CHECK (lost_leases >= 0),
  -- NONE, PENDING (owed since the job failed) or DONE.
  refund_state     text NOT NULL DEFAULT 'NONE' CHECK (refund_state IN ('NONE', 'PENDING', 'DONE')),
  -- Set by the emergency pause on a job still being charged: its charge settles it PAUSED.
  pause_requested  boolean NOT NULL DEFAULT false,
  created_at       timestamptz NOT NULL DEFAULT now(),
  started_at       timestamptz,
  completed_at     timestamptz,
  updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_generation_job_user_time ON generation.generation_job (user_id, created_at DESC, id DESC);
-- Claim order: the oldest queued job first.
CREATE INDEX idx_generation_job_queued ON generation.generation_job (created_at, id) WHERE status = 'QUEUED';
CREATE INDEX idx_generation_job_lease ON generation.generation_job (lease_expires_at) WHERE status = 'RUNNING';
-- Reconciler: intents to finish and refunds owed.
CREATE INDEX idx_generation_job_charging ON generation.generation_job (updated_at) WHERE status = 'CHARGING';
CREATE INDEX idx_generation_job_refund ON generation.generation_job (updated_at) WHERE refund_state = 'PENDING';
-- Monthly archive of completed jobs.
CREATE INDEX idx_generation_job_completed ON generation.generation_job (completed_at)
  WHERE status IN ('SUCCEEDED', 'FAILED');
CREATE INDEX idx_generation_job_paused ON generation.generation_job (created_at) WHERE status = 'PAUSED';

CREATE TABLE generation.asset_image (
  id          uuid PRIMARY KEY,
  job_id      uuid NOT NULL REFERENCES generation.generation_job (id),
  user_id     uuid NOT NULL,
  title       text NOT NULL CHECK (char_length(title) <= 200),
  storage_key text NOT NULL CHECK (char_length(storage_key) BETWEEN 1 AND 1024),
  mime_type   text NOT NULL,
  bytes_size  bigint NOT NULL CHECK (bytes_size > 0),
  width       integer NOT NULL CHECK (width BETWEEN 1 AND 16384),
  height      integer NOT NULL CHECK (height BETWEEN 1 AND 16384),
  format      text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT asset_image_format_mime CHECK ((format, mime_type) IN (
    ('WEBP', 'image/webp'), ('PNG', 'image/png'), ('JPEG', 'image/jpeg'), ('AVIF', 'image/avif')))
);

CREATE INDEX idx_asset_image_user_time ON generation.asset_image (user_id, created_at DESC, id DESC);
CREATE INDEX idx_asset_image_job ON generation.asset_image (job_id);

CREATE TABLE generation.asset_image_variant (
  id          uuid PRIMARY KEY,
  asset_id    uuid NOT NULL REFERENCES generation.asset_image (id) ON DELETE CASCADE,
  kind        text NOT NULL CHECK (kind IN ('THUMBNAIL', 'WEB', 'PRINT')),
  storage_key text NOT NULL CHECK (char_length(storage_key) BETWEEN 1 AND 1024),
  mime_type   text NOT NULL,
  bytes_size  bigint NOT NULL CHECK (bytes_size > 0),
  width       integer NOT NULL CHECK (width BETWEEN 1 AND 16384),
  height      integer NOT NULL CHECK (height BETWEEN 1 AND 16384),
  format      text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT asset_image_variant_asset_kind_key UNIQUE (asset_id, kind),
  CONSTRAINT asset_image_variant_format_mime CHECK ((format, mime_type) IN (
    ('WEBP', 'image/webp'), ('PNG', 'image/png'), ('JPEG', 'image/jpeg'), ('AVIF', 'image/avif')))
);

-- Watchers of a job learn of each change through LISTEN generation_job.
CREATE FUNCTION generation.notify_job_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('generation_job', NEW.id::text);
  RETURN NULL;
END
$$;

CREATE TRIGGER generation_job_notify
  AFTER INSERT OR UPDATE ON generation.generation_job
  FOR EACH ROW EXECUTE FUNCTION generation.notify_job_change();

GRANT SELECT, INSERT, UPDATE ON generation.generation_job, generation.asset_image,
  generation.asset_image_variant TO generation_service;

-- migrate:down

DROP SCHEMA generation CASCADE;

DO $$
BEGIN
  DROP ROLE IF EXISTS generation_service;
EXCEPTION WHEN dependent_objects_still_exist THEN
  RAISE NOTICE 'role generation_service is still used elsewhere in the cluster; kept';
END
$$;
