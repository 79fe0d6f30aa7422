-- The role a running broker connects as, in production on PostgreSQL.
--
-- Migrations run as the owner of the schema (e.g. `broker_owner`); the service
-- connects as `broker_app`, which may read and append but can never rewrite or
-- truncate the append-only tables: the ledger and the consent versions. The
-- triggers created by the migration refuse the same statements, so a rewrite
-- needs both a superuser and a deliberate bypass, and the offline verifier still
-- names the altered index.
--
-- Run as the owner after `broker migrate` (and again after every migration that adds
-- a table), in the broker's database:
--   psql "postgresql://broker_owner@db/broker" -f deploy/sql/app_role.sql
-- `broker migrate --grant-to broker_app` makes the same grants from the code's own list
-- of tables (tests/test_app_role.py checks the two agree), for a role that exists.
-- then serve with BROKER_DATABASE_URL=postgresql+asyncpg://broker_app:…@db/broker
-- (set the password with \password broker_app, or use certificate authentication).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'broker_app') THEN
        CREATE ROLE broker_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
    END IF;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM broker_app;
GRANT USAGE ON SCHEMA public TO broker_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO broker_app;

-- Append-only: read and append, nothing else.
GRANT SELECT, INSERT ON consent_versions, ledger_entries, ledger_nodes, ledger_checkpoints,
    ledger_key_rotations TO broker_app;

-- Operational tables: rows change (consent heads, outboxes, erasure deletes them).
GRANT SELECT, INSERT, UPDATE, DELETE ON
    agencies, clients, subjects, subject_references, consent_grants, held_records,
    disclosures, webhook_deliveries, used_assertions, ledger_pending, disclosure_holds
    TO broker_app;

-- Alembic's bookkeeping is read-only for the service.
GRANT SELECT ON alembic_version TO broker_app;
