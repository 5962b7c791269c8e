-- migrate:up

-- Each service logs in as its own role, with its schema on the role's search_path: no
-- superuser, no SET ROLE and no session state at run time, so the services also work behind
-- a transaction pooler. The setting is the role's in every database of the cluster (roles are
-- cluster-wide; a per-database setting would be lost by CREATE DATABASE ... TEMPLATE and by
-- pg_dump). Passwords are the deployment's (or `make`'s, in development): never a migration's.
ALTER ROLE token_service LOGIN;
ALTER ROLE token_service SET search_path = token;
ALTER ROLE generation_service LOGIN;
ALTER ROLE generation_service SET search_path = generation;

-- The ledger and the balances are written only through token.append_entries (and the signup,
-- through token.create_user, which calls it): the role alone cannot break
-- "balance = sum of the ledger". It may still change an account's plan.
REVOKE INSERT ON token.token_ledger FROM token_service;
REVOKE INSERT, UPDATE ON token.token_account FROM token_service;
GRANT UPDATE (plan_code, updated_at) ON token.token_account TO token_service;

-- Runs with the rights of its owner, the owner of the tables; nothing the caller's
-- search_path holds can stand in for what it calls (every name in it is qualified).
ALTER FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The user, their account and the plan's signup grant (an entry written by
-- token.append_entries), in one call. No row when the plan does not exist.
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

-- migrate:down

DROP FUNCTION token.create_user(text, text, bigint);
ALTER FUNCTION token.append_entries(uuid[], bigint[], text[], text[], bigint) SECURITY INVOKER RESET search_path;
REVOKE UPDATE (plan_code, updated_at) ON token.token_account FROM token_service;
GRANT INSERT, UPDATE ON token.token_account TO token_service;
GRANT INSERT ON token.token_ledger TO token_service;
-- Roles are the cluster's: other databases of it may still need the logins.
