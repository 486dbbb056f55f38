#!/usr/bin/env bash
# cg.sh BIN [N] : callgrind instructions per request for forward and introspect (KINDS="forward" for one)
set -euo pipefail
BIN=$1; N=${2:-2000}; WARM=200
jf() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
for kind in ${KINDS:-forward introspect}; do
  dir=$(mktemp -d /tmp/prof/cg.XXXX); chmod 700 $dir
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$dir/callgrind.out "$BIN" serve --listen 127.0.0.1:8097 --data-dir $dir --rate-limit-per-minute 0 >$dir/server.log 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -s -o /dev/null http://127.0.0.1:8097/readyz && break; sleep 0.1; done
  ORG=$(jf '["org_id"]' < $dir/bootstrap.json); ROOT=$(jf '["token"]' < $dir/bootstrap.json)
  mint() { curl -sf -X POST "http://127.0.0.1:8097/api/v1/organizations/$ORG/api-tokens" -H "Authorization: Bearer $ROOT" -H 'content-type: application/json' -d "{\"name\":\"$1\",\"scopes\":$2}" | jf '["token"]'; }
  SUBJECT=$(mint s '["deploy","logs:read"]'); VERIFIER=$(mint v '["tokens:verify"]')
  SUBJECT=$SUBJECT VERIFIER=$VERIFIER python3 /work/main/bench/requests.py 8097 $kind $WARM
  callgrind_control -i on $pid >/dev/null
  SUBJECT=$SUBJECT VERIFIER=$VERIFIER python3 /work/main/bench/requests.py 8097 $kind $N
  callgrind_control -i off $pid >/dev/null
  kill -TERM $pid; wait $pid 2>/dev/null || true
  total=$(awk '/^totals:/ {sum += $2} END {print sum}' $dir/callgrind.out*)
  echo "$(basename $BIN) $kind: $((total / N)) per request  ($dir)"
done
