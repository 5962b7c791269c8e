-- migrate:up

-- The ledger's rules gain two (the other outcomes are as in 20261125000003):
--   WRONG_SIGN        the delta's sign does not fit the reason: GENERATION is a debit;
--                     GENERATION_REFUND, MONTHLY_REFILL, PURCHASE and SIGNUP_BONUS are credits;
--                     ADJUSTMENT may be either. Nothing written
--   REFUND_UNMATCHED  a GENERATION_REFUND whose reference is not `<x>:refund` for a GENERATION
--                     debit `<x>` of the same user, or that gives back more than that debit;
--                     `balance` is then the debit's amount (NULL without one). Nothing written
-- Still SECURITY DEFINER with a fixed search_path (20261126100001).
CREATE OR REPLACE FUNCTION token.append_entries(
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


-- migrate:down

CREATE OR REPLACE FUNCTION token.append_entries(
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
BEGIN
  -- Every account involved, locked in user_id order so concurrent calls cannot deadlock.
  PERFORM 1 FROM token.token_account a WHERE a.user_id = ANY (p_user_ids) ORDER BY a.user_id FOR UPDATE;
  FOR i IN 1 .. coalesce(array_length(p_user_ids, 1), 0) LOOP
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

