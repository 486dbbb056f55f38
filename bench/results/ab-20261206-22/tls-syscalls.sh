#!/usr/bin/env bash
# Syscalls per answer over TLS: tls-hello vs keyplane forward-auth, each under 3 s of wrk, strace -c on the server.
set -euo pipefail
KP=${KP:-/work/target-release/release/keyplane}; TH=/work/target-release/release/tls-hello
mkdir -p /tmp/tlsprobe; D=$(mktemp -d /tmp/tlsprobe/run.XXXX); chmod 700 $D
$TH cert $D/cert 2>/dev/null
CERT=$D/cert/cert.pem; KEY=$D/cert/key.pem
BIND=127.0.0.1:8444 taskset -c 1 $TH serve --cert $CERT --key $KEY >$D/th.log 2>&1 & TH_PID=$!
mkdir -p $D/kp && chmod 700 $D/kp
taskset -c 1 $KP serve --listen 127.0.0.1:8095 --data-dir $D/kp --rate-limit-per-minute 0 --tls-cert $CERT --tls-key $KEY >$D/kp.log 2>&1 & KP_PID=$!
trap 'kill $TH_PID $KP_PID 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf --cacert $CERT https://127.0.0.1:8095/readyz >/dev/null && break; sleep 0.1; done
ORG=$(python3 -c "import json;print(json.load(open('$D/kp/bootstrap.json'))['org_id'])"); ROOT=$(python3 -c "import json;print(json.load(open('$D/kp/bootstrap.json'))['token'])")
TOK=$(curl -sf --cacert $CERT -X POST "https://127.0.0.1:8095/api/v1/organizations/$ORG/api-tokens" -H "Authorization: Bearer $ROOT" -H 'content-type: application/json' -d '{"name":"s","scopes":["deploy","logs:read"]}' | python3 -c "import json,sys;print(json.load(sys.stdin)['token'])")
for target in "hello $TH_PID https://127.0.0.1:8444/verify" "keyplane $KP_PID https://127.0.0.1:8095/v1/auth/forward"; do
  read -r name pid url <<<"$target"
  AUTH="Bearer $TOK" timeout 20 taskset -c 0 wrk -t1 -c32 -d6s -s /work/shared/recipes/peers/header.lua $url > $D/wrk-$name.txt &
  W=$!; sleep 1.5
  timeout 3 strace -c -f -p $pid -o $D/strace-$name.txt || true
  wait $W || true
  echo "== $name"; grep -E "Requests/sec|requests in" $D/wrk-$name.txt
  head -20 $D/strace-$name.txt
  curl -s --cacert $CERT -o /dev/null -w '%{size_header} header bytes\n' -H "Authorization: Bearer $TOK" $url
done
