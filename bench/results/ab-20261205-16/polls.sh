#!/usr/bin/env bash
# polls.sh BIN: how often the connection task is polled per request, under forward-auth and under
# introspection (uprobes on keyplane's connection future and on hyper's service call, counted by
# perf stat for 2 s of an 4 s wrk run; server on CPU 1, wrk on CPU 0; needs root for uprobes).
# One poll per request is the floor; more means the task was woken during its own poll.
set -euo pipefail
BIN=$(realpath "$1")
R=/work/main/../shared/recipes/peers
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
d=$(mktemp -d /tmp/polls.XXXX); chmod 700 "$d"; KP=
trap '[ -n "$KP" ] && kill $KP 2>/dev/null; perf probe -q -d "kppolls:*" 2>/dev/null; rm -rf "$d"' EXIT
probe_at connection_poll '_ZN15keyplane_server10connection10Connection5serve28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h'
probe_at service_call 'HttpService\$LT\$B1\$GT\$\$GT\$4call17h'
taskset -c 1 "$BIN" serve --listen 127.0.0.1:8091 --data-dir "$d" --rate-limit-per-minute 0 >"$d/log" 2>&1 & KP=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:8091/readyz >/dev/null && break; sleep 0.1; done
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
org=$(jf '["org_id"]' < "$d/bootstrap.json"); root=$(jf '["token"]' < "$d/bootstrap.json")
mk() { curl -sf -X POST "http://127.0.0.1:8091/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" -H 'content-type: application/json' -d "$1" | jf '["token"]'; }
T=$(mk '{"name":"s","scopes":["deploy","logs:read"]}'); V=$(mk '{"name":"v","scopes":["tokens:verify"]}')
count() { # label wrk-args...: polls per request while wrk runs
    local label=$1; shift
    taskset -c 0 wrk -t1 -c32 -d4s "$@" >"$d/wrk" & local w=$!
    sleep 1
    perf stat -x, -e kppolls:connection_poll,kppolls:service_call -p "$KP" -- sleep 2 2>"$d/stat"
    wait $w
    python3 - "$label" "$d/stat" <<'PY'
import sys
counts = {line.split(",")[2].split(":")[-1]: int(line.split(",")[0]) for line in open(sys.argv[2]) if "kppolls" in line}
print(f"{sys.argv[1]}: {counts['connection_poll'] / counts['service_call']:.2f} polls per request ({counts['service_call']} requests)")
PY
}
AUTH="Bearer $T" count forward-auth -s "$R/header.lua" http://127.0.0.1:8091/v1/auth/forward
VERIFIER=$V TOKEN=$T count introspection -s /work/main/bench/introspect.lua http://127.0.0.1:8091
