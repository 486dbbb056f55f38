#!/usr/bin/env bash
# wrkperf.sh BIN OUTDIR: where the load generator's CPU goes. perf profiles (cpu-clock) of wrk, not
# of the server, during 8 s runs against the hello world and keyplane's forward-auth, each under
# the recipe's header.lua (a response callback, so wrk builds a Lua table of each answer's headers)
# and bench/status.lua (no callback). Server on CPU 1, wrk on CPU 0, as in bench/run.sh.
set -euo pipefail
BIN=$1; OUT=$2; mkdir -p "$OUT"
R=/work/main/../shared/recipes/peers
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
BIND=127.0.0.1:8080 taskset -c 1 /tmp/peers/baseline/target/release/baseline >/dev/null 2>&1 & HP=$!
d=$(mktemp -d /tmp/wrkperf.XXXX); chmod 700 "$d"
taskset -c 1 "$BIN" serve --listen 127.0.0.1:8091 --data-dir "$d" --rate-limit-per-minute 0 >"$d/log" 2>&1 & KP=$!
trap 'kill $HP $KP 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:8091/readyz >/dev/null && break; sleep 0.1; done
org=$(jf '["org_id"]' < "$d/bootstrap.json"); root=$(jf '["token"]' < "$d/bootstrap.json")
T=$(curl -sf -X POST "http://127.0.0.1:8091/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" \
    -H 'content-type: application/json' -d '{"name":"s","scopes":["deploy","logs:read"]}' | jf '["token"]')
prof() { # name wrk-args...
  local name=$1; shift
  taskset -c 0 wrk -t1 -c32 -d8s "$@" > "$OUT/wrk-$name.txt" &
  local w=$!; sleep 2
  perf record -q -e cpu-clock -F 15000 -g -p "$(pgrep -n -x wrk)" -o "$OUT/$name.data" -- sleep 5 2>/dev/null
  wait $w
  perf report -q -i "$OUT/$name.data" --no-children --sort dso,sym -g none 2>/dev/null | sed 's/^ *//' | awk 'NF' > "$OUT/perf-wrk-$name.txt"
  rm -f "$OUT/$name.data"
  echo "$name $(grep Requests/sec "$OUT/wrk-$name.txt")"
}
prof hello-header -s "$R/header.lua" http://127.0.0.1:8080/verify
AUTH="Bearer $T" prof forward-header -s "$R/header.lua" http://127.0.0.1:8091/v1/auth/forward
prof hello-status -s /work/main/bench/status.lua http://127.0.0.1:8080/verify
AUTH="Bearer $T" prof forward-status -s /work/main/bench/status.lua http://127.0.0.1:8091/v1/auth/forward
