#!/usr/bin/env bash
# Central with 10 million cells, on SQLite and on a throwaway PostgreSQL server: dashboard,
# slide list, one slide, results over time, ingest alone and while the dashboard is read.
# Prints the table rows BENCHMARKS.md quotes. `CENTRAL_SCALE_CELLS=1000000 bench/central-scale.sh`
# for a quicker run. Needs Debian's postgresql package (`apt-get install postgresql`); about
# 20 GB of free disk for 10 million cells.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {
    cargo test --workspace --locked --features central/postgres --bench central_scale 2>/dev/null | grep -E '^\||filled'
}
if [ -z "${SKIP_SQLITE:-}" ]; then
    echo "== SQLite"
    run
fi

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
dir=$(mktemp -d)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
echo secret > "$dir/pw"
if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
as_pg "$bin/initdb" -D "$dir/data" -U wbc -A scram-sha-256 --pwfile "$dir/pw" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
trap 'as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null; rm -rf "$dir"' EXIT
echo "== PostgreSQL"
CENTRAL_SCALE_DB="postgres://wbc:secret@127.0.0.1:$port/postgres" run
