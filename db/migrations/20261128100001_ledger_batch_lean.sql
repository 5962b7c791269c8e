-- migrate:up

-- token.append_distinct_entries (20261127500001) with the same outcomes, for less work per entry
-- (docs/benchmarks.md: most of the statement is writing the entries and their three index
-- entries, which stays). The duplicate check is one hash aggregate, not a sort; a refund's
-- debit is a subquery run for refunds only (no join, no cache of misses); the earlier entry's
-- columns are read once, not as a row taken apart; the new balance is added once.

CREATE OR REPLACE FUNCTION token.append_distinct_entries(
  p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint,
  p_created_by text
) RETURNS TABLE (
  outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text,
  balance_after bigint, occurred_at timestamptz, balance bigint, created_by text
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  IF EXISTS (SELECT FROM unnest(p_user_ids) u GROUP BY u HAVING count(*) > 1) THEN
    RAISE EXCEPTION 'append_distinct_entries: an account is named more than once' USING ERRCODE = 'data_exception';
  END IF;
  PERFORM 1 FROM token.token_account a WHERE a.user_id = ANY (p_user_ids) ORDER BY a.user_id FOR UPDATE;
  RETURN QUERY
  WITH judged AS (
    SELECT q.ord, q.user_id, q.delta, q.reason, q.reference_id, a.balance, q.new_balance, q.refunded,
      e.id AS e_id, e.delta AS e_delta, e.reason AS e_reason, e.balance_after AS e_balance_after,
      e.occurred_at AS e_occurred_at, e.created_by AS e_created_by,
      CASE
        WHEN q.wrong_sign THEN 'WRONG_SIGN'
        WHEN a.user_id IS NULL THEN 'NO_ACCOUNT'
        WHEN e.id IS NOT NULL THEN
          CASE WHEN e.delta = q.delta AND e.reason = q.reason THEN 'REPLAYED' ELSE 'REUSED' END
        WHEN q.reason = 'GENERATION_REFUND' AND (q.refunded IS NULL OR q.delta > q.refunded) THEN 'REFUND_UNMATCHED'
        WHEN q.new_balance < 0 THEN 'INSUFFICIENT'
        WHEN q.delta > 0 AND q.new_balance > CASE
          WHEN q.reason = 'GENERATION_REFUND' THEN 2 * p_max_balance::numeric ELSE p_max_balance END
          THEN 'BALANCE_LIMIT'
        ELSE 'APPLIED'
      END AS outcome
    FROM unnest(p_user_ids, p_deltas, p_reasons, p_references) WITH ORDINALITY
      AS r (user_id, delta, reason, reference_id, ord)
    CROSS JOIN LATERAL (
      SELECT (r.reason = 'GENERATION' AND r.delta > 0)
        OR (r.reason IN ('GENERATION_REFUND', 'MONTHLY_REFILL', 'PURCHASE', 'SIGNUP_BONUS') AND r.delta < 0)
        AS wrong_sign
    ) s
    LEFT JOIN token.token_account a ON a.user_id = r.user_id AND NOT s.wrong_sign
    LEFT JOIN token.token_ledger e ON e.user_id = r.user_id AND e.reference_id = r.reference_id AND NOT s.wrong_sign
    CROSS JOIN LATERAL (
      SELECT r.ord, r.user_id, r.delta, r.reason, r.reference_id, s.wrong_sign,
        a.balance::numeric + r.delta AS new_balance,
        -- The debit a refund gives back: looked up for refunds only.
        CASE WHEN r.reason = 'GENERATION_REFUND' AND NOT s.wrong_sign AND right(r.reference_id, 7) = ':refund' THEN
          (SELECT -l.delta FROM token.token_ledger l
           WHERE l.user_id = r.user_id AND l.reference_id = left(r.reference_id, -7) AND l.reason = 'GENERATION')
        END AS refunded
    ) q
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
    coalesce(w.id, j.e_id),
    j.user_id,
    coalesce(j.e_delta, j.delta),
    coalesce(j.e_reason, j.reason),
    j.reference_id,
    coalesce(w.balance_after, j.e_balance_after),
    coalesce(w.occurred_at, j.e_occurred_at),
    CASE
      WHEN j.outcome = 'REFUND_UNMATCHED' THEN j.refunded
      WHEN j.outcome IN ('WRONG_SIGN', 'NO_ACCOUNT') THEN NULL
      ELSE j.balance
    END,
    coalesce(w.created_by, j.e_created_by)
  FROM judged j LEFT JOIN written w ON w.user_id = j.user_id
  ORDER BY j.ord;
END
$$;

-- migrate:down

CREATE OR REPLACE FUNCTION token.append_distinct_entries(
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
