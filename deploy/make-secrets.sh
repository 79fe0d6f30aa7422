#!/bin/sh
# Secrets for deploy/compose.yaml, made once on the host that runs it: two database
# passwords and the two env files the migrate job and the brokers read their
# database URL from. Readable by their owner only; an existing file is never
# overwritten (delete it yourself to make a new one, and change the password in
# PostgreSQL to match). Keep them out of version control (.gitignore has them).
set -eu
dir=${SECRETS_DIR:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"
for name in db_owner_password db_app_password migrate.env broker.env; do
    if [ -e "$dir/$name" ]; then
        echo "$dir/$name exists: nothing was written (delete it to make new secrets)" >&2
        exit 1
    fi
done
random() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
owner=$(random)
app=$(random)
printf '%s' "$owner" > "$dir/db_owner_password"
printf '%s' "$app" > "$dir/db_app_password"
printf 'BROKER_DATABASE_URL=postgresql+asyncpg://broker_owner:%s@db:5432/broker\n' "$owner" \
    > "$dir/migrate.env"
printf 'BROKER_DATABASE_URL=postgresql+asyncpg://broker_app:%s@db:5432/broker\n' "$app" \
    > "$dir/broker.env"
echo "secrets written to $dir (0600)"
