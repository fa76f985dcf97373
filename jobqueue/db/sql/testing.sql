-- What jobqueue.testing (the pytest plugin) runs on the test server: databases, not jobq's tables.
-- CREATE/DROP DATABASE take no parameters: each statement returns the command, the names quoted by
-- format(), and the plugin runs that.

-- name: clone_database
-- A test's database, copied from the migrated template ($2): far faster than migrating it.
SELECT format('CREATE DATABASE %I TEMPLATE %I', $1::text, $2::text);

-- name: drop_database
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text);

-- name: search_path
-- So a test's own SQL may name jobq's tables and views unqualified ($2 is the schema).
SELECT format('ALTER DATABASE %I SET search_path = %I, public', $1::text, $2::text);

-- name: not_durable
-- The plugin's own embedded server holds throw-away databases: no fsync, so copying and dropping them
-- does not wait for the disk (never run on a server given by JOBQ_TEST_DATABASE_URL).
ALTER SYSTEM SET fsync = off;

-- name: no_sync_commit
ALTER SYSTEM SET synchronous_commit = off;

-- name: reload
SELECT pg_reload_conf();
