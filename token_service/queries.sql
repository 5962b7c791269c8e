-- Every statement of the token service. Its login role has search_path = token (migration 20261126100001).

-- name: create_user
-- The user, their account and the plan's signup grant, in one call to the function
-- (migration 20261126100001): the grant is written by token.append_entries, the only
-- writer of the ledger and the balances. No row when the plan does not exist.
SELECT id, email, created_at, user_id, balance, plan_code, updated_at FROM create_user($1, $2, $3, $4);

-- name: user_by_id
SELECT u.id, u.email, u.created_at, a.user_id, a.balance, a.plan_code, a.updated_at
FROM app_user u JOIN token_account a ON a.user_id = u.id
WHERE u.id = $1;

-- name: user_by_email
SELECT u.id, u.email, u.created_at, a.user_id, a.balance, a.plan_code, a.updated_at
FROM app_user u JOIN token_account a ON a.user_id = u.id
WHERE u.email = $1;

-- name: account
SELECT user_id, balance, plan_code, updated_at FROM token_account WHERE user_id = $1;

-- name: append_entries
-- The ledger's rules live in the function (migration 20261127100001): entries applied in
-- order, each judged alone, the accounts locked FOR UPDATE, in one round trip; each entry
-- written names its writer (created_by).
SELECT outcome, entry_id, user_id, delta, reason, reference_id, balance_after, occurred_at, balance, created_by
FROM append_entries(:user_ids::uuid[], :deltas::bigint[], :reasons::text[], :reference_ids::text[], :max_balance::bigint,
  :created_by::text);

-- name: append_entry
-- One entry, by the lean function (migration 20261127500001): the same rules and answers.
SELECT outcome, entry_id, user_id, delta, reason, reference_id, balance_after, occurred_at, balance, created_by
FROM append_entry(:user_id, :delta, :reason, :reference_id, :max_balance, :created_by);

-- name: append_distinct_entries
-- A batch naming each account once, judged set-based (migration 20261127500001).
SELECT outcome, entry_id, user_id, delta, reason, reference_id, balance_after, occurred_at, balance, created_by
FROM append_distinct_entries(:user_ids::uuid[], :deltas::bigint[], :reasons::text[], :reference_ids::text[],
  :max_balance::bigint, :created_by);

-- name: list_entries
-- Newest first, after the keyset ($2, $3); the first page passes ('infinity', max bigint).
SELECT id AS entry_id, user_id, delta, reason, reference_id, balance_after, occurred_at, created_by, seq
FROM token_ledger
WHERE user_id = $1 AND (occurred_at, seq) < ($2::timestamptz, $3::bigint)
ORDER BY occurred_at DESC, seq DESC
LIMIT $4;

-- name: user_exists
SELECT EXISTS (SELECT FROM app_user WHERE id = $1);

-- name: count_accounts
SELECT count(*) FROM token_account WHERE $1::uuid IS NULL OR user_id = $1;

-- name: balance_mismatches
-- The seed's "verify token balance matches ledger": the balance must equal both the
-- sum of the ledger and the balance_after of the last entry.
SELECT a.user_id, a.balance AS account_balance,
       coalesce(l.ledger_sum, 0)::bigint AS ledger_sum,
       coalesce(l.last_balance_after, 0) AS last_balance_after
FROM token_account a
LEFT JOIN (
  SELECT user_id, sum(delta) AS ledger_sum,
         (array_agg(balance_after ORDER BY seq DESC))[1] AS last_balance_after
  FROM token_ledger
  WHERE $1::uuid IS NULL OR user_id = $1
  GROUP BY user_id
) l USING (user_id)
WHERE ($1::uuid IS NULL OR a.user_id = $1)
  AND (a.balance <> coalesce(l.ledger_sum, 0) OR a.balance <> coalesce(l.last_balance_after, 0))
ORDER BY a.user_id
LIMIT $2;

-- name: change_plan
-- plan_exists tells an unknown plan from an unknown user when no account row comes back.
WITH chosen_plan AS (
  SELECT code FROM plan WHERE code = $2
), updated AS (
  UPDATE token_account a SET plan_code = p.code, updated_at = now()
  FROM chosen_plan p WHERE a.user_id = $1
  RETURNING a.user_id, a.balance, a.plan_code, a.updated_at
)
SELECT EXISTS (SELECT FROM chosen_plan) AS plan_exists, u.*
FROM (SELECT) AS one LEFT JOIN updated u ON true;

