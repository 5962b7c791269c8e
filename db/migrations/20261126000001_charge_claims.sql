-- migrate:up

-- A claim on a job's charge or refund: whoever holds it (a create call, or one reconciler)
-- is the only one asking the token service about that job until claimed_until. `claims`
-- counts the claims taken, and is the fencing token of the current one: a refusal settles
-- the job only for the claim that asked, never after another attempt took over.
ALTER TABLE generation.generation_job
  ADD COLUMN claimed_until timestamptz,
  ADD COLUMN claims integer NOT NULL DEFAULT 0 CHECK (claims >= 0);

-- migrate:down

ALTER TABLE generation.generation_job DROP COLUMN claimed_until, DROP COLUMN claims;
