-- Every statement of the generation service. Connections run with search_path = generation.
-- CHARGING and REJECTED jobs are internal: every statement that serves a caller hides them.

-- name: insert_intent
-- Step 1 of the charge: the job, recorded before any token moves, claimed by its caller.
-- No row when the id exists.
-- The priority is the owner's plan's (plan_limit), fixed here; :plan NULL (the token service
-- did not say) takes the plan last known for the owner. The owner's row (job_owner) is made if
-- missing, so a claim always finds a counter to lock.
WITH owner AS (
  INSERT INTO job_owner (user_id) VALUES (:user_id) ON CONFLICT (user_id) DO NOTHING
)
INSERT INTO generation_job
  (id, user_id, prompt, params, tokens_cost, priority, status, request_digest, claims, claimed_until)
VALUES (:id, :user_id, :prompt, :params::jsonb, :tokens_cost,
  coalesce((SELECT priority FROM plan_limit
            WHERE plan = coalesce(:plan::text, (SELECT plan FROM job_owner WHERE user_id = :user_id))), 0),
  'CHARGING', :request_digest,
  1, now() + make_interval(secs => :claim_seconds))
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: job_any_status
SELECT * FROM generation_job WHERE id = $1;

-- name: retry_rejected
-- A refused job asked for again: its refusal left nothing visible and nothing charged,
-- so the id takes this request (the same or another), claimed, to be charged again.
WITH owner AS (
  INSERT INTO job_owner (user_id) VALUES (:user_id) ON CONFLICT (user_id) DO NOTHING
)
UPDATE generation_job SET status = 'CHARGING', user_id = :user_id, prompt = :prompt, params = :params::jsonb,
  tokens_cost = :tokens_cost, request_digest = :request_digest, error_message = NULL, pause_requested = false,
  priority = coalesce((SELECT priority FROM plan_limit
                       WHERE plan = coalesce(:plan::text, (SELECT plan FROM job_owner WHERE user_id = :user_id))), 0),
  claims = claims + 1, claimed_until = now() + make_interval(secs => :claim_seconds),
  created_at = now(), updated_at = now()
WHERE id = :id AND status = 'REJECTED'
RETURNING *;

-- name: record_owner
-- The plan a job's owner has now, as the token service said; it sets the owner's running cap.
INSERT INTO job_owner AS o (user_id, plan) VALUES ($1, $2)
ON CONFLICT (user_id) DO UPDATE SET plan = EXCLUDED.plan WHERE o.plan <> EXCLUDED.plan;

-- name: price
-- What params cost now ($2 x $3 pixels, $4 steps): the named model's price, or the default
-- model's when $1 is '', at least 1 token.
-- No row for a model not on the list.
SELECT model,
  greatest(1, base_tokens + ceil($2::numeric * $3 / 1000000 * $4 * tokens_per_megapixel_step))::bigint AS tokens_cost
