#!/usr/bin/env bash
# keyplane's benchmark suite. Writes every raw output to bench/results/<timestamp>/ and prints a
# summary. Everything listens on 127.0.0.1; every load run is bounded by count and time.
#
#   bash bench/run.sh                 # the default parts: criterion http replicas scale (~25 min on 2 cores after the first build)
#   PARTS="http" bash bench/run.sh    # some of it: criterion http replicas scale ratios tls kanidm memory import verifier callgrind
#   KP_B=/path/to/other/keyplane PARTS=ratios bash bench/run.sh   # A/B: that build in the same sittings
#   (ratios: RATIO_SITTINGS sittings of 10 s runs, then RATIO_ROUNDS interleaved rounds of ROUND_SECONDS)
#
# Needs: the peers recipe in ../shared/recipes/peers (PEERS_RECIPE), PostgreSQL at
# KEYPLANE_BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test, the server must
# allow CREATE DATABASE), wrk and oha (installed here if missing; oha for the http part only),
# valgrind for the callgrind part, root for apt-get.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PARTS="${PARTS:-criterion http replicas scale}"
PEERS_RECIPE="${PEERS_RECIPE:-$ROOT/../shared/recipes/peers}"
export PEERS="${PEERS:-/tmp/peers}"
PG_ADMIN="${KEYPLANE_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
PG_BASE="${PG_ADMIN%/*}"
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
SITTINGS="${SITTINGS:-3}"
SCALE="${SCALE:-1000000}"
OUT="$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/keyplane-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -x "$PEERS_RECIPE/stop.sh" ] && bash "$PEERS_RECIPE/stop.sh" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
# Stops every server started so far (so the next part has the server CPU and its ports to itself).
stop_servers() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
say() { printf '==> %s\n' "$*" | tee -a "$OUT/summary.txt" >&2; }
# A separate CARGO_TARGET_DIR keeps the release build apart from a debug one in progress.
KP="${CARGO_TARGET_DIR:-$ROOT/target}/release/keyplane"
KB="${CARGO_TARGET_DIR:-$ROOT/target}/release/keyplane-bench"

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
    echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r)"
    echo "pinning: servers on CPU $SERVER_CPU, load generator on CPU $CLIENT_CPU"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
# oha (open-loop latency at half load) only for the http part: installing it is a long build.
if [[ " $PARTS " == *" http "* ]]; then
    command -v oha >/dev/null || [ -x "$HOME/.cargo/bin/oha" ] || cargo install oha --locked
    OHA="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
fi
say "building release binaries"
cargo build --release -q -p keyplane -p keyplane-bench

# Starts keyplane on 127.0.0.1:PORT pinned to the server CPU; prints nothing; remembers the PID.
start_keyplane() { # port data-dir [extra args...]
    local port="$1" dir="$2"; shift 2
    # With --tls-cert it serves https only: probe that, trusting the certificate it was given.
    local probe=(curl -sf "http://127.0.0.1:$port/readyz") prev="" arg
    for arg in "$@"; do
        if [ "$prev" = --tls-cert ]; then probe=(curl -sf --cacert "$arg" "https://127.0.0.1:$port/readyz"); fi
        prev="$arg"
    done
    # Else the probe below could find another server there and take it for this one.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "127.0.0.1:$port is already in use" >&2; return 1; fi
    mkdir -p "$dir" && chmod 700 "$dir"  # keyplane refuses a data directory others can read
    taskset -c "$SERVER_CPU" "$KP" serve --listen "127.0.0.1:$port" --data-dir "$dir" \
        --rate-limit-per-minute 0 "$@" >"$dir/server.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do "${probe[@]}" >/dev/null && return 0; sleep 0.1; done
    echo "keyplane on $port did not start" >&2; cat "$dir/server.log" >&2; return 1
}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
WRK=(timeout 60 taskset -c "$CLIENT_CPU" wrk -t1 -c32 -d10s --timeout 5s --latency)
run() { # name, then wrk args
    local name="$1"; shift
    echo "=== $name"
    "${WRK[@]}" "$@" | grep -E "Requests/sec|Latency  |50%|75%|90%|99%|Non-2xx|Socket errors|responses:|requests in"
}
# The axum hello world of the peers recipe, built once.
BASELINE_BIN="$PEERS/baseline/target/release/baseline"
build_baseline() {
    mkdir -p "$PEERS/baseline/src"
    cp "$PEERS_RECIPE/baseline/Cargo.toml" "$PEERS/baseline/"
    cp "$PEERS_RECIPE/baseline/src/main.rs" "$PEERS/baseline/src/"
    # Its own target directory even when CARGO_TARGET_DIR is exported for keyplane's build.
    (cd "$PEERS/baseline" && CARGO_TARGET_DIR="$PEERS/baseline/target" cargo build --release -q)
}
# ... listening on 127.0.0.1:8080.
start_baseline() {
    build_baseline
    BIND=127.0.0.1:8080 taskset -c "$SERVER_CPU" "$BASELINE_BIN" >"$WORK/baseline.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8080/verify && return 0; sleep 0.1; done
    echo "the hello-world baseline did not start" >&2; return 1
}
# Writes a self-signed certificate to DIR/pki (sets CERT and KEY) and starts tls-hello with it on
# 127.0.0.1:8444, pinned to the server CPU; sets TLS_HELLO_PID.
start_tls_hello() { # dir
    local tls_hello="${CARGO_TARGET_DIR:-$ROOT/target}/release/tls-hello"
    "$tls_hello" cert "$1/pki" 2>/dev/null
    CERT="$1/pki/cert.pem"; KEY="$1/pki/key.pem"
    if (exec 3<>/dev/tcp/127.0.0.1/8444) 2>/dev/null; then echo "127.0.0.1:8444 is already in use" >&2; return 1; fi
    BIND=127.0.0.1:8444 taskset -c "$SERVER_CPU" "$tls_hello" serve --cert "$CERT" --key "$KEY" >"$1/tls-hello.log" 2>&1 &
    PIDS+=($!); TLS_HELLO_PID=$!
    for _ in $(seq 100); do curl -sf --cacert "$CERT" -o /dev/null https://127.0.0.1:8444/verify && return 0; sleep 0.1; done
    echo "tls-hello did not start" >&2; cat "$1/tls-hello.log" >&2; return 1
}
# Mints a token named $2 with scopes $3 (JSON list) through the Aether API of the keyplane at $1,
# whose bootstrap.json is in $4; prints it.
mint_token() { # base name scopes-json data-dir
    local org root
    org=$(json_field '["org_id"]' < "$4/bootstrap.json")
    root=$(json_field '["token"]' < "$4/bootstrap.json")
    curl -sf -X POST "$1/api/v1/organizations/$org/api-tokens" -H "Authorization: Bearer $root" \
        -H 'content-type: application/json' -d "{\"name\":\"$2\",\"scopes\":$3}" | json_field '["token"]'
}
fresh_pg_db() { # name -> url
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null
    echo "$PG_BASE/$1"
}
# Keyplane replicas sharing one fresh PostgreSQL database kp_bench_NAME, on the ports given,
# data directories $WORK/NAME<port>; sets ORG and ROOT_TOKEN from the first one's bootstrap (the
# replicas share the store, so that org and token serve them all).
start_replicas() { # name port...
    local name="$1" url port; shift
    url=$(fresh_pg_db "kp_bench_$name")
    for port in "$@"; do
        start_keyplane "$port" "$WORK/$name$port" --database-url "$url"
    done
    ORG=$(json_field '["org_id"]' < "$WORK/$name$1/bootstrap.json")
    ROOT_TOKEN=$(json_field '["token"]' < "$WORK/$name$1/bootstrap.json")
}

