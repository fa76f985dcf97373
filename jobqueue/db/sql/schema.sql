-- The schema check of admin/revision.py: is jobq's schema there, and at which alembic revision.
-- The schema name is a validated lower-case identifier (settings.py), so it needs no quoting here.

-- name: tables
SELECT to_regclass('{schema}.tasks') IS NOT NULL AS tasks,
       to_regclass('{schema}.alembic_version') IS NOT NULL AS versioned;

-- name: revision
SELECT version_num FROM {schema}.alembic_version;
