-- migrate:up

-- The audit trail: every ledger entry names the caller that wrote it (the name of its
-- certificate, see docs/security.md). Entries written before callers were recorded say
-- 'unknown'; from now on the writer must always be given (no default).
ALTER TABLE token.token_ledger
  ADD COLUMN created_by text NOT NULL DEFAULT 'unknown' CHECK (char_length(created_by) BETWEEN 1 AND 128);
-- The default only fills the rows already there: every writer goes through the functions below,
-- which always name the writer.
-- squawk-ignore ban-drop-default
ALTER TABLE token.token_ledger ALTER COLUMN created_by DROP DEFAULT;

-- token.append_entries and token.create_user take the writer as their last parameter; the
-- rules are those of 20261126100002. Still SECURITY DEFINER with a fixed search_path.
-- Replaced in the same transaction; a service version still calling the old signature stops
-- rather than write entries without a writer: run migrations with the matching release.
-- squawk-ignore ban-drop-function
DROP FUNCTION token.create_user(text, text, bigint);
-- squawk-ignore ban-drop-function
DROP FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint);

CREATE FUNCTION token.append_entries(
  p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint,
  p_created_by text
) RETURNS TABLE (
  outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text,
  balance_after bigint, occurred_at timestamptz, balance bigint, created_by text
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  i integer;
  current_balance bigint;
  new_balance numeric;
  entry token.token_ledger;
  debit token.token_ledger;
BEGIN
  -- Every account involved, locked in user_id order so concurrent calls cannot deadlock.
  PERFORM 1 FROM token.token_account a WHERE a.user_id = ANY (p_user_ids) ORDER BY a.user_id FOR UPDATE;
  FOR i IN 1 .. coalesce(array_length(p_user_ids, 1), 0) LOOP
    -- A reason has a sign: judged before anything is looked up, as a malformed request.
    IF (p_reasons[i] = 'GENERATION' AND p_deltas[i] > 0)
       OR (p_reasons[i] IN ('GENERATION_REFUND', 'MONTHLY_REFILL', 'PURCHASE', 'SIGNUP_BONUS') AND p_deltas[i] < 0) THEN
      RETURN QUERY SELECT 'WRONG_SIGN', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i],
        NULL::bigint, NULL::timestamptz, NULL::bigint, NULL::text;
      CONTINUE;
    END IF;
    -- Each statement from here on sees what was committed before the locks were granted,
    -- and what earlier entries of this call wrote.
    SELECT a.balance INTO current_balance FROM token.token_account a WHERE a.user_id = p_user_ids[i];
    IF NOT FOUND THEN
      RETURN QUERY SELECT 'NO_ACCOUNT', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i],
        NULL::bigint, NULL::timestamptz, NULL::bigint, NULL::text;
      CONTINUE;
    END IF;
    SELECT * INTO entry FROM token.token_ledger l
    WHERE l.user_id = p_user_ids[i] AND l.reference_id = p_references[i];
    IF FOUND THEN
      RETURN QUERY SELECT
        CASE WHEN entry.delta = p_deltas[i] AND entry.reason = p_reasons[i] THEN 'REPLAYED' ELSE 'REUSED' END,
        entry.id, entry.user_id, entry.delta, entry.reason, entry.reference_id, entry.balance_after,
        entry.occurred_at, current_balance, entry.created_by;
      CONTINUE;
    END IF;
    -- A refund gives back a debit: `<x>:refund` of a GENERATION debit `<x>` of this user, and
    -- never more than it (one refund per debit: the reference is unique per user).
    IF p_reasons[i] = 'GENERATION_REFUND' THEN
      SELECT * INTO debit FROM token.token_ledger l
      WHERE l.user_id = p_user_ids[i] AND right(p_references[i], 7) = ':refund'
        AND l.reference_id = left(p_references[i], -7) AND l.reason = 'GENERATION';
      IF NOT FOUND OR p_deltas[i] > -debit.delta THEN
        RETURN QUERY SELECT 'REFUND_UNMATCHED', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i],
          p_references[i], NULL::bigint, NULL::timestamptz, -debit.delta, NULL::text;
        CONTINUE;
      END IF;
    END IF;
    -- In numeric, so no balance, however it got there, can overflow bigint here.
    new_balance := current_balance::numeric + p_deltas[i];
    -- The cap limits credits only. A refund gives back an earlier debit, so the cap does not
    -- withhold it; twice the cap still bounds it, far below bigint.
    IF new_balance < 0 OR (p_deltas[i] > 0 AND new_balance > CASE
         WHEN p_reasons[i] = 'GENERATION_REFUND' THEN 2 * p_max_balance::numeric ELSE p_max_balance END) THEN
      RETURN QUERY SELECT CASE WHEN p_deltas[i] < 0 THEN 'INSUFFICIENT' ELSE 'BALANCE_LIMIT' END,
        NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i], NULL::bigint, NULL::timestamptz,
        current_balance, NULL::text;
      CONTINUE;
    END IF;
    INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after, created_by)
    VALUES (p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i], new_balance::bigint, p_created_by)
    RETURNING * INTO entry;
    UPDATE token.token_account a SET balance = entry.balance_after, updated_at = now()
    WHERE a.user_id = p_user_ids[i];
    RETURN QUERY SELECT 'APPLIED', entry.id, entry.user_id, entry.delta, entry.reason, entry.reference_id,
      entry.balance_after, entry.occurred_at, current_balance, entry.created_by;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint, text) TO token_service;

