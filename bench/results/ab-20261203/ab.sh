#!/usr/bin/env bash
# ab.sh SITTINGS BIN... : interleaved sittings; hello + forward/introspect per binary; server CPU per request
set -euo pipefail
S=$1; shift; BINS=("$@")
pkill -f "baseline/target/release/baseline" || true; pkill -f "keyplane serve" || true; sleep 0.5
BIND=127.0.0.1:8080 taskset -c 1 /tmp/peers/baseline/target/release/baseline >/dev/null 2>&1 & HP=$!
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
declare -a KPIDS SUBJ VERI
port=8090
for b in "${BINS[@]}"; do
  D=$(mktemp -d /tmp/prof/kp.XXXX); chmod 700 $D
  taskset -c 1 "$b" serve --listen 127.0.0.1:$port --data-dir $D --rate-limit-per-minute 0 >$D/log 2>&1 & KPIDS+=($!)
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/readyz >/dev/null && break; sleep 0.1; done
  ORG=$(jf '["org_id"]' < $D/bootstrap.json); ROOT=$(jf '["token"]' < $D/bootstrap.json)
  mint() { curl -sf -X POST "http://127.0.0.1:$port/api/v1/organizations/$ORG/api-tokens" -H "Authorization: Bearer $ROOT" -H 'content-type: application/json' -d "{\"name\":\"$1\",\"scopes\":$2}" | jf '["token"]'; }
  SUBJ+=("$(mint s '["deploy","logs:read"]')"); VERI+=("$(mint v '["tokens:verify"]')")
  port=$((port+1))
done
W=(taskset -c 0 wrk -t1 -c32 -d${DUR:-5}s --timeout 5s)
one() { # label pid wrk-args
  local label=$1 pid=$2; shift 2
  local b a; b=$(awk '{print $14, $15}' /proc/$pid/stat)
  local out; out=$("${W[@]}" "$@")
  a=$(awk '{print $14, $15}' /proc/$pid/stat)
  python3 - "$label" "$b" "$a" "$out" <<'PY'
import sys,re
label,b,a,out=sys.argv[1:5]
n=int(re.search(r"(\d+) requests in",out).group(1)); rps=float(re.search(r"Requests/sec:\s+([\d.]+)",out).group(1))
b=list(map(int,b.split())); a=list(map(int,a.split()))
print(f"{label} rps={rps:.0f} user={(a[0]-b[0])/100/n*1e6:.3f} kernel={(a[1]-b[1])/100/n*1e6:.3f}")
PY
}
for s in $(seq $S); do
  one hello $HP -s /work/shared/recipes/peers/header.lua http://127.0.0.1:8080/verify
  for i in "${!BINS[@]}"; do
    AUTH="Bearer ${SUBJ[$i]}" one "fwd$i" ${KPIDS[$i]} -s /work/shared/recipes/peers/header.lua http://127.0.0.1:$((8090+i))/v1/auth/forward
  done
  for i in "${!BINS[@]}"; do
    VERIFIER="${VERI[$i]}" TOKEN="${SUBJ[$i]}" one "int$i" ${KPIDS[$i]} -s /work/main/bench/introspect.lua http://127.0.0.1:$((8090+i))
  done
done
kill $HP "${KPIDS[@]}"; wait 2>/dev/null || true
