#!/usr/bin/env bash
# ab.sh ROUNDS BIN_A BIN_B : hello, A and B under header.lua, hello and B under status.lua, interleaved
set -euo pipefail
ROUNDS=$1; A=$2; B=$3
R=/work/main/../shared/recipes/peers
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
BIND=127.0.0.1:8080 taskset -c 1 /tmp/peers/baseline/target/release/baseline >/dev/null 2>&1 & HP=$!
start() { # bin port -> "pid token"
  local d; d=$(mktemp -d /tmp/ab.XXXX); chmod 700 $d
  taskset -c 1 "$1" serve --listen 127.0.0.1:$2 --data-dir $d --rate-limit-per-minute 0 >$d/log 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$2/readyz >/dev/null && break; sleep 0.1; done
  local org root; org=$(jf '["org_id"]' < $d/bootstrap.json); root=$(jf '["token"]' < $d/bootstrap.json)
  local t; t=$(curl -sf -X POST "http://127.0.0.1:$2/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" -H 'content-type: application/json' -d '{"name":"s","scopes":["deploy","logs:read"]}' | jf '["token"]')
  echo "$pid $t"
}
read AP AT < <(start "$A" 8091); read BP BT < <(start "$B" 8092)
trap 'kill $HP $AP $BP 2>/dev/null' EXIT
echo "A=$A B=$B"
python3 /work/main/bench/interleave.py "$ROUNDS" 2 \
  "hello=http://127.0.0.1:8080/verify=$HP=$R/header.lua" \
  "A=http://127.0.0.1:8091/v1/auth/forward=$AP=$R/header.lua=AUTH:Bearer $AT" \
  "B=http://127.0.0.1:8092/v1/auth/forward=$BP=$R/header.lua=AUTH:Bearer $BT" \
  "hello (status.lua)=http://127.0.0.1:8080/verify=$HP=/work/main/bench/status.lua" \
  "B (status.lua)=http://127.0.0.1:8092/v1/auth/forward=$BP=/work/main/bench/status.lua=AUTH:Bearer $BT"
