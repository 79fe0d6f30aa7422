#!/bin/sh
# Run once by the postgres image when its data volume is first initialised
# (/docker-entrypoint-initdb.d), before any table exists. It only creates the login
# role the brokers serve as; its grants come from `broker migrate --grant-to
# broker_app` (compose's migrate job), after the tables exist and after every upgrade.
set -eu
role=${APP_ROLE:-broker_app}
password_file=${APP_PASSWORD_FILE:-/run/secrets/db_app_password}
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v role="$role" -v password="$(cat "$password_file")" <<'SQL'
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'password';
SQL
