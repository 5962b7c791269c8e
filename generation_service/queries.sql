-- Every statement of the generation service. Connections run with search_path = generation.
-- CHARGING and REJECTED jobs are internal: every statement that serves a caller hides them.

-- name: insert_intent
-- Step 1 of the charge: the job, recorded before any token moves, claimed by its caller.
-- No row when the id exists.
INSERT INTO generation_job
  (id, user_id, prompt, params, tokens_cost, status, request_digest, claims, claimed_until)
VALUES (:id, :user_id, :prompt, :params::jsonb, :tokens_cost, 'CHARGING', :request_digest,
  1, now() + make_interval(secs => :claim_seconds))
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: job_any_status
SELECT * FROM generation_job WHERE id = $1;

-- name: retry_rejected
-- A refused job asked for again: its refusal left nothing visible and nothing charged,
-- so the id takes this request (the same or another), claimed, to be charged again.
UPDATE generation_job SET status = 'CHARGING', user_id = :user_id, prompt = :prompt, params = :params::jsonb,
  tokens_cost = :tokens_cost, request_digest = :request_digest, error_message = NULL, pause_requested = false,
  claims = claims + 1, claimed_until = now() + make_interval(secs => :claim_seconds),
  created_at = now(), updated_at = now()
WHERE id = :id AND status = 'REJECTED'
RETURNING *;

-- name: claim
-- Claims the jobs of $1 that nobody holds (the claim ran out or was let go) and that still
-- have work for the token service: a charge, or a refund owed. A row another transaction
-- has locked is skipped, not waited for; the lock re-checks the conditions on the row as it
-- is now, so of racing claimers exactly one gets each job.
WITH free AS (
  SELECT id FROM generation_job
  WHERE id = ANY($1::uuid[]) AND (claimed_until IS NULL OR claimed_until < now())
    AND (status = 'CHARGING' OR refund_state = 'PENDING')
  FOR UPDATE SKIP LOCKED
)
UPDATE generation_job j SET claims = j.claims + 1, claimed_until = now() + make_interval(secs => $2)
FROM free WHERE j.id = free.id
RETURNING j.*;

-- name: stale_intents
-- For the reconciler: up to $1 intents nobody holds, oldest first (idx_generation_job_charging).
SELECT id FROM generation_job
WHERE status = 'CHARGING' AND (claimed_until IS NULL OR claimed_until < now())
ORDER BY updated_at LIMIT $1;

-- name: owed_refunds
-- Likewise for refunds owed (idx_generation_job_refund).
SELECT id FROM generation_job
WHERE refund_state = 'PENDING' AND (claimed_until IS NULL OR claimed_until < now())
ORDER BY updated_at LIMIT $1;

-- name: hold_claim
-- A debit that got no answer may still be committing on the token side for a moment
-- after the caller's deadline: the claim is kept at most $3 seconds more, then let go.
UPDATE generation_job SET claimed_until = least(claimed_until, now() + make_interval(secs => $3))
WHERE id = $1 AND claims = $2;

-- name: release_claims
-- Claims taken but not worked on (the token service went away mid-pass): free at once.
UPDATE generation_job SET claimed_until = NULL
WHERE id = ANY($1::uuid[]) AND claimed_until IS NOT NULL;

-- name: finish_charged
-- The debit exists, so the job must be visible, even if a racing attempt had given up on it;
-- PAUSED when the emergency pause caught it while it was being charged.
UPDATE generation_job SET status = CASE WHEN pause_requested THEN 'PAUSED' ELSE 'QUEUED' END,
  pause_requested = false, error_message = NULL, claimed_until = NULL, updated_at = now()
WHERE id = $1 AND status IN ('CHARGING', 'REJECTED')
RETURNING *;

-- name: reject_intent
-- A refusal settles the job only for the claim whose debit was refused ($2).
UPDATE generation_job SET status = 'REJECTED', error_message = $3, claimed_until = NULL, updated_at = now()
WHERE id = $1 AND status = 'CHARGING' AND claims = $2
RETURNING *;