-- name: lock_email
-- Serializes every OTP step of one email (request, verify) until the transaction ends.
-- The first key namespaces the lock (hashtext('auth_otp')) away from other advisory locks.
SELECT pg_advisory_xact_lock(hashtext('auth_otp'), hashtext($1));

-- name: lock_otp_requests
-- Serializes the issuing of codes (not their verification), so the limits per client and on
-- mail per minute are counted exactly under concurrent requests; held for one short transaction.
SELECT pg_advisory_xact_lock(hashtext('auth_otp_requests'));

-- name: otp_requests_since
-- A rate-limit window: how many challenges the email asked for since $2, and the oldest.
SELECT count(*) AS requests, min(created_at) AS oldest
FROM auth_otp
WHERE email = $1 AND created_at > $2;

-- name: otp_client_requests_since
-- The same for one client (the calling service and the end user's address).
SELECT count(*) AS requests, min(created_at) AS oldest
FROM auth_otp
WHERE client = $1 AND created_at > $2;

-- name: otp_mails_since
-- The same for every email: the codes mailed since $1.
SELECT count(*) AS requests, min(created_at) AS oldest
FROM auth_otp
WHERE created_at > $1;

-- name: insert_otp
INSERT INTO auth_otp (id, email, code_hash, created_at, expires_at, client)
VALUES (:id, :email, :code_hash, :created_at, :expires_at, :client);

-- name: withdraw_otp
-- A challenge whose code could not be sent: as if never asked for.
DELETE FROM auth_otp
WHERE id = $1 AND consumed_at IS NULL;

-- name: live_otps_for_update
-- Every challenge of the email whose code still works at $2, newest first.
SELECT id, code_hash, expires_at, consumed_at, invalidated_at
FROM auth_otp
WHERE email = $1 AND consumed_at IS NULL AND invalidated_at IS NULL AND expires_at > $2
ORDER BY created_at DESC, id DESC
FOR UPDATE;

-- name: otp_failures_since
-- Wrong codes the client ($2) sent for the email ($1) since $3, and the oldest.
SELECT count(*) AS requests, min(failed_at) AS oldest
FROM auth_otp_failure
WHERE email = $1 AND client = $2 AND failed_at > $3;

-- name: otp_client_failures_since
-- The same for the client over every email.
SELECT count(*) AS requests, min(failed_at) AS oldest
FROM auth_otp_failure
WHERE client = $1 AND failed_at > $2;

-- name: insert_otp_failure
INSERT INTO auth_otp_failure (email, client, failed_at)
VALUES ($1, $2, $3);

-- name: end_other_otps
-- A login ends the email's other live codes.
UPDATE auth_otp SET invalidated_at = $3
WHERE email = $1 AND id <> $2 AND consumed_at IS NULL AND invalidated_at IS NULL;

-- name: consume_otp
UPDATE auth_otp SET consumed_at = $3, user_id = $2
WHERE id = $1 AND consumed_at IS NULL AND invalidated_at IS NULL;

-- name: delete_expired_otps
-- One batch; the caller repeats until a batch comes back short.
DELETE FROM auth_otp
WHERE id IN (SELECT id FROM auth_otp WHERE expires_at < $1 LIMIT $2);

-- name: delete_old_otp_failures
-- One batch, as above: wrong codes from before $1.
DELETE FROM auth_otp_failure
WHERE id IN (SELECT id FROM auth_otp_failure WHERE failed_at < $1 LIMIT $2);

-- name: lock_otp_client
-- Serializes the verifications of one client (the end user's address), so its wrong codes over
-- every email are counted exactly under concurrent calls.
SELECT pg_advisory_xact_lock(hashtext('auth_otp_client'), hashtext($1));

-- name: refill_batch
-- The next accounts after $1 in user_id order, with their plan's allowance for the period
-- ending at $3: nothing for an account opened after the period.
SELECT a.user_id, CASE WHEN a.created_at < $3 THEN p.monthly_allowance ELSE 0 END AS monthly_allowance
FROM token_account a JOIN plan p ON p.code = a.plan_code
WHERE a.user_id > $1
ORDER BY a.user_id
LIMIT $2;

-- name: health_probe
-- Serving needs the schema and the functions the service calls, reachable by its login's
-- search_path (a rollback or a wrong role makes this false, or fail).
SELECT to_regclass('token_ledger') IS NOT NULL AND to_regclass('token_account') IS NOT NULL
  AND (SELECT count(DISTINCT proname) = 4 FROM pg_proc
       WHERE pronamespace = to_regnamespace(current_schema())
         AND proname IN ('append_entries', 'append_entry', 'append_distinct_entries', 'create_user'));