FROM model_price
WHERE CASE WHEN $1 = '' THEN is_default ELSE model = $1 END;

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
-- One conditional UPDATE: the row lock and the re-check of the row under it make racing moves
-- serialize, and only one can find the job in an allowed source status. :sources, :owes_refund
-- and :delivered_ok come from rules.py. A RUNNING job moves only under its live lease (and a
-- caller who presents a lease is a worker: it moves only the job of that lease), and to
-- CANCELLED only when its user asked; a job with an asset cannot fail or be cancelled. Leaving
-- RUNNING ends the lease (its id stays, so the worker's retry of the same move is known).
-- A refund owed is claimed by the caller, who asks for it at once.
UPDATE generation_job SET
  status = :target,
  error_message = CASE WHEN :target = 'FAILED' THEN nullif(:error_message, '') ELSE error_message END,
  completed_at = CASE WHEN :target IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN now() ELSE completed_at END,
  lease_expires_at = NULL,
  refund_state = CASE WHEN :owes_refund THEN 'PENDING' ELSE refund_state END,
  claims = CASE WHEN :owes_refund THEN claims + 1 ELSE claims END,
  claimed_until = CASE WHEN :owes_refund THEN now() + make_interval(secs => :claim_seconds) ELSE claimed_until END,
  updated_at = now()
WHERE id = :id AND status = ANY(:sources::text[])
  AND (status <> 'RUNNING' OR (lease_id = :lease_id::uuid AND lease_expires_at > now()))
  AND (:lease_id::uuid IS NULL OR lease_id IS NOT DISTINCT FROM :lease_id::uuid)
  AND (status <> 'RUNNING' OR :target <> 'CANCELLED' OR cancel_requested)
  AND (:delivered_ok OR NOT has_assets)
RETURNING *;

-- name: renew_lease
-- A heartbeat: only the live lease is extended. Progress that changed bumps updated_at, so
-- watchers are sent it; a heartbeat that reports nothing new sends them nothing.
UPDATE generation_job SET
  lease_expires_at = now() + make_interval(secs => :lease_seconds),
  progress_percent = :progress_percent,
  progress_message = :progress_message,
  updated_at = CASE WHEN (progress_percent, progress_message) = (:progress_percent, :progress_message)
                    THEN updated_at ELSE now() END
WHERE id = :id AND status = 'RUNNING' AND lease_id = :lease_id AND lease_expires_at > now()
RETURNING *;

-- name: cancel_job
-- The user's cancel: a waiting job is CANCELLED at once and owed its refund (claimed by the
-- caller, who asks for it at once); a RUNNING one is marked for its worker. No row when the job
-- is another user's, finished, or already cancelled or marked.
UPDATE generation_job SET
  status = CASE WHEN status = 'RUNNING' THEN status ELSE 'CANCELLED' END,
  cancel_requested = status = 'RUNNING',
  completed_at = CASE WHEN status = 'RUNNING' THEN completed_at ELSE now() END,
  refund_state = CASE WHEN status = 'RUNNING' THEN refund_state ELSE 'PENDING' END,
  claims = CASE WHEN status = 'RUNNING' THEN claims ELSE claims + 1 END,
  claimed_until = CASE WHEN status = 'RUNNING' THEN claimed_until
                       ELSE now() + make_interval(secs => :claim_seconds) END,
  updated_at = now()
WHERE id = :id AND user_id = :user_id
  AND (status IN ('QUEUED', 'PAUSED') OR (status = 'RUNNING' AND NOT cancel_requested))
RETURNING *;

-- name: sweep_expired_leases
-- RUNNING jobs whose worker went quiet: one with an asset is SUCCEEDED (its image was
-- delivered, so it is paid); one its user asked to cancel is CANCELLED; after :max_lost_leases
-- lost leases it FAILED; else back to the queue. :owing (rules.UNDELIVERED) are owed a refund.
-- The lease id is cleared: the old worker's later calls get LEASE_LOST. The owners' counter
-- rows (which the trigger decrements) are locked first, in user order, so two sweeps of jobs
-- of the same users cannot deadlock.
-- The target is judged only from the columns `expired` read as it locked each row: the lock
-- re-reads the row as it is now (an asset attached or a cancel asked for since the statement
-- began is seen), while a second read of generation_job would see the statement's start.
WITH expired AS (
  SELECT id, user_id, has_assets, cancel_requested, lost_leases FROM generation_job
  WHERE status = 'RUNNING' AND lease_expires_at < now()
  ORDER BY lease_expires_at
  LIMIT :batch
  FOR UPDATE SKIP LOCKED
), owners AS (
  SELECT user_id FROM job_owner WHERE user_id IN (SELECT user_id FROM expired)
  ORDER BY user_id
  FOR UPDATE
), judged AS (
  SELECT id, CASE WHEN has_assets THEN 'SUCCEEDED'
                  WHEN cancel_requested THEN 'CANCELLED'
                  WHEN lost_leases + 1 >= :max_lost_leases THEN 'FAILED'
                  ELSE 'QUEUED' END AS target
  FROM expired
  WHERE (SELECT count(*) FROM owners) >= 0  -- takes the owners' locks before any job changes
), owing AS (
  SELECT id, target, target = ANY(:owing::text[]) AS owes FROM judged
)
UPDATE generation_job j SET
  lost_leases = j.lost_leases + 1,
  status = owing.target,
  error_message = CASE WHEN owing.target = 'FAILED'
                       THEN 'the worker lease expired ' || (j.lost_leases + 1) || ' times' ELSE j.error_message END,
  completed_at = CASE WHEN owing.target = 'QUEUED' THEN j.completed_at ELSE now() END,
  refund_state = CASE WHEN owing.owes THEN 'PENDING' ELSE j.refund_state END,
  claims = CASE WHEN owing.owes THEN j.claims + 1 ELSE j.claims END,
  claimed_until = CASE WHEN owing.owes THEN now() + make_interval(secs => :claim_seconds) ELSE j.claimed_until END,
  worker_id = NULL,
  lease_id = NULL,
  lease_expires_at = NULL,
  updated_at = now()