-- name: charged_before
-- The reference holds a debit of an earlier request of this id (:held tokens): the job stays
-- refused for this request and owes that debit back (refund_state PENDING, still claimed).
UPDATE generation_job SET status = 'REJECTED', tokens_cost = :held, refund_state = 'PENDING',
  error_message = :error_message, updated_at = now()
WHERE id = :id AND status = 'CHARGING' AND claims = :claims
RETURNING *;

-- name: defer
-- To the back of the reconciler's line (its queues are ordered by updated_at).
UPDATE generation_job SET updated_at = now() WHERE id = $1;

-- name: refund_done
UPDATE generation_job SET refund_state = 'DONE', claimed_until = NULL
WHERE id = $1 AND refund_state = 'PENDING';

-- name: get_job
SELECT * FROM generation_job
WHERE id = $1 AND status NOT IN ('CHARGING', 'REJECTED');

-- name: list_jobs
-- Newest first after the keyset, on idx_generation_job_user_time; :statuses = the visible ones wanted.
SELECT * FROM generation_job
WHERE user_id = :user_id
  AND (created_at, id) < (:after_created_at::timestamptz, :after_id::uuid)
  AND status = ANY(:statuses::text[])
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: move_job
-- One conditional UPDATE: the row lock and the re-check of status under it make
-- racing moves serialize, and only one can find the job in an allowed source status.
-- :sources and :owes_refund come from rules.py; leaving RUNNING drops the lease.
-- A refund owed is claimed by the caller, who asks for it at once.
UPDATE generation_job SET
  status = :target,
  error_message = CASE WHEN :target = 'FAILED' THEN nullif(:error_message, '') ELSE error_message END,
  started_at = CASE WHEN :target = 'RUNNING' THEN coalesce(started_at, now()) ELSE started_at END,
  completed_at = CASE WHEN :target IN ('SUCCEEDED', 'FAILED') THEN now() ELSE completed_at END,
  lease_expires_at = NULL,
  refund_state = CASE WHEN :owes_refund THEN 'PENDING' ELSE refund_state END,
  claims = CASE WHEN :owes_refund THEN claims + 1 ELSE claims END,
  claimed_until = CASE WHEN :owes_refund THEN now() + make_interval(secs => :claim_seconds) ELSE claimed_until END,
  updated_at = now()
WHERE id = :id AND status = ANY(:sources::text[])
RETURNING *;

-- name: sweep_expired_leases
-- RUNNING jobs whose worker went quiet go back to the queue; after :max_lost_leases lost leases
-- they fail, and are owed a refund when :failure_owes_refund (rules.owes_refund_on).
WITH expired AS (
  SELECT id FROM generation_job
  WHERE status = 'RUNNING' AND lease_expires_at < now()
  ORDER BY lease_expires_at
  LIMIT :batch
  FOR UPDATE SKIP LOCKED
), judged AS (
  SELECT j.id, j.lost_leases + 1 >= :max_lost_leases AS fails
  FROM generation_job j JOIN expired USING (id)
)
UPDATE generation_job j SET
  lost_leases = j.lost_leases + 1,
  status = CASE WHEN judged.fails THEN 'FAILED' ELSE 'QUEUED' END,
  error_message = CASE WHEN judged.fails
                       THEN 'the worker lease expired ' || (j.lost_leases + 1) || ' times' ELSE j.error_message END,
  completed_at = CASE WHEN judged.fails THEN now() ELSE j.completed_at END,
  refund_state = CASE WHEN judged.fails AND :failure_owes_refund THEN 'PENDING' ELSE j.refund_state END,
  claims = CASE WHEN judged.fails AND :failure_owes_refund THEN j.claims + 1 ELSE j.claims END,
  claimed_until = CASE WHEN judged.fails AND :failure_owes_refund
                       THEN now() + make_interval(secs => :claim_seconds) ELSE j.claimed_until END,
  worker_id = NULL,
  lease_expires_at = NULL,
  updated_at = now()
