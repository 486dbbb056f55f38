#!/usr/bin/env bash
# perf.sh BIN OUTDIR: perf profiles (cpu-clock) of the hello world, forward-auth and introspection,
# each during an 8 s wrk run (server on CPU 1, wrk on CPU 0); writes perf-*.txt and wrk-*.txt.
# PROFILE=wrk: profiles wrk itself instead of the server (where the load generator's CPU goes),
# for the hello world and forward-auth under header.lua and bench/status.lua; writes
# perf-wrk-<server>-<script>.txt and wrk-<server>-<script>.txt.
set -euo pipefail
BIN=$1; OUT=$2; mkdir -p "$OUT"
PROFILE=${PROFILE:-server}
R=/work/main/../shared/recipes/peers
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
BIND=127.0.0.1:8080 taskset -c 1 /tmp/peers/baseline/target/release/baseline >/dev/null 2>&1 & HP=$!
d=$(mktemp -d /tmp/perf.XXXX); chmod 700 $d
taskset -c 1 "$BIN" serve --listen 127.0.0.1:8091 --data-dir $d --rate-limit-per-minute 0 >$d/log 2>&1 & KP=$!
trap 'kill $HP $KP 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:8091/readyz >/dev/null && break; sleep 0.1; done
org=$(jf '["org_id"]' < $d/bootstrap.json); root=$(jf '["token"]' < $d/bootstrap.json)
mk() { curl -sf -X POST "http://127.0.0.1:8091/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" -H 'content-type: application/json' -d "$1" | jf '["token"]'; }
T=$(mk '{"name":"s","scopes":["deploy","logs:read"]}')
prof() { # name server-pid wrk-args... (PROFILE=wrk: wrk's pid is profiled instead)
  local name=$1 pid=$2; shift 2
  local report="$OUT/wrk-$name.txt"
  taskset -c 0 wrk -t1 -c32 -d8s "$@" > "$report" &
  local w=$!; sleep 2
  [ "$PROFILE" = wrk ] && { pid=$(pgrep -n -x wrk); name=wrk-$name; }
  perf record -q -e cpu-clock -F 15000 -g -p "$pid" -o "$OUT/perf-$name.data" -- sleep 5 2>/dev/null
  wait $w
  perf report -q -i "$OUT/perf-$name.data" --no-children --sort dso,sym -g none 2>/dev/null | sed 's/^ *//' | awk 'NF' > "$OUT/perf-$name.txt"
  rm -f "$OUT/perf-$name.data"
  echo "$name $(grep Requests/sec "$report")"
}
if [ "$PROFILE" = wrk ]; then
  for script in header status; do
    lua=$R/header.lua; [ $script = status ] && lua=/work/main/bench/status.lua
    prof hello-$script $HP -s "$lua" http://127.0.0.1:8080/verify
    AUTH="Bearer $T" prof forward-$script $KP -s "$lua" http://127.0.0.1:8091/v1/auth/forward
  done
else
  V=$(mk '{"name":"v","scopes":["tokens:verify"]}')
  prof hello $HP -s $R/header.lua http://127.0.0.1:8080/verify
  AUTH="Bearer $T" prof forward $KP -s $R/header.lua http://127.0.0.1:8091/v1/auth/forward
  VERIFIER=$V TOKEN=$T prof introspection $KP -s /work/main/bench/introspect.lua http://127.0.0.1:8091
fi
