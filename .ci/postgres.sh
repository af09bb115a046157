#!/usr/bin/env bash
# Install and start a PostgreSQL server on loopback for the multi-machine storage test, and
# print the URL the tests use (KVPARETO_TEST_POSTGRES_URL). Idempotent. The URL is the only
# thing written to stdout: the caller captures it.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true  # "already running" is fine
pg_ctlcluster "$version" main status >/dev/null
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
as_pg() { su postgres -c "psql -q -v ON_ERROR_STOP=1 -tAc \"$1\""; }
[ "$(as_pg "SELECT 1 FROM pg_roles WHERE rolname='kvpareto'")" = 1 ] \
  || as_pg "CREATE ROLE kvpareto LOGIN PASSWORD 'kvpareto'" >/dev/null
# The storage test makes a fresh database per run, so workers race to create Optuna's tables.
as_pg "ALTER ROLE kvpareto CREATEDB" >/dev/null
[ "$(as_pg "SELECT 1 FROM pg_database WHERE datname='kvpareto'")" = 1 ] \
  || as_pg "CREATE DATABASE kvpareto OWNER kvpareto" >/dev/null
echo "postgresql://kvpareto:kvpareto@127.0.0.1:5432/kvpareto"