FROM judged
WHERE j.id = judged.id
RETURNING j.*;

-- name: claim_next
-- The oldest QUEUED job (idx_generation_job_queued); SKIP LOCKED lets workers claim side by side.
WITH next AS (
  SELECT id FROM generation_job
  WHERE status = 'QUEUED'
  ORDER BY created_at, id
  LIMIT 1
  FOR UPDATE SKIP LOCKED
)
UPDATE generation_job j SET
  status = 'RUNNING',
  worker_id = $1,
  lease_expires_at = now() + make_interval(secs => $2),
  started_at = coalesce(j.started_at, now()),
  updated_at = now()
FROM next
WHERE j.id = next.id
RETURNING j.*;

-- name: attach_asset
-- The job (hidden statuses excluded) and the asset inserted when the job allows it
-- (:accepting = rules.ACCEPTING_ASSETS); job_user is NULL when there is no such job,
-- inserted is NULL when nothing was inserted.
WITH job AS (
  SELECT id, user_id, status FROM generation_job
  WHERE id = :job_id AND status NOT IN ('CHARGING', 'REJECTED')
  FOR SHARE
), inserted AS (
  INSERT INTO asset_image (id, job_id, user_id, title, storage_key, mime_type, bytes_size, width, height, format)
  SELECT :id, job.id, job.user_id, :title, :storage_key, :mime_type, :bytes_size, :width, :height, :format FROM job
  WHERE job.user_id = :user_id AND job.status = ANY(:accepting::text[])
  ON CONFLICT (id) DO NOTHING
  RETURNING *
)
SELECT job.user_id AS job_user, job.status AS job_status, (SELECT i::asset_image FROM inserted i) AS inserted
FROM (SELECT) AS one LEFT JOIN job ON true;

