-- migrate:up

-- Workers hold a RUNNING job under a fenced lease: lease_id is the fencing token a claim hands
-- out; moving, renewing or attaching to a RUNNING job needs the current one. Users may cancel.
-- The status check is replaced by a wider one (CANCELLED added), and the whole migration runs in
-- one transaction: it holds generation_job's lock while it checks the rows and rebuilds the two
-- partial indexes below, which is brief for the live jobs those cover; run it at a quiet moment
-- (docs/operations.md).
-- squawk-ignore ban-drop-constraint
ALTER TABLE generation.generation_job DROP CONSTRAINT generation_job_status_check;
ALTER TABLE generation.generation_job
  -- squawk-ignore constraint-missing-not-valid
  ADD CONSTRAINT generation_job_status_check CHECK (status IN (
    'CHARGING', 'REJECTED', 'QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'ARCHIVED', 'PAUSED', 'CANCELLED')),
  ADD COLUMN lease_id uuid,
  -- Fixed at creation from the owner's plan (plan_limit); higher is served first.
  ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 100),
  ADD COLUMN progress_percent smallint NOT NULL DEFAULT 0 CHECK (progress_percent BETWEEN 0 AND 100),
  ADD COLUMN progress_message text NOT NULL DEFAULT '' CHECK (char_length(progress_message) <= 500),
  ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false,
  -- Set in the statement that attaches an asset, so a concurrent move to FAILED or CANCELLED,
  -- which waits for that row, sees it (delivered means paid).
  ADD COLUMN has_assets boolean NOT NULL DEFAULT false;

UPDATE generation.generation_job j SET has_assets = true
WHERE EXISTS (SELECT FROM generation.asset_image a WHERE a.job_id = j.id);

-- Jobs moved to RUNNING by hand had no lease, and jobs claimed before leases were fenced have
-- no lease_id their worker could present: their leases run out now, so the sweep takes them.
UPDATE generation.generation_job
SET lease_expires_at = now()
WHERE status = 'RUNNING' AND lease_id IS NULL;

-- A RUNNING job always has a lease that runs out, so no job can be stuck RUNNING.
ALTER TABLE generation.generation_job
  -- squawk-ignore constraint-missing-not-valid
  ADD CONSTRAINT generation_job_running_leased CHECK (status <> 'RUNNING' OR lease_expires_at IS NOT NULL);

-- Claim order: highest priority, then oldest (generation_service/queries.sql, claim_next).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX generation.idx_generation_job_queued;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX idx_generation_job_queued ON generation.generation_job (priority DESC, created_at, id)
  WHERE status = 'QUEUED';
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX generation.idx_generation_job_completed;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX idx_generation_job_completed ON generation.generation_job (completed_at)
  WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED');

-- What each plan gets from the queue. Plans are the token service's: the generation service
-- learns a user's plan code from GetTokenBalance when a job is created, and reads its terms
-- here. A plan with no row here gets priority 0 and one running job.
CREATE TABLE generation.plan_limit (
  plan             text PRIMARY KEY CHECK (plan ~ '^[a-z][a-z0-9_]{0,31}$'),
  priority         smallint NOT NULL CHECK (priority BETWEEN 0 AND 100),
  max_running_jobs integer NOT NULL CHECK (max_running_jobs >= 1)
);

INSERT INTO generation.plan_limit (plan, priority, max_running_jobs) VALUES
  ('free', 0, 2),
  ('pro', 1, 10);

-- Each user with jobs: the plan last learned, and how many of the user's jobs are RUNNING,
-- kept by the trigger below in the transaction that moves the job.
CREATE TABLE generation.job_owner (
  user_id uuid PRIMARY KEY,
  plan    text NOT NULL DEFAULT 'free',
  running integer NOT NULL DEFAULT 0 CHECK (running >= 0)
);

INSERT INTO generation.job_owner (user_id, running)
SELECT user_id, count(*) FILTER (WHERE status = 'RUNNING') FROM generation.generation_job GROUP BY user_id;

CREATE FUNCTION generation.count_running() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status = 'RUNNING' AND OLD.status <> 'RUNNING' THEN
    INSERT INTO generation.job_owner AS o (user_id, running) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET running = o.running + 1;
  ELSIF OLD.status = 'RUNNING' AND NEW.status <> 'RUNNING' THEN
    UPDATE generation.job_owner SET running = running - 1 WHERE user_id = OLD.user_id;
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER generation_job_count_running
  AFTER UPDATE OF status ON generation.generation_job
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION generation.count_running();

-- The price list: a job costs base_tokens + ceil(megapixels * steps * tokens_per_megapixel_step),
-- and at least 1.
-- Edited with SQL; the default model prices a request that names none.
CREATE TABLE generation.model_price (
  model                     text PRIMARY KEY CHECK (char_length(model) BETWEEN 1 AND 200),
  base_tokens               bigint NOT NULL CHECK (base_tokens BETWEEN 0 AND 1000000),
  tokens_per_megapixel_step numeric NOT NULL CHECK (tokens_per_megapixel_step BETWEEN 0 AND 1000000),
  is_default                boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX model_price_one_default ON generation.model_price (is_default) WHERE is_default;

INSERT INTO generation.model_price (model, base_tokens, tokens_per_megapixel_step, is_default) VALUES
  ('sdxl', 3, 0.22, true),
  ('sd15', 1, 0.1, false),
  ('blumpo-diffusion-v1', 2, 0.25, false);

GRANT SELECT, INSERT, UPDATE ON generation.job_owner TO generation_service;
GRANT SELECT ON generation.plan_limit, generation.model_price TO generation_service;

-- migrate:down

DROP TABLE generation.model_price;
DROP TRIGGER generation_job_count_running ON generation.generation_job;
DROP FUNCTION generation.count_running();
DROP TABLE generation.job_owner;
DROP TABLE generation.plan_limit;
DROP INDEX generation.idx_generation_job_completed;
CREATE INDEX idx_generation_job_completed ON generation.generation_job (completed_at)
  WHERE status IN ('SUCCEEDED', 'FAILED');
DROP INDEX generation.idx_generation_job_queued;
CREATE INDEX idx_generation_job_queued ON generation.generation_job (created_at, id) WHERE status = 'QUEUED';
UPDATE generation.generation_job SET status = 'FAILED' WHERE status = 'CANCELLED';
ALTER TABLE generation.generation_job
  DROP CONSTRAINT generation_job_running_leased,
  DROP CONSTRAINT generation_job_status_check,
  DROP COLUMN lease_id, DROP COLUMN priority, DROP COLUMN progress_percent, DROP COLUMN progress_message,
  DROP COLUMN cancel_requested, DROP COLUMN has_assets;
ALTER TABLE generation.generation_job
  ADD CONSTRAINT generation_job_status_check CHECK (status IN (
    'CHARGING', 'REJECTED', 'QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'ARCHIVED', 'PAUSED'));
