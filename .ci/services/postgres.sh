# Sourced by .ci/run (as root, bash, set -euo pipefail): starts a throwaway PostgreSQL on
# 127.0.0.1, exports WEIGHTVAULT_TEST_PG for tests/backends.rs and tests/replicas.rs, and
# registers its cleanup in CLEANUPS. Each test creates its own database on this server.
wv_pg_port=55432
wv_pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$wv_pg_bin" ] || [ ! -x "$wv_pg_bin/initdb" ]; then
  echo "postgres: not installed; installing it with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  wv_pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
# PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
wv_pg_dir=$(mktemp -d)
chown postgres "$wv_pg_dir"
su postgres -s /bin/sh -c "'$wv_pg_bin/initdb' -D '$wv_pg_dir/db' -U weightvault --auth=trust >/dev/null"
su postgres -s /bin/sh -c "'$wv_pg_bin/pg_ctl' -D '$wv_pg_dir/db' -l '$wv_pg_dir/pg.log' -w \
  -o \"-p $wv_pg_port -k '$wv_pg_dir' -c listen_addresses=127.0.0.1 -c max_connections=300\" start" >/dev/null
CLEANUPS+=("su postgres -s /bin/sh -c \"'$wv_pg_bin/pg_ctl' -D '$wv_pg_dir/db' -m immediate stop\" >/dev/null; rm -rf '$wv_pg_dir'")
export WEIGHTVAULT_TEST_PG="postgres://weightvault@127.0.0.1:$wv_pg_port/postgres"
echo "postgres: $("$wv_pg_bin/postgres" --version) on 127.0.0.1:$wv_pg_port"
