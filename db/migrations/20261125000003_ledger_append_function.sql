-- migrate:up

-- The ledger's rules, applied where the data is: one call, one round trip, for one
-- entry or a batch. Entries are applied in order and each is judged alone:
--   APPLIED       written; the account's balance is now balance_after
--   REPLAYED      the reference holds an entry with the same delta and reason: that entry, nothing written
--   REUSED        the reference holds an entry with another delta or reason: that entry, nothing written
--   INSUFFICIENT  the balance would go below 0; nothing written
--   BALANCE_LIMIT a credit would take the balance above p_max_balance (a refund: above twice
--                 that); nothing written
--   NO_ACCOUNT    no account for the user; nothing written
-- `balance` is the balance the entry was judged against.
CREATE FUNCTION token.append_entries(
  p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint
) RETURNS TABLE (
  outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text,
  balance_after bigint, occurred_at timestamptz, balance bigint
)
LANGUAGE plpgsql AS $$
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

REVOKE ALL ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint) TO token_service;

-- migrate:down

DROP FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint);
