-- What `jobq roles` runs (jobqueue/admin/roles.py).
--
-- Roles and grants name identifiers, which PostgreSQL does not take as parameters. So each statement
-- here *returns* the statement(s) to run, built by format() with %I (identifiers, quoted when needed)
-- and %L (literals) from parameters: any schema or role name works, nothing is pasted by Python.
-- Privilege keywords are not identifiers: they come from the fixed table in roles.py and reach SQL
-- only through the CASE whitelist below ($n::text must be one of the listed words).
-- `{schema}` is not used: the schema is a parameter like the role.

-- name: create_role
-- Concurrent runs (two databases on one cluster) race on the shared catalog: either error means
-- the role exists now.
SELECT format('DO $do$ BEGIN CREATE ROLE %I NOLOGIN; '
              'EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $do$', $1::text);

-- name: reset_role
-- Take back everything the role holds in the schema, then let it see the schema.
SELECT format(s, $1::text, $2::text)
FROM unnest(ARRAY['REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM %I',
                  'REVOKE ALL ON SCHEMA %I FROM %I',
                  'GRANT USAGE ON SCHEMA %I TO %I']) WITH ORDINALITY AS u(s, n)
ORDER BY n;

-- name: grant_all_tables
-- $3: SELECT or USAGE (sequences).
SELECT format('GRANT %s ON ALL %s IN SCHEMA %I TO %I',
              CASE $3::text WHEN 'SELECT' THEN 'SELECT' WHEN 'USAGE' THEN 'USAGE' END,
              CASE $3::text WHEN 'SELECT' THEN 'TABLES' WHEN 'USAGE' THEN 'SEQUENCES' END, $1::text, $2::text);

-- name: grant_tables
-- $3 on the relations $4 that exist in the schema (none: no statement).
SELECT format('GRANT %s ON %s TO %I', string_agg(p.word, ', ' ORDER BY p.n),
              (SELECT string_agg(format('%I.%I', $1::text, r), ', ' ORDER BY r)
               FROM unnest($4::text[]) AS r WHERE to_regclass(format('%I.%I', $1::text, r)) IS NOT NULL),
              $2::text)
FROM unnest($3::text[]) WITH ORDINALITY AS u(word, n)
CROSS JOIN LATERAL (SELECT CASE u.word WHEN 'SELECT' THEN 'SELECT' WHEN 'INSERT' THEN 'INSERT'
                               WHEN 'UPDATE' THEN 'UPDATE' WHEN 'DELETE' THEN 'DELETE' END AS word, u.n) p
HAVING EXISTS (SELECT 1 FROM unnest($4::text[]) AS r WHERE to_regclass(format('%I.%I', $1::text, r)) IS NOT NULL);

-- name: grant_columns
-- $3 (INSERT or UPDATE) on the columns of table $4 named in $6 (NULL: every column) except those in
-- $5. A column a later revision adds is covered by the next run; the excluded ones (who enqueued a
-- row, what only a worker writes) never are.
SELECT format('GRANT %s (%s) ON %I.%I TO %I',
              CASE $3::text WHEN 'INSERT' THEN 'INSERT' WHEN 'UPDATE' THEN 'UPDATE' END,
              string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum), $1::text, $4::text, $2::text)
FROM pg_attribute a
WHERE a.attrelid = to_regclass(format('%I.%I', $1::text, $4::text)) AND a.attnum > 0 AND NOT a.attisdropped
  AND NOT a.attname = ANY ($5::text[]) AND ($6::text[] IS NULL OR a.attname = ANY ($6::text[]))
HAVING count(*) > 0;

-- name: grant_functions
-- EXECUTE on the functions named $3 that exist in the schema (every overload).
SELECT format('GRANT EXECUTE ON FUNCTION %I.%I(%s) TO %I', n.nspname, p.proname,
              pg_get_function_identity_arguments(p.oid), $2::text)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname = ANY ($3::text[])
ORDER BY p.proname, p.oid;

-- name: read_only
SELECT format('ALTER ROLE %I SET default_transaction_read_only = on', $1::text);

-- name: login_password
-- $2 is the SCRAM-SHA-256 verifier, never the password.
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text);