-- name: asset
-- An asset with its variants, smallest kind first (the enum's order in model.py).
SELECT a.*, ARRAY(
  SELECT v FROM asset_image_variant v WHERE v.asset_id = a.id
  ORDER BY array_position(ARRAY['THUMBNAIL', 'WEB', 'PRINT'], v.kind)
) AS variants
FROM asset_image a
WHERE a.id = $1;

-- name: add_variant
-- asset_found tells an unknown asset from an existing variant of that kind (inserted NULL).
WITH asset AS (
  SELECT id FROM asset_image WHERE id = :asset_id
), inserted AS (
  INSERT INTO asset_image_variant (id, asset_id, kind, storage_key, mime_type, bytes_size, width, height, format)
  SELECT :id, asset.id, :kind, :storage_key, :mime_type, :bytes_size, :width, :height, :format FROM asset
  ON CONFLICT ON CONSTRAINT asset_image_variant_asset_kind_key DO NOTHING
  RETURNING *
)
SELECT EXISTS (SELECT FROM asset) AS asset_found, (SELECT i::asset_image_variant FROM inserted i) AS inserted;

-- name: variant_by_kind
SELECT * FROM asset_image_variant WHERE asset_id = $1 AND kind = $2;

-- name: assets_for_user
-- Newest first after the keyset ($2, $3), on idx_asset_image_user_time, each with its variants.
SELECT a.*, ARRAY(
  SELECT v FROM asset_image_variant v WHERE v.asset_id = a.id
  ORDER BY array_position(ARRAY['THUMBNAIL', 'WEB', 'PRINT'], v.kind)
) AS variants
FROM asset_image a
WHERE a.user_id = $1 AND (a.created_at, a.id) < ($2::timestamptz, $3::uuid)
ORDER BY a.created_at DESC, a.id DESC
LIMIT $4;

-- name: archive_completed_batch
-- The seed's monthly archive, at most $2 rows per statement (idx_generation_job_completed).
WITH batch AS (
  SELECT id FROM generation_job
  WHERE status IN ('SUCCEEDED', 'FAILED') AND completed_at < now() - make_interval(days => $1)
  LIMIT $2
  FOR UPDATE SKIP LOCKED
), archived AS (
  UPDATE generation_job j SET status = 'ARCHIVED', updated_at = now()
  FROM batch WHERE j.id = batch.id
  RETURNING 1
)
SELECT count(*) AS touched, count(*) AS done FROM archived;

-- name: pause_queued_batch
-- The seed's emergency disable, at most $2 jobs per statement. It waits for rows other calls
-- hold (an emergency stop skips nothing), locking in id order so two pauses cannot deadlock.
-- A job still being charged is marked to settle PAUSED. touched counts both kinds.
WITH batch AS (
  SELECT id FROM generation_job
  WHERE created_at > $1 AND (status = 'QUEUED' OR (status = 'CHARGING' AND NOT pause_requested))
  ORDER BY id
  LIMIT $2
  FOR UPDATE
), changed AS (
  UPDATE generation_job j SET
    status = CASE WHEN j.status = 'QUEUED' THEN 'PAUSED' ELSE j.status END,
    pause_requested = j.status = 'CHARGING',
    updated_at = CASE WHEN j.status = 'QUEUED' THEN now() ELSE j.updated_at END
  FROM batch WHERE j.id = batch.id
  RETURNING j.status
)
SELECT count(*) AS touched, count(*) FILTER (WHERE status = 'PAUSED') AS done FROM changed;

-- name: resume_paused_batch
-- PAUSED back to QUEUED, and pause marks lifted from jobs being charged, created after $1
-- (NULL: all), at most $2 per statement, waiting for held rows as the pause does.
WITH batch AS (
  SELECT id FROM generation_job
  WHERE ($1::timestamptz IS NULL OR created_at > $1)
    AND (status = 'PAUSED' OR (status = 'CHARGING' AND pause_requested))
  ORDER BY id
  LIMIT $2
  FOR UPDATE
), changed AS (
  UPDATE generation_job j SET
    status = CASE WHEN j.status = 'PAUSED' THEN 'QUEUED' ELSE j.status END,
    pause_requested = false,
    updated_at = CASE WHEN j.status = 'PAUSED' THEN now() ELSE j.updated_at END
  FROM batch WHERE j.id = batch.id
  RETURNING j.status
)
SELECT count(*) AS touched, count(*) FILTER (WHERE status = 'QUEUED') AS done FROM changed;

-- name: health_probe
-- Serving needs the tables, with the newest columns the statements use, reachable by its
-- login's search_path (a rollback or a wrong role makes this false, or fail).
SELECT to_regclass('asset_image_variant') IS NOT NULL
  AND EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('generation_job') AND attname = 'claims' AND NOT attisdropped);

-- name: backlog
-- Jobs in the states a job passes through, and what the reconciler has left to do, for the
-- metrics at each scrape. Each count reads the partial index of its state, so the cost follows
-- the live jobs, not the history (finished jobs are not counted).
SELECT
  (SELECT count(*) FROM generation_job WHERE status = 'CHARGING') AS charging,
  (SELECT count(*) FROM generation_job WHERE status = 'QUEUED') AS queued,
  (SELECT count(*) FROM generation_job WHERE status = 'RUNNING') AS running,
  (SELECT count(*) FROM generation_job WHERE status = 'PAUSED') AS paused,
  (SELECT count(*) FROM generation_job WHERE refund_state = 'PENDING') AS refunds_owed,
  (SELECT count(*) FROM generation_job WHERE status = 'RUNNING' AND lease_expires_at < now()) AS leases_expired,
  -- An intent's age runs from its insert; an owed refund's from when it was last put back in line.
  (SELECT extract(epoch FROM now() - min(created_at)) FROM generation_job WHERE status = 'CHARGING')::float8
    AS oldest_intent_seconds,
  (SELECT extract(epoch FROM now() - min(updated_at)) FROM generation_job WHERE refund_state = 'PENDING')::float8
    AS oldest_refund_seconds;