CREATE FUNCTION token.create_user(p_email text, p_plan text, p_max_balance bigint, p_created_by text)
RETURNS TABLE (
  id uuid, email text, created_at timestamptz, user_id uuid, balance bigint, plan_code text, updated_at timestamptz
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  chosen token.plan;
  new_id uuid;
BEGIN
  SELECT * INTO chosen FROM token.plan p WHERE p.code = p_plan;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  INSERT INTO token.app_user (email) VALUES (p_email) RETURNING token.app_user.id INTO new_id;
  INSERT INTO token.token_account (user_id, plan_code) VALUES (new_id, chosen.code);
  IF chosen.signup_grant > 0 THEN
    PERFORM token.append_entries(ARRAY[new_id], ARRAY[chosen.signup_grant], ARRAY['SIGNUP_BONUS'],
      ARRAY['signup'], p_max_balance, p_created_by);
  END IF;
  RETURN QUERY SELECT u.id, u.email, u.created_at, a.user_id, a.balance, a.plan_code, a.updated_at
  FROM token.app_user u JOIN token.token_account a ON a.user_id = u.id WHERE u.id = new_id;
END
$$;

REVOKE ALL ON FUNCTION token.create_user(text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.create_user(text, text, bigint, text) TO token_service;


-- migrate:down

DROP FUNCTION token.create_user(text, text, bigint, text);
DROP FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint, text);

CREATE FUNCTION token.append_entries(
  p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint
) RETURNS TABLE (
  outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text,
  balance_after bigint, occurred_at timestamptz, balance bigint
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  i integer;
  current_balance bigint;
  new_balance numeric;
  entry token.token_ledger;
  debit token.token_ledger;
BEGIN
  -- Every account involved, locked in user_id order so concurrent calls cannot deadlock.
  PERFORM 1 FROM token.token_account a WHERE a.user_id = ANY (p_user_ids) ORDER BY a.user_id FOR UPDATE;
  FOR i IN 1 .. coalesce(array_length(p_user_ids, 1), 0) LOOP
    -- A reason has a sign: judged before anything is looked up, as a malformed request.
    IF (p_reasons[i] = 'GENERATION' AND p_deltas[i] > 0)
       OR (p_reasons[i] IN ('GENERATION_REFUND', 'MONTHLY_REFILL', 'PURCHASE', 'SIGNUP_BONUS') AND p_deltas[i] < 0) THEN
      RETURN QUERY SELECT 'WRONG_SIGN', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i],
        NULL::bigint, NULL::timestamptz, NULL::bigint;
      CONTINUE;
    END IF;
    -- Each statement from here on sees what was committed before the locks were granted,
    -- and what earlier entries of this call wrote.
    SELECT a.balance INTO current_balance FROM token.token_account a WHERE a.user_id = p_user_ids[i];
    IF NOT FOUND THEN
      RETURN QUERY SELECT 'NO_ACCOUNT', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i],
        NULL::bigint, NULL::timestamptz, NULL::bigint;
      CONTINUE;
    END IF;
    SELECT * INTO entry FROM token.token_ledger l
    WHERE l.user_id = p_user_ids[i] AND l.reference_id = p_references[i];
    IF FOUND THEN
      RETURN QUERY SELECT
        CASE WHEN entry.delta = p_deltas[i] AND entry.reason = p_reasons[i] THEN 'REPLAYED' ELSE 'REUSED' END,
        entry.id, entry.user_id, entry.delta, entry.reason, entry.reference_id, entry.balance_after,
        entry.occurred_at, current_balance;
      CONTINUE;
    END IF;
    -- A refund gives back a debit: `<x>:refund` of a GENERATION debit `<x>` of this user, and
    -- never more than it (one refund per debit: the reference is unique per user).
    IF p_reasons[i] = 'GENERATION_REFUND' THEN
      SELECT * INTO debit FROM token.token_ledger l
      WHERE l.user_id = p_user_ids[i] AND right(p_references[i], 7) = ':refund'
        AND l.reference_id = left(p_references[i], -7) AND l.reason = 'GENERATION';
      IF NOT FOUND OR p_deltas[i] > -debit.delta THEN
        RETURN QUERY SELECT 'REFUND_UNMATCHED', NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i],
          p_references[i], NULL::bigint, NULL::timestamptz, -debit.delta;
        CONTINUE;
      END IF;
    END IF;
    -- In numeric, so no balance, however it got there, can overflow bigint here.
    new_balance := current_balance::numeric + p_deltas[i];
    -- The cap limits credits only. A refund gives back an earlier debit, so the cap does not
    -- withhold it; twice the cap still bounds it, far below bigint.
    IF new_balance < 0 OR (p_deltas[i] > 0 AND new_balance > CASE
         WHEN p_reasons[i] = 'GENERATION_REFUND' THEN 2 * p_max_balance::numeric ELSE p_max_balance END) THEN
      RETURN QUERY SELECT CASE WHEN p_deltas[i] < 0 THEN 'INSUFFICIENT' ELSE 'BALANCE_LIMIT' END,
        NULL::uuid, p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i], NULL::bigint, NULL::timestamptz,
        current_balance;
      CONTINUE;
    END IF;
    INSERT INTO token.token_ledger (user_id, delta, reason, reference_id, balance_after)
    VALUES (p_user_ids[i], p_deltas[i], p_reasons[i], p_references[i], new_balance::bigint)
    RETURNING * INTO entry;
    UPDATE token.token_account a SET balance = entry.balance_after, updated_at = now()
    WHERE a.user_id = p_user_ids[i];
    RETURN QUERY SELECT 'APPLIED', entry.id, entry.user_id, entry.delta, entry.reason, entry.reference_id,
      entry.balance_after, entry.occurred_at, current_balance;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint) TO token_service;