FROM owing
WHERE j.id = owing.id
RETURNING j.*;

-- name: claim_next
-- The next QUEUED job of :models (empty: any) whose owner is below the plan's running cap, in
-- the order: effective priority (priority, plus one once the job waited :aging_seconds) first,
-- oldest first within it. All on idx_generation_job_queued (priority DESC, created_at, id):
--   levels   the priorities present in the queue, one index probe each (a loose index scan);
--   segments each level split at the aging cutoff, in claim order: the aged jobs of a level
--            are served with the level above, before that level's own (younger) jobs;
--   next     the oldest claimable job of the first segment that has one: each segment is an
--            index range scan that stops at its first row, and segments after it are not read.
-- SKIP LOCKED lets workers claim side by side. The owner's counter row (job_owner, kept by a
-- trigger) is then locked and re-read, so two claims cannot both take a user's last slot; one
-- that loses that race returns found = true, job = NULL, and the store asks again.
WITH RECURSIVE levels AS (
  (SELECT priority FROM generation_job WHERE status = 'QUEUED' ORDER BY priority DESC LIMIT 1)
  UNION ALL
  SELECT (SELECT q.priority FROM generation_job q
          WHERE q.status = 'QUEUED' AND q.priority < levels.priority ORDER BY q.priority DESC LIMIT 1)
  FROM levels WHERE levels.priority IS NOT NULL
), cutoff AS (
  SELECT now() - make_interval(secs => :aging_seconds) AS at
), next AS (
  SELECT job.id, job.user_id
  FROM (
    SELECT levels.priority,
      CASE WHEN aged THEN '-infinity' ELSE cutoff.at END AS created_from,
      CASE WHEN aged THEN cutoff.at ELSE 'infinity' END AS created_before
    FROM levels, cutoff, (VALUES (true), (false)) AS a (aged)
    WHERE levels.priority IS NOT NULL
    ORDER BY levels.priority + aged::int DESC, aged DESC
  ) AS segment
  CROSS JOIN LATERAL (
    SELECT q.id, q.user_id FROM generation_job q
    WHERE q.status = 'QUEUED' AND q.priority = segment.priority
      AND q.created_at >= segment.created_from AND q.created_at < segment.created_before
      AND (cardinality(:models::text[]) = 0 OR q.params ->> 'model' = ANY(:models::text[]))
      AND NOT EXISTS (
        SELECT FROM job_owner o LEFT JOIN plan_limit p USING (plan)
        WHERE o.user_id = q.user_id AND o.running >= coalesce(p.max_running_jobs, 1))
    ORDER BY q.created_at, q.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
  ) AS job
  LIMIT 1
), slot AS (
  SELECT o.user_id FROM job_owner o JOIN next USING (user_id) LEFT JOIN plan_limit p USING (plan)
  WHERE o.running < coalesce(p.max_running_jobs, 1)
  FOR UPDATE OF o
), claimed AS (
  UPDATE generation_job j SET
    status = 'RUNNING',
    worker_id = :worker_id,
    lease_id = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => :lease_seconds),
    progress_percent = 0,
    progress_message = '',
    started_at = coalesce(j.started_at, now()),
    updated_at = now()
  FROM next JOIN slot USING (user_id)
  WHERE j.id = next.id
  RETURNING j.*
)
SELECT EXISTS (SELECT FROM next) AS found, (SELECT c::generation_job FROM claimed c) AS job;

