#!/usr/bin/env bash
# perf.sh BIN OUTDIR: perf profiles (cpu-clock) of the hello world, forward-auth and introspection,
# each during an 8 s wrk run (server on CPU 1, wrk on CPU 0); writes perf-*.txt and wrk-*.txt.
# PROFILE=wrk: profiles wrk itself instead of the server (where the load generator's CPU goes),
# for the hello world and forward-auth under header.lua and bench/status.lua; writes
# perf-wrk-<server>-<script>.txt and wrk-<server>-<script>.txt.
# PROFILE=polls: counts how often the connection task is polled per request under forward-auth and
# introspection (uprobes on keyplane's connection future and on hyper's service call, counted by
# perf stat for 2 s of a 4 s wrk run; root). One poll per request is the floor; more means the
# task was woken during its own poll. Appends to OUTDIR/polls.txt.
set -euo pipefail
BIN=$1; OUT=$2; mkdir -p "$OUT"
PROFILE=${PROFILE:-server}
R=/work/main/../shared/recipes/peers
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
# perf probe wants a file offset: the symbol's address less its executable segment's load bias.
probe_at() { # event symbol-regex
  local vaddr offset
  vaddr=$(nm "$BIN" | grep -E "$2" | sed -n '1s/ .*//p')
  offset=$(readelf -lW "$BIN" | python3 -c '
import sys
vaddr = int(sys.argv[1], 16)
for line in sys.stdin:
    f = line.split()
    if f[:1] == ["LOAD"] and "E" in f[6:-1]:
        print(hex(vaddr - int(f[2], 16) + int(f[1], 16)))
        break' "$vaddr")
  perf probe -q -x "$BIN" -a "kppolls:$1=$offset"
}
HP= KP=
trap 'kill $HP $KP 2>/dev/null; [ "$PROFILE" = polls ] && perf probe -q -d "kppolls:*" 2>/dev/null' EXIT
if [ "$PROFILE" = polls ]; then
  BIN=$(realpath "$BIN")
  probe_at connection_poll '_ZN15keyplane_server10connection10Connection5serve28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h'
  probe_at service_call 'HttpService\$LT\$B1\$GT\$\$GT\$4call17h'
else
  BIND=127.0.0.1:8080 taskset -c 1 /tmp/peers/baseline/target/release/baseline >/dev/null 2>&1 & HP=$!
fi
d=$(mktemp -d /tmp/perf.XXXX); chmod 700 $d
taskset -c 1 "$BIN" serve --listen 127.0.0.1:8091 --data-dir $d --rate-limit-per-minute 0 >$d/log 2>&1 & KP=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:8091/readyz >/dev/null && break; sleep 0.1; done
org=$(jf '["org_id"]' < $d/bootstrap.json); root=$(jf '["token"]' < $d/bootstrap.json)
mk() { curl -sf -X POST "http://127.0.0.1:8091/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" -H 'content-type: application/json' -d "$1" | jf '["token"]'; }
T=$(mk '{"name":"s","scopes":["deploy","logs:read"]}'); V=$(mk '{"name":"v","scopes":["tokens:verify"]}')
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
count() { # label wrk-args...: polls per request while wrk runs
  local label=$1; shift
  taskset -c 0 wrk -t1 -c32 -d4s "$@" >"$d/wrk" & local w=$!
  sleep 1
  perf stat -x, -e kppolls:connection_poll,kppolls:service_call -p "$KP" -- sleep 2 2>"$d/stat"
  wait $w
  python3 - "$label" "$d/stat" <<'PY' | tee -a "$OUT/polls.txt"
import sys
counts = {line.split(",")[2].split(":")[-1]: int(line.split(",")[0]) for line in open(sys.argv[2]) if "kppolls" in line}
print(f"{sys.argv[1]}: {counts['connection_poll'] / counts['service_call']:.2f} polls per request ({counts['service_call']} requests)")
PY
}
if [ "$PROFILE" = polls ]; then
  echo "== $(basename "$BIN")" >> "$OUT/polls.txt"
  AUTH="Bearer $T" count forward-auth -s "$R/header.lua" http://127.0.0.1:8091/v1/auth/forward
  VERIFIER=$V TOKEN=$T count introspection -s /work/main/bench/introspect.lua http://127.0.0.1:8091
elif [ "$PROFILE" = wrk ]; then
  for script in header status; do
    lua=$R/header.lua; [ $script = status ] && lua=/work/main/bench/status.lua
    prof hello-$script $HP -s "$lua" http://127.0.0.1:8080/verify
    AUTH="Bearer $T" prof forward-$script $KP -s "$lua" http://127.0.0.1:8091/v1/auth/forward
  done
else
  prof hello $HP -s $R/header.lua http://127.0.0.1:8080/verify
  AUTH="Bearer $T" prof forward $KP -s $R/header.lua http://127.0.0.1:8091/v1/auth/forward
  VERIFIER=$V TOKEN=$T prof introspection $KP -s /work/main/bench/introspect.lua http://127.0.0.1:8091
fi