CREATE FUNCTION token.create_user(p_email text, p_plan text, p_max_balance bigint)
RETURNS TABLE (
  id uuid, email text, created_at timestamptz, user_id uuid, balance bigint, plan_code text, updated_at timestamptz
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  chosen token.plan;
  new_id uuid;
BEGIN
  SELECT * INTO chosen FROM token.plan p WHERE p.code = p_plan;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  INSERT INTO token.app_user (email) VALUES (p_email) RETURNING token.app_user.id INTO new_id;
  INSERT INTO token.token_account (user_id, plan_code) VALUES (new_id, chosen.code);
  IF chosen.signup_grant > 0 THEN
    PERFORM token.append_entries(ARRAY[new_id], ARRAY[chosen.signup_grant], ARRAY['SIGNUP_BONUS'],
      ARRAY['signup'], p_max_balance);
  END IF;
  RETURN QUERY SELECT u.id, u.email, u.created_at, a.user_id, a.balance, a.plan_code, a.updated_at
  FROM token.app_user u JOIN token.token_account a ON a.user_id = u.id WHERE u.id = new_id;
END
$$;

REVOKE ALL ON FUNCTION token.create_user(text, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.create_user(text, text, bigint) TO token_service;

ALTER TABLE token.token_ledger DROP COLUMN created_by;