-- name: attach_asset
-- The job (hidden statuses excluded) and the asset inserted when the job allows it: the
-- user's, SUCCEEDED, or RUNNING under the live lease :lease_id. job_user is NULL when there is
-- no such job, inserted is NULL when nothing was inserted. The job row is locked and marked
-- has_assets in this statement, so a racing move to FAILED or CANCELLED sees the mark.
WITH job AS (
  SELECT id, user_id, status, lease_id, coalesce(lease_expires_at > now(), false) AS lease_live
  FROM generation_job
  WHERE id = :job_id AND status NOT IN ('CHARGING', 'REJECTED')
  FOR UPDATE
), inserted AS (
  INSERT INTO asset_image (id, job_id, user_id, title, storage_key, mime_type, bytes_size, width, height, format)
  SELECT :id, job.id, job.user_id, :title, :storage_key, :mime_type, :bytes_size, :width, :height, :format FROM job
  WHERE job.user_id = :user_id
    AND (job.status = 'SUCCEEDED' OR (job.status = 'RUNNING' AND job.lease_id = :lease_id::uuid AND job.lease_live))
  ON CONFLICT (id) DO NOTHING
  RETURNING *
), marked AS (
  UPDATE generation_job SET has_assets = true
  WHERE id = (SELECT job_id FROM inserted) AND NOT has_assets
)
SELECT job.id AS job_id, job.user_id AS job_user, job.status AS job_status, job.lease_id AS job_lease_id,
  job.lease_live AS job_lease_live, (SELECT i::asset_image FROM inserted i) AS inserted
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
-- The asset's owner and its job's state and lease (job_user NULL: no such asset), and the
-- variant inserted when the asset is :user_id's and its job SUCCEEDED, or RUNNING under the
-- live lease :lease_id (inserted NULL otherwise, or when the kind exists). The job row is
-- share-locked, so a move or a sweep of the job waits for this insert or is seen by it.
WITH asset AS (
  SELECT a.id, a.job_id, a.user_id, j.status, j.lease_id, coalesce(j.lease_expires_at > now(), false) AS lease_live
  FROM asset_image a JOIN generation_job j ON j.id = a.job_id
  WHERE a.id = :asset_id
  FOR SHARE OF j
), inserted AS (
  INSERT INTO asset_image_variant (id, asset_id, kind, storage_key, mime_type, bytes_size, width, height, format)
  SELECT :id, asset.id, :kind, :storage_key, :mime_type, :bytes_size, :width, :height, :format FROM asset
  WHERE asset.user_id = :user_id
    AND (asset.status = 'SUCCEEDED' OR (asset.status = 'RUNNING' AND asset.lease_id = :lease_id::uuid AND asset.lease_live))
  ON CONFLICT ON CONSTRAINT asset_image_variant_asset_kind_key DO NOTHING
  RETURNING *
)
SELECT asset.job_id, asset.user_id AS job_user, asset.status AS job_status, asset.lease_id AS job_lease_id,
  asset.lease_live AS job_lease_live, (SELECT i::asset_image_variant FROM inserted i) AS inserted
FROM (SELECT) AS one LEFT JOIN asset ON true;

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
-- The seed's monthly archive (CANCELLED too), at most $2 rows per statement (idx_generation_job_completed).
WITH batch AS (
  SELECT id FROM generation_job
  WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND completed_at < now() - make_interval(days => $1)
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
  AND to_regclass('model_price') IS NOT NULL
  AND EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('generation_job') AND attname = 'has_assets' AND NOT attisdropped);

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
