-- Statements about the server and its connections, not about jobq's tables (no {schema}).

-- name: ping
-- The LISTEN connection's liveness check (runtime/listener.py).
SELECT 1;

-- name: database_exists
-- The embedded server's database (admin/embedded.py).
SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1);

-- name: create_database
-- Returns the statement: CREATE DATABASE takes no parameters, so the name is quoted by format().
SELECT format('CREATE DATABASE %I', $1::text);
