#!/usr/bin/env bash
# Before/after comparison for one change, in one sitting: forward-auth req/s of the BEFORE and the
# current keyplane beside the axum hello-world baseline, API create throughput of both on SQLite and
# PostgreSQL, and the current build's slow-client and cache-flood runs. Raw output goes to
# bench/results/<timestamp>-compare/. Everything listens on 127.0.0.1; every load run is bounded.
#
#   KP_BEFORE=/path/to/old/keyplane bash bench/compare.sh
#
# Needs what bench/run.sh needs (the peers recipe for the baseline, wrk, PostgreSQL at
# KEYPLANE_BENCH_DATABASE_URL).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
: "${KP_BEFORE:?KP_BEFORE must name the keyplane binary to compare against}"
PEERS_RECIPE="${PEERS_RECIPE:-$ROOT/../shared/recipes/peers}"
PEERS="${PEERS:-/tmp/peers}"
PG_ADMIN="${KEYPLANE_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
PG_BASE="${PG_ADMIN%/*}"
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
SITTINGS="${SITTINGS:-3}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
KP="$TARGET/release/keyplane"
KB="$TARGET/release/keyplane-bench"
OUT="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-compare"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/keyplane-compare.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '==> %s\n' "$*" | tee -a "$OUT/summary.txt" >&2; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')"
    echo "before: $KP_BEFORE"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
    echo "pinning: servers on CPU $SERVER_CPU, load generator on CPU $CLIENT_CPU"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
say "building the current release binaries"
cargo build --release -q -p keyplane -p keyplane-bench
say "building the hello-world baseline"
mkdir -p "$PEERS/baseline/src"
cp "$PEERS_RECIPE/baseline/Cargo.toml" "$PEERS/baseline/"
cp "$PEERS_RECIPE/baseline/src/main.rs" "$PEERS/baseline/src/"
(cd "$PEERS/baseline" && cargo build --release -q)
BIND=127.0.0.1:8080 taskset -c "$SERVER_CPU" "$PEERS/baseline/target/release/baseline" >"$WORK/baseline.log" 2>&1 &
PIDS+=($!)

start_keyplane() { # binary port data-dir [extra args...]
    local bin="$1" port="$2" dir="$3"; shift 3
    mkdir -p -m 700 "$dir"
    taskset -c "$SERVER_CPU" "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir" \
        --rate-limit-per-minute 0 "$@" >"$dir/server.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return 0; sleep 0.1; done
    echo "keyplane on $port did not start" >&2; cat "$dir/server.log" >&2; return 1
}
fresh_pg_db() { # name -> url
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null
    echo "$PG_BASE/$1"
}
subject_token() { # port dir -> a token to forward-auth with
    local org root
    org=$(json_field '["org_id"]' < "$2/bootstrap.json")
    root=$(json_field '["token"]' < "$2/bootstrap.json")
    curl -sf -X POST "http://127.0.0.1:$1/api/v1/organizations/$org/api-tokens" \
        -H "Authorization: Bearer $root" -H 'content-type: application/json' \
        -d '{"name":"bench-subject","scopes":["deploy","logs:read"]}' | json_field '["token"]'
}

say "forward-auth: before (8091) and after (8092) beside the baseline, $SITTINGS sittings"
start_keyplane "$KP_BEFORE" 8091 "$WORK/before"
start_keyplane "$KP" 8092 "$WORK/after"
BEFORE_TOKEN=$(subject_token 8091 "$WORK/before")
AFTER_TOKEN=$(subject_token 8092 "$WORK/after")
WRK=(timeout 60 taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d10s --timeout 5s --latency)
run() { # name, then wrk args
    local name="$1"; shift
    echo "=== $name"
    "${WRK[@]}" "$@" | grep -E "Requests/sec|Latency  |50%|75%|90%|99%|Non-2xx|Socket errors|responses:|requests in"
}
for s in $(seq "$SITTINGS"); do
    {
        run "axum hello (baseline)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8080/verify
        AUTH="Bearer $BEFORE_TOKEN" run "keyplane forward-auth (before)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8091/v1/auth/forward
        AUTH="Bearer $AFTER_TOKEN" run "keyplane forward-auth (after)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8092/v1/auth/forward
    } > "$OUT/sitting$s.txt"
done
python3 "$ROOT/bench/summarize.py" "$OUT"/sitting*.txt | tee -a "$OUT/summary.txt"

for backend in sqlite postgres; do
    for which in before after; do
        bin="$KP"; [ "$which" = before ] && bin="$KP_BEFORE"
        dir="$WORK/create-$backend-$which"
        args=()
        [ "$backend" = postgres ] && args=(--database-url "$(fresh_pg_db "kp_compare_$which")")
        start_keyplane "$bin" 8093 "$dir" "${args[@]}"
        pid="${PIDS[-1]}"
        org=$(json_field '["org_id"]' < "$dir/bootstrap.json")
        root=$(json_field '["token"]' < "$dir/bootstrap.json")
        printf '%s %s: ' "$backend" "$which" | tee -a "$OUT/summary.txt"
        timeout 600 taskset -c "$CLIENT_CPU" "$KB" create --base http://127.0.0.1:8093 --org "$org" \
            --token "$root" --count "${CREATE_COUNT:-2000}" | tee -a "$OUT/summary.txt"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
done

say "slow clients against the current build"
start_keyplane "$KP" 8094 "$WORK/slow"
pid="${PIDS[-1]}"
timeout 120 taskset -c "$CLIENT_CPU" "$KB" slow-clients --base http://127.0.0.1:8094 --pid "$pid" \
    --token "$(subject_token 8094 "$WORK/slow")" --connections 2000 --seconds 20 | tee -a "$OUT/summary.txt"
kill "$pid"; wait "$pid" 2>/dev/null || true

say "cache flood against the current build"
timeout 600 "$KB" cache-flood | tee -a "$OUT/summary.txt"
say "results in $OUT"
