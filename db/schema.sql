\restrict dbmate

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: generation; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA generation;


--
-- Name: token; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA token;


--
-- Name: count_running(); Type: FUNCTION; Schema: generation; Owner: -
--

CREATE FUNCTION generation.count_running() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: notify_job_change(); Type: FUNCTION; Schema: generation; Owner: -
--

CREATE FUNCTION generation.notify_job_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
  PERFORM pg_notify('generation_job', NEW.id::text);
  RETURN NULL;
END
$$;


--
-- Name: append_distinct_entries(uuid[], bigint[], text[], text[], bigint, text); Type: FUNCTION; Schema: token; Owner: -
--

CREATE FUNCTION token.append_distinct_entries(p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint, p_created_by text) RETURNS TABLE(outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text, balance_after bigint, occurred_at timestamp with time zone, balance bigint, created_by text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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


--
-- Name: append_entries(uuid[], bigint[], text[], text[], bigint, text); Type: FUNCTION; Schema: token; Owner: -
--

CREATE FUNCTION token.append_entries(p_user_ids uuid[], p_deltas bigint[], p_reasons text[], p_references text[], p_max_balance bigint, p_created_by text) RETURNS TABLE(outcome text, entry_id uuid, user_id uuid, delta bigint, reason text, reference_id text, balance_after bigint, occurred_at timestamp with time zone, balance bigint, created_by text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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


--
-- Name: append_entry(uuid, bigint, text, text, bigint, text); Type: FUNCTION; Schema: token; Owner: -
--

CREATE FUNCTION token.append_entry(p_user_id uuid, p_delta bigint, p_reason text, p_reference text, p_max_balance bigint, p_created_by text, OUT outcome text, OUT entry_id uuid, OUT user_id uuid, OUT delta bigint, OUT reason text, OUT reference_id text, OUT balance_after bigint, OUT occurred_at timestamp with time zone, OUT balance bigint, OUT created_by text) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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


--
-- Name: create_user(text, text, bigint, text); Type: FUNCTION; Schema: token; Owner: -
--

CREATE FUNCTION token.create_user(p_email text, p_plan text, p_max_balance bigint, p_created_by text) RETURNS TABLE(id uuid, email text, created_at timestamp with time zone, user_id uuid, balance bigint, plan_code text, updated_at timestamp with time zone)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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


--
-- Name: reject_ledger_change(); Type: FUNCTION; Schema: token; Owner: -
--

CREATE FUNCTION token.reject_ledger_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
  RAISE EXCEPTION 'token_ledger is append-only: % is not allowed', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: asset_image; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.asset_image (
    id uuid NOT NULL,
    job_id uuid NOT NULL,
    user_id uuid NOT NULL,
    title text NOT NULL,
    storage_key text NOT NULL,
    mime_type text NOT NULL,
    bytes_size bigint NOT NULL,
    width integer NOT NULL,
    height integer NOT NULL,
    format text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT asset_image_bytes_size_check CHECK ((bytes_size > 0)),
    CONSTRAINT asset_image_format_mime CHECK ((((((format = 'WEBP'::text) AND (mime_type = 'image/webp'::text)) OR ((format = 'PNG'::text) AND (mime_type = 'image/png'::text))) OR ((format = 'JPEG'::text) AND (mime_type = 'image/jpeg'::text))) OR ((format = 'AVIF'::text) AND (mime_type = 'image/avif'::text)))),
    CONSTRAINT asset_image_height_check CHECK (((height >= 1) AND (height <= 16384))),
    CONSTRAINT asset_image_storage_key_check CHECK (((char_length(storage_key) >= 1) AND (char_length(storage_key) <= 1024))),
    CONSTRAINT asset_image_title_check CHECK ((char_length(title) <= 200)),
    CONSTRAINT asset_image_width_check CHECK (((width >= 1) AND (width <= 16384)))
);


--
-- Name: asset_image_variant; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.asset_image_variant (
    id uuid NOT NULL,
    asset_id uuid NOT NULL,
    kind text NOT NULL,
    storage_key text NOT NULL,
    mime_type text NOT NULL,
    bytes_size bigint NOT NULL,
    width integer NOT NULL,
    height integer NOT NULL,
    format text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT asset_image_variant_bytes_size_check CHECK ((bytes_size > 0)),
    CONSTRAINT asset_image_variant_format_mime CHECK ((((((format = 'WEBP'::text) AND (mime_type = 'image/webp'::text)) OR ((format = 'PNG'::text) AND (mime_type = 'image/png'::text))) OR ((format = 'JPEG'::text) AND (mime_type = 'image/jpeg'::text))) OR ((format = 'AVIF'::text) AND (mime_type = 'image/avif'::text)))),
    CONSTRAINT asset_image_variant_height_check CHECK (((height >= 1) AND (height <= 16384))),
    CONSTRAINT asset_image_variant_kind_check CHECK ((kind = ANY (ARRAY['THUMBNAIL'::text, 'WEB'::text, 'PRINT'::text]))),
    CONSTRAINT asset_image_variant_storage_key_check CHECK (((char_length(storage_key) >= 1) AND (char_length(storage_key) <= 1024))),
    CONSTRAINT asset_image_variant_width_check CHECK (((width >= 1) AND (width <= 16384)))
);


--
-- Name: generation_job; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.generation_job (
    id uuid NOT NULL,
    user_id uuid NOT NULL,
    prompt text NOT NULL,
    params jsonb NOT NULL,
    tokens_cost bigint NOT NULL,
    status text NOT NULL,
    request_digest bytea NOT NULL,
    error_message text,
    worker_id text,
    lease_expires_at timestamp with time zone,
    lost_leases integer DEFAULT 0 NOT NULL,
    refund_state text DEFAULT 'NONE'::text NOT NULL,
    pause_requested boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    claimed_until timestamp with time zone,
    claims integer DEFAULT 0 NOT NULL,
    lease_id uuid,
    priority smallint DEFAULT 0 NOT NULL,
    progress_percent smallint DEFAULT 0 NOT NULL,
    progress_message text DEFAULT ''::text NOT NULL,
    cancel_requested boolean DEFAULT false NOT NULL,
    has_assets boolean DEFAULT false NOT NULL,
    CONSTRAINT generation_job_claims_check CHECK ((claims >= 0)),
    CONSTRAINT generation_job_error_message_check CHECK ((char_length(error_message) <= 2000)),
    CONSTRAINT generation_job_lost_leases_check CHECK ((lost_leases >= 0)),
    CONSTRAINT generation_job_priority_check CHECK (((priority >= 0) AND (priority <= 100))),
    CONSTRAINT generation_job_progress_message_check CHECK ((char_length(progress_message) <= 500)),
    CONSTRAINT generation_job_progress_percent_check CHECK (((progress_percent >= 0) AND (progress_percent <= 100))),
    CONSTRAINT generation_job_prompt_check CHECK (((char_length(prompt) >= 1) AND (char_length(prompt) <= 4000))),
    CONSTRAINT generation_job_refund_state_check CHECK ((refund_state = ANY (ARRAY['NONE'::text, 'PENDING'::text, 'DONE'::text]))),
    CONSTRAINT generation_job_running_leased CHECK (((status <> 'RUNNING'::text) OR (lease_expires_at IS NOT NULL))),
    CONSTRAINT generation_job_status_check CHECK ((status = ANY (ARRAY['CHARGING'::text, 'REJECTED'::text, 'QUEUED'::text, 'RUNNING'::text, 'SUCCEEDED'::text, 'FAILED'::text, 'ARCHIVED'::text, 'PAUSED'::text, 'CANCELLED'::text]))),
    CONSTRAINT generation_job_tokens_cost_check CHECK ((tokens_cost >= 1))
);


--
-- Name: job_owner; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.job_owner (
    user_id uuid NOT NULL,
    plan text DEFAULT 'free'::text NOT NULL,
    running integer DEFAULT 0 NOT NULL,
    CONSTRAINT job_owner_running_check CHECK ((running >= 0))
);


--
-- Name: model_price; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.model_price (
    model text NOT NULL,
    base_tokens bigint NOT NULL,
    tokens_per_megapixel_step numeric NOT NULL,
    is_default boolean DEFAULT false NOT NULL,
    CONSTRAINT model_price_base_tokens_check CHECK (((base_tokens >= 0) AND (base_tokens <= 1000000))),
    CONSTRAINT model_price_model_check CHECK (((char_length(model) >= 1) AND (char_length(model) <= 200))),
    CONSTRAINT model_price_tokens_per_megapixel_step_check CHECK (((tokens_per_megapixel_step >= (0)::numeric) AND (tokens_per_megapixel_step <= (1000000)::numeric)))
);


--
-- Name: plan_limit; Type: TABLE; Schema: generation; Owner: -
--

CREATE TABLE generation.plan_limit (
    plan text NOT NULL,
    priority smallint NOT NULL,
    max_running_jobs integer NOT NULL,
    CONSTRAINT plan_limit_max_running_jobs_check CHECK ((max_running_jobs >= 1)),
    CONSTRAINT plan_limit_plan_check CHECK ((plan ~ '^[a-z][a-z0-9_]{0,31}$'::text)),
    CONSTRAINT plan_limit_priority_check CHECK (((priority >= 0) AND (priority <= 100)))
);


--
-- Name: schema_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_migrations (
    version character varying NOT NULL
);


--
-- Name: app_user; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.app_user (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    email text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT app_user_email_check CHECK (((email = lower(btrim(email))) AND ((char_length(email) >= 3) AND (char_length(email) <= 254))))
);


--
-- Name: auth_otp; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.auth_otp (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    email text NOT NULL,
    user_id uuid,
    code_hash bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    consumed_at timestamp with time zone,
    invalidated_at timestamp with time zone,
    client text,
    CONSTRAINT auth_otp_attempts_check CHECK ((attempts >= 0)),
    CONSTRAINT auth_otp_check CHECK ((expires_at > created_at)),
    CONSTRAINT auth_otp_client_check CHECK ((char_length(client) <= 256)),
    CONSTRAINT auth_otp_code_hash_check CHECK ((octet_length(code_hash) = 32)),
    CONSTRAINT auth_otp_email_check CHECK ((email = lower(btrim(email))))
);


--
-- Name: auth_otp_failure; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.auth_otp_failure (
    id bigint NOT NULL,
    email text NOT NULL,
    client text NOT NULL,
    failed_at timestamp with time zone NOT NULL,
    CONSTRAINT auth_otp_failure_client_check CHECK ((char_length(client) <= 256))
);


--
-- Name: auth_otp_failure_id_seq; Type: SEQUENCE; Schema: token; Owner: -
--

ALTER TABLE token.auth_otp_failure ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME token.auth_otp_failure_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: plan; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.plan (
    code text NOT NULL,
    name text NOT NULL,
    monthly_allowance bigint NOT NULL,
    signup_grant bigint NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT plan_code_check CHECK ((code ~ '^[a-z][a-z0-9_]{0,31}$'::text)),
    CONSTRAINT plan_monthly_allowance_check CHECK ((monthly_allowance >= 0)),
    CONSTRAINT plan_signup_grant_check CHECK ((signup_grant >= 0))
);


--
-- Name: token_account; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.token_account (
    user_id uuid NOT NULL,
    balance bigint DEFAULT 0 NOT NULL,
    plan_code text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT token_account_balance_check CHECK ((balance >= 0))
);


--
-- Name: token_ledger; Type: TABLE; Schema: token; Owner: -
--

CREATE TABLE token.token_ledger (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    seq bigint NOT NULL,
    user_id uuid NOT NULL,
    delta bigint NOT NULL,
    reason text NOT NULL,
    reference_id text NOT NULL,
    balance_after bigint NOT NULL,
    occurred_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    created_by text NOT NULL,
    CONSTRAINT token_ledger_balance_after_check CHECK ((balance_after >= 0)),
    CONSTRAINT token_ledger_created_by_check CHECK (((char_length(created_by) >= 1) AND (char_length(created_by) <= 128))),
    CONSTRAINT token_ledger_delta_check CHECK (((delta <> 0) AND (abs(delta) <= '1000000000000'::bigint))),
    CONSTRAINT token_ledger_reason_check CHECK ((reason = ANY (ARRAY['GENERATION'::text, 'GENERATION_REFUND'::text, 'MONTHLY_REFILL'::text, 'PURCHASE'::text, 'SIGNUP_BONUS'::text, 'ADJUSTMENT'::text]))),
    CONSTRAINT token_ledger_reference_id_check CHECK (((char_length(reference_id) >= 1) AND (char_length(reference_id) <= 200)))
);


--
-- Name: token_ledger_seq_seq; Type: SEQUENCE; Schema: token; Owner: -
--

ALTER TABLE token.token_ledger ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME token.token_ledger_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: asset_image asset_image_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.asset_image
    ADD CONSTRAINT asset_image_pkey PRIMARY KEY (id);


--
-- Name: asset_image_variant asset_image_variant_asset_kind_key; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.asset_image_variant
    ADD CONSTRAINT asset_image_variant_asset_kind_key UNIQUE (asset_id, kind);


--
-- Name: asset_image_variant asset_image_variant_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.asset_image_variant
    ADD CONSTRAINT asset_image_variant_pkey PRIMARY KEY (id);


--
-- Name: generation_job generation_job_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.generation_job
    ADD CONSTRAINT generation_job_pkey PRIMARY KEY (id);


--
-- Name: job_owner job_owner_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.job_owner
    ADD CONSTRAINT job_owner_pkey PRIMARY KEY (user_id);


--
-- Name: model_price model_price_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.model_price
    ADD CONSTRAINT model_price_pkey PRIMARY KEY (model);


--
-- Name: plan_limit plan_limit_pkey; Type: CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.plan_limit
    ADD CONSTRAINT plan_limit_pkey PRIMARY KEY (plan);


--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


--
-- Name: app_user app_user_email_key; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.app_user
    ADD CONSTRAINT app_user_email_key UNIQUE (email);


--
-- Name: app_user app_user_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.app_user
    ADD CONSTRAINT app_user_pkey PRIMARY KEY (id);


--
-- Name: auth_otp_failure auth_otp_failure_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.auth_otp_failure
    ADD CONSTRAINT auth_otp_failure_pkey PRIMARY KEY (id);


--
-- Name: auth_otp auth_otp_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.auth_otp
    ADD CONSTRAINT auth_otp_pkey PRIMARY KEY (id);


--
-- Name: plan plan_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.plan
    ADD CONSTRAINT plan_pkey PRIMARY KEY (code);


--
-- Name: token_account token_account_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_account
    ADD CONSTRAINT token_account_pkey PRIMARY KEY (user_id);


--
-- Name: token_ledger token_ledger_pkey; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_ledger
    ADD CONSTRAINT token_ledger_pkey PRIMARY KEY (id);


--
-- Name: token_ledger token_ledger_user_reference_key; Type: CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_ledger
    ADD CONSTRAINT token_ledger_user_reference_key UNIQUE (user_id, reference_id);


--
-- Name: idx_asset_image_job; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_asset_image_job ON generation.asset_image USING btree (job_id);


--
-- Name: idx_asset_image_user_time; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_asset_image_user_time ON generation.asset_image USING btree (user_id, created_at DESC, id DESC);


--
-- Name: idx_generation_job_charging; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_charging ON generation.generation_job USING btree (updated_at) WHERE (status = 'CHARGING'::text);


--
-- Name: idx_generation_job_completed; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_completed ON generation.generation_job USING btree (completed_at) WHERE (status = ANY (ARRAY['SUCCEEDED'::text, 'FAILED'::text, 'CANCELLED'::text]));


--
-- Name: idx_generation_job_lease; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_lease ON generation.generation_job USING btree (lease_expires_at) WHERE (status = 'RUNNING'::text);


--
-- Name: idx_generation_job_paused; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_paused ON generation.generation_job USING btree (created_at) WHERE (status = 'PAUSED'::text);


--
-- Name: idx_generation_job_queued; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_queued ON generation.generation_job USING btree (priority DESC, created_at, id) WHERE (status = 'QUEUED'::text);


--
-- Name: idx_generation_job_refund; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_refund ON generation.generation_job USING btree (updated_at) WHERE (refund_state = 'PENDING'::text);


--
-- Name: idx_generation_job_user_time; Type: INDEX; Schema: generation; Owner: -
--

CREATE INDEX idx_generation_job_user_time ON generation.generation_job USING btree (user_id, created_at DESC, id DESC);


--
-- Name: model_price_one_default; Type: INDEX; Schema: generation; Owner: -
--

CREATE UNIQUE INDEX model_price_one_default ON generation.model_price USING btree (is_default) WHERE is_default;


--
-- Name: idx_auth_otp_client_time; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_client_time ON token.auth_otp USING btree (client, created_at);


--
-- Name: idx_auth_otp_created; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_created ON token.auth_otp USING btree (created_at);


--
-- Name: idx_auth_otp_email_time; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_email_time ON token.auth_otp USING btree (email, created_at);


--
-- Name: idx_auth_otp_expires; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_expires ON token.auth_otp USING btree (expires_at);


--
-- Name: idx_auth_otp_failure_client; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_failure_client ON token.auth_otp_failure USING btree (client, failed_at);


--
-- Name: idx_auth_otp_failure_email_client; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_failure_email_client ON token.auth_otp_failure USING btree (email, client, failed_at);


--
-- Name: idx_auth_otp_failure_time; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_auth_otp_failure_time ON token.auth_otp_failure USING btree (failed_at);


--
-- Name: idx_token_account_plan; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_token_account_plan ON token.token_account USING btree (plan_code);


--
-- Name: idx_token_ledger_user_time; Type: INDEX; Schema: token; Owner: -
--

CREATE INDEX idx_token_ledger_user_time ON token.token_ledger USING btree (user_id, occurred_at DESC, seq DESC);


--
-- Name: generation_job generation_job_count_running; Type: TRIGGER; Schema: generation; Owner: -
--

CREATE TRIGGER generation_job_count_running AFTER UPDATE OF status ON generation.generation_job FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) EXECUTE FUNCTION generation.count_running();


--
-- Name: generation_job generation_job_notify; Type: TRIGGER; Schema: generation; Owner: -
--

CREATE TRIGGER generation_job_notify AFTER INSERT OR UPDATE ON generation.generation_job FOR EACH ROW EXECUTE FUNCTION generation.notify_job_change();


--
-- Name: token_ledger token_ledger_append_only; Type: TRIGGER; Schema: token; Owner: -
--

CREATE TRIGGER token_ledger_append_only BEFORE DELETE OR UPDATE ON token.token_ledger FOR EACH ROW EXECUTE FUNCTION token.reject_ledger_change();


--
-- Name: token_ledger token_ledger_no_truncate; Type: TRIGGER; Schema: token; Owner: -
--

CREATE TRIGGER token_ledger_no_truncate BEFORE TRUNCATE ON token.token_ledger FOR EACH STATEMENT EXECUTE FUNCTION token.reject_ledger_change();


--
-- Name: asset_image asset_image_job_id_fkey; Type: FK CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.asset_image
    ADD CONSTRAINT asset_image_job_id_fkey FOREIGN KEY (job_id) REFERENCES generation.generation_job(id);


--
-- Name: asset_image_variant asset_image_variant_asset_id_fkey; Type: FK CONSTRAINT; Schema: generation; Owner: -
--

ALTER TABLE ONLY generation.asset_image_variant
    ADD CONSTRAINT asset_image_variant_asset_id_fkey FOREIGN KEY (asset_id) REFERENCES generation.asset_image(id) ON DELETE CASCADE;


--
-- Name: auth_otp auth_otp_user_id_fkey; Type: FK CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.auth_otp
    ADD CONSTRAINT auth_otp_user_id_fkey FOREIGN KEY (user_id) REFERENCES token.app_user(id) ON DELETE SET NULL;


--
-- Name: token_account token_account_plan_code_fkey; Type: FK CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_account
    ADD CONSTRAINT token_account_plan_code_fkey FOREIGN KEY (plan_code) REFERENCES token.plan(code);


--
-- Name: token_account token_account_user_id_fkey; Type: FK CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_account
    ADD CONSTRAINT token_account_user_id_fkey FOREIGN KEY (user_id) REFERENCES token.app_user(id) ON DELETE CASCADE;


--
-- Name: token_ledger token_ledger_user_id_fkey; Type: FK CONSTRAINT; Schema: token; Owner: -
--

ALTER TABLE ONLY token.token_ledger
    ADD CONSTRAINT token_ledger_user_id_fkey FOREIGN KEY (user_id) REFERENCES token.token_account(user_id);


--
-- PostgreSQL database dump complete
--

\unrestrict dbmate


--
-- Dbmate schema migrations
--

INSERT INTO public.schema_migrations (version) VALUES
    ('20261125000001'),
    ('20261125000002'),
    ('20261125000003'),
    ('20261126000001'),
    ('20261126100001'),
    ('20261126100002'),
    ('20261127100001'),
    ('20261127100002'),
    ('20261127200001'),
    ('20261127500001'),
    ('20261127600001');