if [[ " $PARTS " == *" criterion "* ]]; then
    say "criterion: in-process verify with $SCALE cached credentials"
    KEYPLANE_BENCH_CREDENTIALS="$SCALE" taskset -c "$SERVER_CPU" \
        cargo bench -q -p keyplane-bench --bench verify -- --noplot 2>&1 | tee "$OUT/criterion.txt" \
        | grep -E "^verify/|time:" | tee -a "$OUT/summary.txt"
fi

if [[ " $PARTS " == *" http "* ]]; then
    say "HTTP: peers (recipe: $PEERS_RECIPE)"
    bash "$PEERS_RECIPE/setup.sh" >"$OUT/peers-setup.log" 2>&1
    SERVER_CPU="$SERVER_CPU" bash "$PEERS_RECIPE/start.sh" >"$OUT/peers-start.log" 2>&1
    start_keyplane 8090 "$WORK/http"
    ORG=$(json_field '["org_id"]' < "$WORK/http/bootstrap.json")
    ROOT_TOKEN=$(json_field '["token"]' < "$WORK/http/bootstrap.json")
    API="http://127.0.0.1:8090/api/v1/organizations/$ORG/api-tokens"
    SUBJECT=$(curl -sf -X POST "$API" -H "Authorization: Bearer $ROOT_TOKEN" -H 'content-type: application/json' \
        -d '{"name":"bench-subject","scopes":["deploy","logs:read"]}' | json_field '["token"]')
    VERIFIER=$(curl -sf -X POST "$API" -H "Authorization: Bearer $ROOT_TOKEN" -H 'content-type: application/json' \
        -d '{"name":"bench-verifier","scopes":["tokens:verify"]}' | json_field '["token"]')
    DRF_KEY=$(cat "$PEERS/drf/app/key.txt")
    OIDC_TOKEN=$(cat "$PEERS/oidc/token.txt")
    BASIC=$(printf 'bench-client:bench-secret-bench-secret-bench-secret' | base64 -w0)
    for s in $(seq "$SITTINGS"); do
        {
            run "axum hello (baseline)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8080/verify
            AUTH="Bearer $SUBJECT" run "keyplane forward-auth" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8090/v1/auth/forward
            VERIFIER="$VERIFIER" TOKEN="$SUBJECT" run "keyplane introspection" -s "$ROOT/bench/introspect.lua" http://127.0.0.1:8090
            AUTH="Api-Key $DRF_KEY" run "DRF HasAPIKey /protected/" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8001/protected/
            TOKEN="$OIDC_TOKEN" BASIC="$BASIC" run "oidc-provider introspection" -s "$PEERS_RECIPE/introspect.lua" http://127.0.0.1:8002
        } > "$OUT/sitting$s.txt"
    done
    python3 "$ROOT/bench/summarize.py" "$OUT"/sitting*.txt | tee -a "$OUT/summary.txt"

    # Latency at half of keyplane's measured saturation (open loop, oha -q), and the baseline at the
    # same rate.
    rate() { # endpoint name -> median req/s over the sittings
        python3 - "$1" "$OUT"/sitting*.txt <<'PY'
import re, statistics, sys
name, files = sys.argv[1], sys.argv[2:]
rates = []
for f in files:
    current = None
    for line in open(f):
        if line.startswith("=== "): current = line[4:].strip()
        m = re.match(r"Requests/sec:\s+([\d.]+)", line)
        if m and current == name: rates.append(float(m.group(1)))
print(int(statistics.median(rates)))
PY
    }
    for target in forward introspection; do
        if [ "$target" = forward ]; then
            half=$(( $(rate "keyplane forward-auth") / 2 ))
            args=(-H "Authorization: Bearer $SUBJECT" http://127.0.0.1:8090/v1/auth/forward)
        else
            half=$(( $(rate "keyplane introspection") / 2 ))
            args=(-m POST -H "Authorization: Bearer $VERIFIER" -T application/x-www-form-urlencoded -d "token=$SUBJECT" http://127.0.0.1:8090/oauth2/introspect)
        fi
        echo "=== keyplane $target at $half req/s (half of saturation)" | tee -a "$OUT/half-load.txt"
        timeout 60 taskset -c "$CLIENT_CPU" "$OHA" --no-tui -z 10s -q "$half" -c 32 --latency-correction "${args[@]}" \
            | grep -E "Success rate|Requests/sec|50.00%|90.00%|99.00%|99.90%|\[2|\[4|\[5" | tee -a "$OUT/half-load.txt"
        echo "=== baseline at $half req/s" | tee -a "$OUT/half-load.txt"
        timeout 60 taskset -c "$CLIENT_CPU" "$OHA" --no-tui -z 10s -q "$half" -c 32 --latency-correction http://127.0.0.1:8080/verify \
            | grep -E "Success rate|Requests/sec|50.00%|90.00%|99.00%|99.90%" | tee -a "$OUT/half-load.txt"
    done
    cat "$OUT/half-load.txt" >> "$OUT/summary.txt"
    bash "$PEERS_RECIPE/stop.sh" >/dev/null 2>&1 || true
    stop_servers
fi

if [[ " $PARTS " == *" replicas "* ]]; then
    say "replicas: revocation propagation across three keyplane replicas on PostgreSQL"
    start_replicas replicas 8091 8092 8093
    timeout 600 taskset -c "$CLIENT_CPU" "$KB" propagation --bases http://127.0.0.1:8091,http://127.0.0.1:8092,http://127.0.0.1:8093 \
        --org "$ORG" --token "$ROOT_TOKEN" --rounds 300 | tee -a "$OUT/summary.txt"
fi

if [[ " $PARTS " == *" scale "* ]]; then
    for backend in sqlite postgres; do
        say "scale: $SCALE stored credentials on $backend"
        dir="$WORK/scale-$backend"; mkdir -p "$dir"
        if [ "$backend" = sqlite ]; then url="sqlite://$dir/keyplane.db"; else url=$(fresh_pg_db kp_bench_scale); fi
        timeout 1800 "$KB" seed --database-url "$url" --count "$SCALE" --tokens-out "$dir/tokens.txt" > "$dir/seed.json"
        ORG=$(json_field '["org_id"]' < "$dir/seed.json"); ROOT_TOKEN=$(json_field '["token"]' < "$dir/seed.json")
        echo "import: $(json_field '["import_seconds"]' < "$dir/seed.json") s for $SCALE credentials" | tee -a "$OUT/summary.txt"
        start_keyplane 8094 "$dir" --database-url "$url"
        pid="${PIDS[-1]}"
        timeout 600 taskset -c "$CLIENT_CPU" "$KB" cold-verify --base http://127.0.0.1:8094 --tokens "$dir/tokens.txt" --count 50000 \
            | tee -a "$OUT/summary.txt"
        timeout 600 taskset -c "$CLIENT_CPU" "$KB" create --base http://127.0.0.1:8094 --org "$ORG" --token "$ROOT_TOKEN" --count 2000 \
            | tee -a "$OUT/summary.txt"
        echo "peak RSS ($backend, after 50k verified + 2k created): $(awk '/VmHWM/ {print $2, $3}' /proc/$pid/status)" | tee -a "$OUT/summary.txt"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
fi
if [[ " $PARTS " == *" ratios "* ]]; then
    # keyplane's verification routes against the hello world alone (no other peers), in
    # interleaved sittings so that drift in the machine's speed hits all three alike.
    say "ratios: forward-auth and introspection against the axum hello world"
    start_baseline
    baseline_pid="${PIDS[-1]}"
    start_keyplane 8090 "$WORK/ratios"
    keyplane_pid="${PIDS[-1]}"
    SUBJECT=$(mint_token http://127.0.0.1:8090 bench-subject '["deploy","logs:read"]' "$WORK/ratios")
    VERIFIER=$(mint_token http://127.0.0.1:8090 bench-verifier '["tokens:verify"]' "$WORK/ratios")
    # KP_B: another build's keyplane binary, measured in the same sittings (an A/B comparison: a
    # change of a few percent is lost between runs minutes apart, not within one sitting).
    if [ -n "${KP_B:-}" ]; then
        KP="$KP_B" start_keyplane 8091 "$WORK/ratios-b"
        keyplane_b_pid="${PIDS[-1]}"
        SUBJECT_B=$(mint_token http://127.0.0.1:8091 bench-subject '["deploy","logs:read"]' "$WORK/ratios-b")
        VERIFIER_B=$(mint_token http://127.0.0.1:8091 bench-verifier '["tokens:verify"]' "$WORK/ratios-b")
    fi
    # Also the server's own CPU time per request, user and kernel apart (from /proc/PID/stat):
    # where the difference to the hello world lies, and less at the mercy of the load generator.
    run_timed() { # pid name, then wrk args
        local pid="$1" name="$2" before after; shift 2
        before=$(awk '{print $14, $15}' "/proc/$pid/stat")
        run "$name" "$@" | tee "$WORK/last-run.txt"
        after=$(awk '{print $14, $15}' "/proc/$pid/stat")
        python3 -c "import sys; b, a, hz = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3]); n = int(sys.argv[4])
print(f'cpu per request: user {(int(a[0]) - int(b[0])) / hz / n * 1e6:.2f} us, kernel {(int(a[1]) - int(b[1])) / hz / n * 1e6:.2f} us')" \
            "$before" "$after" "$(getconf CLK_TCK)" "$(awk '/requests in/ {print $1}' "$WORK/last-run.txt")"
    }
    for s in $(seq "${RATIO_SITTINGS:-5}"); do
        {
            run_timed "$baseline_pid" "axum hello (baseline)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8080/verify
            AUTH="Bearer $SUBJECT" run_timed "$keyplane_pid" "keyplane forward-auth" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8090/v1/auth/forward
            VERIFIER="$VERIFIER" TOKEN="$SUBJECT" run_timed "$keyplane_pid" "keyplane introspection" -s "$ROOT/bench/introspect.lua" http://127.0.0.1:8090
            if [ -n "${KP_B:-}" ]; then
                AUTH="Bearer $SUBJECT_B" run_timed "$keyplane_b_pid" "keyplane forward-auth (KP_B)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8091/v1/auth/forward
                VERIFIER="$VERIFIER_B" TOKEN="$SUBJECT_B" run_timed "$keyplane_b_pid" "keyplane introspection (KP_B)" -s "$ROOT/bench/introspect.lua" http://127.0.0.1:8091
            fi
        } > "$OUT/ratios$s.txt"
    done
    python3 "$ROOT/bench/summarize.py" "$OUT"/ratios*.txt | tee -a "$OUT/summary.txt"
    # Then short runs interleaved round by round (bench/interleave.py): steadier ratios on a VM
    # whose speed drifts within minutes. RATIO_ROUNDS=0 skips them.
    if [ "${RATIO_ROUNDS:-30}" -gt 0 ]; then
        say "ratios: ${RATIO_ROUNDS:-30} interleaved rounds of ${ROUND_SECONDS:-2} s"
        # Also the hello world and forward-auth under bench/status.lua, whose load generator does
        # no per-header work (header.lua's response callback makes wrk build a table of each
        # answer's headers: three for the hello world, nine for forward-auth).
        servers=(
            "hello=http://127.0.0.1:8080/verify=$baseline_pid=$PEERS_RECIPE/header.lua"
            "forward-auth=http://127.0.0.1:8090/v1/auth/forward=$keyplane_pid=$PEERS_RECIPE/header.lua=AUTH:Bearer $SUBJECT"
            "introspection=http://127.0.0.1:8090=$keyplane_pid=$ROOT/bench/introspect.lua=VERIFIER:$VERIFIER=TOKEN:$SUBJECT"
            "hello (status.lua)=http://127.0.0.1:8080/verify=$baseline_pid=$ROOT/bench/status.lua"
            "forward-auth (status.lua)=http://127.0.0.1:8090/v1/auth/forward=$keyplane_pid=$ROOT/bench/status.lua=AUTH:Bearer $SUBJECT"
        )
        if [ -n "${KP_B:-}" ]; then
            servers+=(
                "forward-auth (KP_B)=http://127.0.0.1:8091/v1/auth/forward=$keyplane_b_pid=$PEERS_RECIPE/header.lua=AUTH:Bearer $SUBJECT_B"
                "introspection (KP_B)=http://127.0.0.1:8091=$keyplane_b_pid=$ROOT/bench/introspect.lua=VERIFIER:$VERIFIER_B=TOKEN:$SUBJECT_B"
            )
        fi
        CLIENT_CPU="$CLIENT_CPU" python3 "$ROOT/bench/interleave.py" "${RATIO_ROUNDS:-30}" "${ROUND_SECONDS:-2}" "${servers[@]}" \
            > "$OUT/interleave.txt"
        sed -n '/^| server/,$p' "$OUT/interleave.txt" | tee -a "$OUT/summary.txt"
    fi
    stop_servers
    # hyper's polls of a connection task per request, with no keyplane code: introspection pays a
    # second poll for its body until a hyper release fixes that (bench/src/bin/body-wake.rs).
    "${CARGO_TARGET_DIR:-$ROOT/target}/release/body-wake" --requests 20000 | tee -a "$OUT/summary.txt"
fi

if [[ " $PARTS " == *" tls "* ]]; then
    # Forward-auth over TLS beside the axum hello world over TLS (tls-hello: keyplane's own rustls
    # configuration, acceptor and HTTP builders), and both over plain HTTP, in interleaved sittings
    # with identical requests (the hello worlds get the same Authorization header and ignore it).
    # wrk (OpenSSL) offers no ALPN, so every run is HTTP/1.1 on kept-alive connections.
    say "tls: forward-auth over TLS against the axum hello world over TLS"
    stop_servers
    dir="$WORK/tls"; mkdir -p "$dir"
    start_baseline
    start_tls_hello "$dir"
    start_keyplane 8096 "$dir/keyplane-plain"
    start_keyplane 8095 "$dir/keyplane-tls" --tls-cert "$CERT" --tls-key "$KEY"
    SUBJECT=$(mint_token http://127.0.0.1:8096 bench-subject '["deploy","logs:read"]' "$dir/keyplane-plain")
    SUBJECT_TLS=$(CURL_CA_BUNDLE="$CERT" mint_token https://127.0.0.1:8095 bench-subject '["deploy","logs:read"]' "$dir/keyplane-tls")
    # What a client without ALPN (as wrk, same OpenSSL defaults) and one offering h2 (curl) get.
    for server in "tls-hello 8444 /verify" "keyplane 8095 /readyz"; do
        read -r name port path <<<"$server"
        echo "=== $name: openssl s_client, no ALPN (as wrk)"
        timeout 10 openssl s_client -brief -connect "127.0.0.1:$port" -servername localhost </dev/null 2>&1 \
            | grep -E "Protocol version|Ciphersuite|Signature type|Hash used|Server Temp Key" || true
        echo "=== $name: curl, ALPN h2 and http/1.1"
        curl -sv --cacert "$CERT" -o /dev/null "https://127.0.0.1:$port$path" 2>&1 \
            | grep -E "SSL connection using|ALPN: server|HTTP/[12]" || true
    done > "$OUT/tls-handshake.txt"
    grep -E "^===|Protocol version|Ciphersuite|Server Temp Key" "$OUT/tls-handshake.txt" | tee -a "$OUT/summary.txt"
    for s in $(seq "${TLS_SITTINGS:-5}"); do
        {
            AUTH="Bearer $SUBJECT" run "axum hello (baseline)" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8080/verify
            AUTH="Bearer $SUBJECT_TLS" run "axum hello over TLS (tls-hello)" -s "$PEERS_RECIPE/header.lua" https://127.0.0.1:8444/verify
            AUTH="Bearer $SUBJECT" run "keyplane forward-auth" -s "$PEERS_RECIPE/header.lua" http://127.0.0.1:8096/v1/auth/forward
            AUTH="Bearer $SUBJECT_TLS" run "keyplane forward-auth over TLS" -s "$PEERS_RECIPE/header.lua" https://127.0.0.1:8095/v1/auth/forward
        } > "$OUT/tls$s.txt"
    done
    python3 "$ROOT/bench/tls_summary.py" "$OUT"/tls[0-9]*.txt | tee -a "$OUT/summary.txt"
    stop_servers
fi

if [[ " $PARTS " == *" kanidm "* ]]; then
    # Forward-auth over TLS beside kanidm's `GET /v1/auth/valid` over TLS and the hello world over
    # TLS, in interleaved rounds. kanidm's server cannot be built here (its repository is out of
    # reach), so the peer is bench/peers/kanidm: kanidmd 1.7.4's token validation (its library
    # crate, from crates.io) behind tls-hello's TLS and HTTP front, without kanidmd's middleware
    # and logging, so at least as fast as kanidmd (its src/main.rs). Its first build takes ~15 min.
    say "kanidm: forward-auth over TLS, kanidm's auth/valid (kanidmd_lib 1.7.4) and the hello world over TLS, ${KANIDM_ROUNDS:-20} interleaved rounds of ${ROUND_SECONDS:-2} s"
    stop_servers
    KANIDM_TARGET="${KANIDM_TARGET:-${CARGO_TARGET_DIR:-$ROOT/target}/kanidm-peer}"
    (cd "$ROOT/bench/peers/kanidm" && CARGO_TARGET_DIR="$KANIDM_TARGET" cargo build --release --locked -q)
    dir="$WORK/kanidm"; mkdir -p "$dir" && chmod 700 "$dir"
    start_tls_hello "$dir"
    if (exec 3<>/dev/tcp/127.0.0.1/8445) 2>/dev/null; then echo "127.0.0.1:8445 is already in use" >&2; exit 1; fi
    BIND=127.0.0.1:8445 CERT="$CERT" KEY="$KEY" DB_DIR="$dir/kanidm-db" TOKEN_OUT="$dir/kanidm-token.txt" \
        taskset -c "$SERVER_CPU" "$KANIDM_TARGET/release/kanidm-valid-peer" >"$dir/kanidm.log" 2>&1 &
    PIDS+=($!); kanidm_pid=$!
    start_keyplane 8095 "$dir/keyplane-tls" --tls-cert "$CERT" --tls-key "$KEY"
    keyplane_pid="${PIDS[-1]}"
    for _ in $(seq 300); do [ -s "$dir/kanidm-token.txt" ] && curl -s --cacert "$CERT" -o /dev/null https://127.0.0.1:8445/v1/auth/valid && break; sleep 0.1; done
    SUBJECT_TLS=$(CURL_CA_BUNDLE="$CERT" mint_token https://127.0.0.1:8095 bench-subject '["deploy","logs:read"]' "$dir/keyplane-tls")
    KANIDM_TOKEN=$(cat "$dir/kanidm-token.txt")
    # Each peer must accept its credential and refuse a forged one before it is timed.
    check_answers() { # url good-token
        local good bad
        good=$(curl -s --cacert "$CERT" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" "$1")
        bad=$(curl -s --cacert "$CERT" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${2%?}x" "$1")
        [ "$good" = 200 ] && [ "$bad" = 401 ] \
            || { echo "$1: $good with its token, $bad with a forged one (want 200, 401)" >&2; cat "$dir/kanidm.log" >&2; exit 1; }
    }
    check_answers https://127.0.0.1:8445/v1/auth/valid "$KANIDM_TOKEN"
    check_answers https://127.0.0.1:8095/v1/auth/forward "$SUBJECT_TLS"
    servers=(
        "hello over TLS=https://127.0.0.1:8444/verify=$TLS_HELLO_PID=$PEERS_RECIPE/header.lua=AUTH:Bearer $SUBJECT_TLS"
        "forward-auth over TLS=https://127.0.0.1:8095/v1/auth/forward=$keyplane_pid=$PEERS_RECIPE/header.lua=AUTH:Bearer $SUBJECT_TLS"
        "kanidm auth/valid over TLS=https://127.0.0.1:8445/v1/auth/valid=$kanidm_pid=$PEERS_RECIPE/header.lua=AUTH:Bearer $KANIDM_TOKEN"
    )
    CLIENT_CPU="$CLIENT_CPU" ALSO_BASE="kanidm auth/valid over TLS" python3 "$ROOT/bench/interleave.py" \
        "${KANIDM_ROUNDS:-20}" "${ROUND_SECONDS:-2}" "${servers[@]}" > "$OUT/kanidm.txt"
    sed -n '/^| server/,$p' "$OUT/kanidm.txt" | tee -a "$OUT/summary.txt"
    stop_servers
fi

if [[ " $PARTS " == *" memory "* ]]; then
    # The server's resident memory with SCALE credentials in its verification cache, each loaded
    # by one forward-auth check (the path that serves them, shared header values and all). With
    # KP_B, that build too, one after the other, each on its own copy of the same seeded database.
    say "memory: $SCALE credentials cached in the server"
    seeded="$WORK/memory-seed"; mkdir -p "$seeded" && chmod 700 "$seeded"
    timeout 1800 "$KB" seed --database-url "sqlite://$seeded/keyplane.db" --count "$SCALE" --tokens-out "$seeded/tokens.txt" > "$seeded/seed.json"
    # Of the server started last ($pid): its RSS in KiB, and its cache lookups with one result.
    rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
    lookups() { curl -sf http://127.0.0.1:8095/metrics | awk -v result="$1" '$1 == "keyplane_verify_cache_lookups_total{result=\"" result "\"}" {print $2}'; }
    # Of $pid, until the file $1 exists: every 0.05 s its RSS split; prints the split of the largest
    # (MiB: all, anonymous, file-backed, shared memory), to tell what a peak is made of.
    rss_split_at_peak() {
        local stop="$1" best="0 0 0 0" sample
        until [ -e "$stop" ]; do
            sample=$(awk '/^VmRSS:/ {r = $2} /^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} /^RssShmem:/ {s = $2}
                END {printf "%d %d %d %d", r / 1024, a / 1024, f / 1024, s / 1024}' "/proc/$pid/status") || break
            [ "${sample%% *}" -gt "${best%% *}" ] && best="$sample"
            sleep 0.05
        done
        echo "$best"
    }
    memory_builds=("$KP")
    [ -n "${KP_B:-}" ] && memory_builds+=("$KP_B")
    for build in "${memory_builds[@]}"; do
        label=""; [ "$build" != "$KP" ] && label=" (KP_B)"
        dir="$WORK/memory"; rm -rf "$dir"; mkdir -p "$dir" && chmod 700 "$dir"
        cp "$seeded"/keyplane.db* "$dir/"
        KP="$build" start_keyplane 8095 "$dir" --database-url "sqlite://$dir/keyplane.db" --verify-cache-capacity $((SCALE + SCALE / 10))
        pid="${PIDS[-1]}"
        before=$(rss)
        rm -f "$dir/filled" "$dir/passed"
        rss_split_at_peak "$dir/filled" > "$dir/fill-peak" &
        timeout 1800 taskset -c "$CLIENT_CPU" "$KB" cold-verify --base http://127.0.0.1:8095 --tokens "$seeded/tokens.txt" --count "$SCALE" \
            | sed "s/^/memory$label: /" | tee -a "$OUT/summary.txt"
        touch "$dir/filled"; wait $!
        after=$(rss)
        filled_peak=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$pid/status")
        filled=$(lookups miss)
        # A second pass must find every credential still held: reloads (entries older than the 30 s
        # lifetime are read again, and refreshed in place when unchanged) but no misses.
        rss_split_at_peak "$dir/passed" > "$dir/pass-peak" &
        timeout 1800 taskset -c "$CLIENT_CPU" "$KB" cold-verify --base http://127.0.0.1:8095 --tokens "$seeded/tokens.txt" --count "$SCALE" >/dev/null
        touch "$dir/passed"; wait $!
        again=$(rss)
        {
            echo "memory$label: RSS $((before / 1024)) MiB started, $((after / 1024)) MiB with $SCALE cached ($(( (after - before) * 1024 / SCALE )) bytes per credential), $((again / 1024)) MiB after the second pass; peak $filled_peak MiB during the fill, $(awk '/VmHWM/ {print $2 / 1024}' "/proc/$pid/status") MiB in all"
            echo "memory$label: cache misses while filling: $filled; on a second pass over the same tokens: $(( $(lookups miss) - filled )) misses, $(lookups reload) reloads"
            for pass in fill pass; do
                read -r all anon file shmem < "$dir/$pass-peak"
                echo "memory$label: largest RSS sampled during the $pass (every 0.05 s): $all MiB = $anon anonymous + $file file-backed + $shmem shared"
            done
        } | tee -a "$OUT/summary.txt"
        stop_servers
    done
fi

if [[ " $PARTS " == *" import "* ]]; then
    # Bulk import alone, repeated: its time varies more between runs than the others' (disk).
    for run in $(seq "${IMPORT_RUNS:-3}"); do
        for backend in sqlite postgres; do
            dir="$WORK/import-$backend-$run"; mkdir -p "$dir"
            if [ "$backend" = sqlite ]; then url="sqlite://$dir/keyplane.db"; else url=$(fresh_pg_db kp_bench_import); fi
            timeout 1800 taskset -c "$SERVER_CPU" "$KB" seed --database-url "$url" --count "$SCALE" --tokens-out "$dir/tokens.txt" > "$dir/seed.json"
            python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"import ($backend, run $run): {d['import_seconds']:.1f} s for {d['imported']} credentials (store {d['store_seconds']:.1f} s, minting {d['mint_seconds']:.1f} s)\")" \
                < "$dir/seed.json" | tee -a "$OUT/summary.txt"
            rm -rf "$dir"
        done
    done
fi

if [[ " $PARTS " == *" verifier "* ]]; then
    # keyplane-verifier (issue #15). Throughput: the embedded verifier (in-process, one core: the
    # server core, idle meanwhile) against keyplane's forward-auth (one server core, wrk on the
    # client core), in interleaved sittings of one run, and the same verifier shared by one thread
    # per CPU (unpinned: its scaling). Then revocation to refusal through the
    # revocation stream: SQLite on one server, and three PostgreSQL replicas (revoked through
    # replica 2, the verifier on replica 1). Ports 8096-8099, apart from the other parts'.
    VERIFIER_TOKENS="${VERIFIER_TOKENS:-10000}"
    REVOCATION_ROUNDS="${REVOCATION_ROUNDS:-200}"
    say "verifier: embedded verification ($VERIFIER_TOKENS cached tokens) against forward-auth, one core each"
    dir="$WORK/verifier"; mkdir -p "$dir" && chmod 700 "$dir"
    timeout 600 "$KB" seed --database-url "sqlite://$dir/keyplane.db" --count "$VERIFIER_TOKENS" \
        --tokens-out "$dir/tokens.txt" > "$dir/seed.json"
    ORG=$(json_field '["org_id"]' < "$dir/seed.json"); ROOT_TOKEN=$(json_field '["token"]' < "$dir/seed.json")
    start_keyplane 8096 "$dir" --database-url "sqlite://$dir/keyplane.db"
    VERIFY_TOKEN=$(curl -sf -X POST "http://127.0.0.1:8096/api/v1/organizations/$ORG/api-tokens" \
        -H "Authorization: Bearer $ROOT_TOKEN" -H 'content-type: application/json' \
        -d '{"name":"bench-embedded-verifier","scopes":["tokens:verify"]}' | json_field '["token"]')
    SUBJECT=$(head -n1 "$dir/tokens.txt")
    # The forward-auth script of the other parts when the peers recipe is there (same wrk cost).
    forward=(-s "$PEERS_RECIPE/header.lua")
    embedded=(embedded-verify --base http://127.0.0.1:8096 --verify-token "$VERIFY_TOKEN"
              --tokens "$dir/tokens.txt" --take "$VERIFIER_TOKENS" --seconds 10)
    for s in $(seq "${VERIFIER_SITTINGS:-3}"); do
        AUTH="Bearer $SUBJECT" run "keyplane forward-auth" "${forward[@]}" http://127.0.0.1:8096/v1/auth/forward \
            > "$OUT/verifier-forward-auth$s.txt"
        timeout 300 taskset -c "$SERVER_CPU" "$KB" "${embedded[@]}" > "$OUT/verifier-embedded$s.json"
        # The same verifier shared by one thread per CPU: how a multi-threaded service scales.
        timeout 300 "$KB" "${embedded[@]}" --threads "$(nproc)" > "$OUT/verifier-threads$s.json"
    done
    python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import glob, json, re, statistics, sys
out = sys.argv[1]
wrk = [float(m.group(1)) for f in sorted(glob.glob(f"{out}/verifier-forward-auth*.txt"))
       for m in [re.search(r"Requests/sec:\s+([\d.]+)", open(f).read())] if m]
emb = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/verifier-embedded*.json"))]
rates = [e["verifies_per_second"] for e in emb]
ratios = [e / w for e, w in zip(rates, wrk)]
print(f"verifier: embedded {statistics.median(rates):.0f} verifies/s on one core "
      f"(p50 {statistics.median(e['p50_us'] for e in emb):.2f} us, p99 {statistics.median(e['p99_us'] for e in emb):.2f} us); "
      f"forward-auth {statistics.median(wrk):.0f} req/s on one server core; "
      f"ratio {statistics.median(ratios):.1f}x (median of {len(ratios)} sittings: {', '.join(f'{r:.1f}' for r in ratios)})")
many = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/verifier-threads*.json"))]
scaling = [m["verifies_per_second"] / r for m, r in zip(many, rates)]
print(f"verifier: {many[0]['threads']} threads sharing it, {statistics.median(m['verifies_per_second'] for m in many):.0f} verifies/s "
      f"(p50 {statistics.median(m['p50_us'] for m in many):.2f} us, p99 {statistics.median(m['p99_us'] for m in many):.2f} us); "
      f"{statistics.median(scaling):.2f}x one thread (sittings: {', '.join(f'{x:.2f}' for x in scaling)})")
PY
    # Verifier::verify alone on a warm cache (criterion; the cache-hit path, no HTTP).
    KEYPLANE_BENCH_VERIFIER_TOKENS="$VERIFIER_TOKENS" taskset -c "$SERVER_CPU" \
        cargo bench -q -p keyplane-bench --bench verifier -- --noplot 2>&1 | tee "$OUT/criterion-verifier.txt" \
        | grep -E "^verifier/|time:" | tee -a "$OUT/summary.txt"

    revocation_summary() { # label < json
        python3 -c "
import json, sys
d = json.load(sys.stdin)
e, r = d['event_applied'], d['refused']
print(f\"verifier revocation ($1, {d['rounds']} rounds): event applied p50 {e['p50_ms']} ms p99 {e['p99_ms']} ms max {e['max_ms']} ms; refused p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms max {r['max_ms']} ms; refused before the event: {d['refused_before_the_event']}\")"
    }
    say "verifier: revocation to refusal through the stream, SQLite, one server ($REVOCATION_ROUNDS rounds)"
    timeout 900 taskset -c "$CLIENT_CPU" "$KB" verifier-revocation --base http://127.0.0.1:8096 \
        --org "$ORG" --token "$ROOT_TOKEN" --verify-token "$VERIFY_TOKEN" --rounds "$REVOCATION_ROUNDS" \
        > "$OUT/verifier-revocation-sqlite.json"
    revocation_summary "SQLite, one server" < "$OUT/verifier-revocation-sqlite.json" | tee -a "$OUT/summary.txt"
    stop_servers

    say "verifier: revocation to refusal through the stream, three PostgreSQL replicas ($REVOCATION_ROUNDS rounds)"
    start_replicas verifier 8097 8098 8099
    timeout 900 taskset -c "$CLIENT_CPU" "$KB" verifier-revocation --base http://127.0.0.1:8097 \
        --revoke-base http://127.0.0.1:8098 --org "$ORG" --token "$ROOT_TOKEN" --rounds "$REVOCATION_ROUNDS" \
        > "$OUT/verifier-revocation-postgres.json"
    revocation_summary "PostgreSQL, revoked on replica 2, verifier on replica 1" \
        < "$OUT/verifier-revocation-postgres.json" | tee -a "$OUT/summary.txt"
    stop_servers
fi
if [[ " $PARTS " == *" callgrind "* ]]; then
    # Instructions per request, counted by callgrind: unlike req/s, the same for the same binary
    # whatever else the machine does. Counting starts only after start-up and WARM requests
    # (`--instr-atstart=no`, then `callgrind_control -i on`): start-up varies from run to run
    # (governor's clock calibrates itself by spinning for a stretch of wall time), so a
    # difference of two whole runs carried up to ±1,600 a request of it; this way two runs agree to
    # within a few instructions.
    N="${CALLGRIND_REQUESTS:-5000}"; WARM=200
    say "callgrind: instructions per request (N=$N after $WARM to warm up)"
    stop_servers
    build_baseline
    # Runs one server under callgrind (an argument @DATA@ becomes a fresh data directory), sends
    # WARM requests of KIND uncounted and N counted, stops it, prints the instructions per request.
    per_request() { # name kind command...
        local name="$1" kind="$2"; shift 2
        local dir; dir="$(mktemp -d "$WORK/callgrind.XXXXXX")"; chmod 700 "$dir"
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out" \
            "${@//@DATA@/$dir}" >"$dir/server.log" 2>&1 &
        local pid=$! total
        for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:8097/readyz" && break; sleep 0.1; done
        if [ "$kind" != hello ]; then
            SUBJECT=$(mint_token http://127.0.0.1:8097 bench-subject '["deploy","logs:read"]' "$dir")
            VERIFIER=$(mint_token http://127.0.0.1:8097 bench-verifier '["tokens:verify"]' "$dir")
        fi
        SUBJECT="${SUBJECT:-none}" VERIFIER="${VERIFIER:-none}" python3 "$ROOT/bench/requests.py" 8097 "$kind" "$WARM"
        callgrind_control -i on "$pid" >/dev/null
        SUBJECT="${SUBJECT:-none}" VERIFIER="${VERIFIER:-none}" python3 "$ROOT/bench/requests.py" 8097 "$kind" "$N"
        callgrind_control -i off "$pid" >/dev/null
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
        total=$(awk '/^totals:/ {sum += $2} END {print sum}' "$dir"/callgrind.out*)
        echo "callgrind: $name: $((total / N)) instructions per request ($total over $N)"
    }
    {
        BIND=127.0.0.1:8097 per_request "axum hello (baseline)" hello "$BASELINE_BIN"
        for kind in forward introspect; do
            per_request "keyplane $kind" "$kind" "$KP" serve --listen 127.0.0.1:8097 \
                --data-dir @DATA@ --rate-limit-per-minute 0
        done
    } | tee -a "$OUT/summary.txt"
fi
say "results in $OUT"
