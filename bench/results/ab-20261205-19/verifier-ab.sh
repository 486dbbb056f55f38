#!/bin/bash
# The embedded verifier, two bench binaries alternated (A, B), one server (KP) seeded with 10,000
# tokens; 1 and 2 threads, SITTINGS sittings of SECONDS_PER s each. Server idle after warm-up.
set -euo pipefail
A=${A:?bench binary A}; B=${B:?bench binary B}
KP=${KP:-/work/target-release/release/keyplane}
dir=$(mktemp -d /tmp/vab.XXXX); chmod 700 $dir
timeout 600 $A seed --database-url "sqlite://$dir/keyplane.db" --count 10000 --tokens-out $dir/tokens.txt > $dir/seed.json
ORG=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["org_id"])' < $dir/seed.json)
ROOT=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])' < $dir/seed.json)
$KP serve --listen 127.0.0.1:8096 --data-dir $dir --database-url "sqlite://$dir/keyplane.db" --rate-limit-per-minute 0 > $dir/server.log 2>&1 &
PID=$!
trap "kill $PID" EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:8096/readyz >/dev/null && break; sleep 0.1; done
VT=$(curl -sf -X POST "http://127.0.0.1:8096/api/v1/organizations/$ORG/api-tokens" -H "Authorization: Bearer $ROOT" -H 'content-type: application/json' -d '{"name":"v","scopes":["tokens:verify"]}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
for s in $(seq ${SITTINGS:-3}); do for KBX in $A $B; do for t in 1 2; do echo -n "$(basename $KBX) "
  timeout 120 $KBX embedded-verify --base http://127.0.0.1:8096 --verify-token "$VT" --tokens $dir/tokens.txt --take 10000 --seconds ${SECONDS_PER:-5} --threads $t
done; done; done
