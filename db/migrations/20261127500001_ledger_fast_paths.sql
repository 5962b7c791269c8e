-- migrate:up

-- Two fast paths beside token.append_entries (whose per-entry loop stays the path for batches
-- that name an account more than once). Both answer as it does, row for row, with the same
-- outcomes (20261127100001): same rules, same order of judgement, and each entry written names
-- its writer (p_created_by, last, as there; created_by is answered as the entry's writer).

-- One entry. The account is locked FOR UPDATE and read in one statement; the entry is written
-- with ON CONFLICT DO NOTHING on (user_id, reference_id), and the balance updated by the same
-- statement, so an entry that applies takes two statements. The reference is looked up only
-- when the entry does not apply (an earlier entry under it answers before any refusal).
CREATE FUNCTION token.append_entry(
  p_user_id uuid, p_delta bigint, p_reason text, p_reference text, p_max_balance bigint, p_created_by text,
  OUT outcome text, OUT entry_id uuid, OUT user_id uuid, OUT delta bigint, OUT reason text,
  OUT reference_id text, OUT balance_after bigint, OUT occurred_at timestamptz, OUT balance bigint,
  OUT created_by text
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  new_balance numeric;
  refunded bigint;
  refused text;
  earlier token.token_ledger;
BEGIN
  user_id := p_user_id;
  delta := p_delta;
  reason := p_reason;
  reference_id := p_reference;
  IF (p_reason = 'GENERATION' AND p_delta > 0)
     OR (p_reason IN ('GENERATION_REFUND', 'MONTHLY_REFILL', 'PURCHASE', 'SIGNUP_BONUS') AND p_delta < 0) THEN
    outcome := 'WRONG_SIGN';
    RETURN;
  END IF;
  SELECT a.balance INTO balance FROM token.token_account a WHERE a.user_id = p_user_id FOR UPDATE;
  IF NOT FOUND THEN
    outcome := 'NO_ACCOUNT';
    RETURN;
  END IF;
  IF p_reason = 'GENERATION_REFUND' THEN
    SELECT -l.delta INTO refunded FROM token.token_ledger l
    WHERE l.user_id = p_user_id AND right(p_reference, 7) = ':refund'
      AND l.reference_id = left(p_reference, -7) AND l.reason = 'GENERATION';
    IF NOT FOUND OR p_delta > refunded THEN
      refused := 'REFUND_UNMATCHED';
    END IF;
  END IF;
  new_balance := balance::numeric + p_delta;
  IF refused IS NULL AND (new_balance < 0 OR (p_delta > 0 AND new_balance > CASE
       WHEN p_reason = 'GENERATION_REFUND' THEN 2 * p_max_balance::numeric ELSE p_max_balance END)) THEN
    refused := CASE WHEN p_delta < 0 THEN 'INSUFFICIENT' ELSE 'BALANCE_LIMIT' END;
  END IF;
  IF refused IS NULL THEN
    WITH written AS (
      INSERT INTO token.token_ledger AS l (user_id, delta, reason, reference_id, balance_after, created_by)
      VALUES (p_user_id, p_delta, p_reason, p_reference, new_balance::bigint, p_created_by)
      ON CONFLICT (user_id, reference_id) DO NOTHING
      RETURNING l.id, l.balance_after, l.occurred_at, l.created_by
    ), updated AS (
      UPDATE token.token_account a SET balance = w.balance_after, updated_at = now()
      FROM written w WHERE a.user_id = p_user_id
    )
    SELECT w.id, w.balance_after, w.occurred_at, w.created_by INTO entry_id, balance_after, occurred_at, created_by
    FROM written w;
    IF FOUND THEN
      outcome := 'APPLIED';
      RETURN;
    END IF;
  END IF;
  SELECT * INTO earlier FROM token.token_ledger l WHERE l.user_id = p_user_id AND l.reference_id = p_reference;
  IF FOUND THEN
    outcome := CASE WHEN earlier.delta = p_delta AND earlier.reason = p_reason THEN 'REPLAYED' ELSE 'REUSED' END;
    entry_id := earlier.id;
    delta := earlier.delta;
    reason := earlier.reason;
    balance_after := earlier.balance_after;
    occurred_at := earlier.occurred_at;
    created_by := earlier.created_by;
    RETURN;
  END IF;
  outcome := refused;
  IF refused = 'REFUND_UNMATCHED' THEN
    balance := refunded;
  END IF;
END
$$;

-- A batch naming each account at most once (an error otherwise), judged set-based: with no
-- account twice, no entry of the batch depends on another, so each is judged against what was
-- committed when the locks were granted. The lock comes first, in its own statement, so that
-- the statement judging the entries sees everything committed before it (as the loop does).
CREATE FUNCTION token.append_distinct_entries(
  p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint,
  p_created_by text
) RETURNS TABLE (
  outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text,
  balance_after bigint, occurred_at timestamptz, balance bigint, created_by text
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  IF (SELECT count(DISTINCT u) FROM unnest(p_user_ids) u) <> cardinality(p_user_ids) THEN
    RAISE EXCEPTION 'append_distinct_entries: an account is named more than once' USING ERRCODE = 'data_exception';
  END IF;
  PERFORM 1 FROM token.token_account a WHERE a.user_id = ANY (p_user_ids) ORDER BY a.user_id FOR UPDATE;
  RETURN QUERY
  WITH requested AS (
    SELECT r.*,
      (r.reason = 'GENERATION' AND r.delta > 0)
        OR (r.reason IN ('GENERATION_REFUND', 'MONTHLY_REFILL', 'PURCHASE', 'SIGNUP_BONUS') AND r.delta < 0)
        AS wrong_sign
    FROM unnest(p_user_ids, p_deltas, p_reasons, p_references) WITH ORDINALITY
      AS r (user_id, delta, reason, reference_id, ord)
  ), judged AS (
    SELECT q.ord, q.user_id, q.delta, q.reason, q.reference_id, a.balance, e AS earlier, d.refunded,
      q.wrong_sign, a.balance::numeric + q.delta AS new_balance,
      CASE
        WHEN q.wrong_sign THEN 'WRONG_SIGN'
        WHEN a.user_id IS NULL THEN 'NO_ACCOUNT'
        WHEN e.id IS NOT NULL THEN
          CASE WHEN e.delta = q.delta AND e.reason = q.reason THEN 'REPLAYED' ELSE 'REUSED' END
        WHEN q.reason = 'GENERATION_REFUND' AND (d.refunded IS NULL OR q.delta > d.refunded) THEN 'REFUND_UNMATCHED'
        WHEN a.balance::numeric + q.delta < 0 THEN 'INSUFFICIENT'
        WHEN q.delta > 0 AND a.balance::numeric + q.delta > CASE
          WHEN q.reason = 'GENERATION_REFUND' THEN 2 * p_max_balance::numeric ELSE p_max_balance END
          THEN 'BALANCE_LIMIT'
        ELSE 'APPLIED'
      END AS outcome
    FROM requested q
    LEFT JOIN token.token_account a ON a.user_id = q.user_id AND NOT q.wrong_sign
    LEFT JOIN token.token_ledger e
      ON e.user_id = q.user_id AND e.reference_id = q.reference_id AND NOT q.wrong_sign
    -- OFFSET 0 keeps the refund test inside, so the debit is looked up for refunds only.
    LEFT JOIN LATERAL (
      SELECT -l.delta AS refunded FROM token.token_ledger l
      WHERE q.reason = 'GENERATION_REFUND' AND l.user_id = q.user_id AND right(q.reference_id, 7) = ':refund'
        AND l.reference_id = left(q.reference_id, -7) AND l.reason = 'GENERATION'
      OFFSET 0
    ) d ON true
  ), written AS (
    INSERT INTO token.token_ledger AS l (user_id, delta, reason, reference_id, balance_after, created_by)
    SELECT j.user_id, j.delta, j.reason, j.reference_id, j.new_balance::bigint, p_created_by
    FROM judged j WHERE j.outcome = 'APPLIED' ORDER BY j.ord
    RETURNING l.id, l.user_id, l.balance_after, l.occurred_at, l.created_by
  ), updated AS (
    UPDATE token.token_account a SET balance = w.balance_after, updated_at = now()
    FROM written w WHERE a.user_id = w.user_id
  )
  SELECT j.outcome,
    coalesce(w.id, (j.earlier).id),
    j.user_id,
    coalesce((j.earlier).delta, j.delta),
    coalesce((j.earlier).reason, j.reason),
    j.reference_id,
    coalesce(w.balance_after, (j.earlier).balance_after),
    coalesce(w.occurred_at, (j.earlier).occurred_at),
    CASE
      WHEN j.outcome = 'REFUND_UNMATCHED' THEN j.refunded
      WHEN j.outcome IN ('WRONG_SIGN', 'NO_ACCOUNT') THEN NULL
      ELSE j.balance
    END,
    coalesce(w.created_by, (j.earlier).created_by)
  FROM judged j LEFT JOIN written w ON w.user_id = j.user_id
  ORDER BY j.ord;
END
$$;

REVOKE ALL ON FUNCTION token.append_entry(uuid, bigint, text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.append_entry(uuid, bigint, text, text, bigint, text) TO token_service;
REVOKE ALL ON FUNCTION token.append_distinct_entries(uuid[], bigint[], text[], text[], bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.append_distinct_entries(uuid[], bigint[], text[], text[], bigint, text)
  TO token_service;

-- migrate:down

DROP FUNCTION token.append_distinct_entries(uuid[], bigint[], text[], text[], bigint, text);
DROP FUNCTION token.append_entry(uuid, bigint, text, text, bigint, text);
