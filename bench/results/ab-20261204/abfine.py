#!/usr/bin/env python3
"""abfine.py ROUNDS DUR name=url[=token] ... : interleaved short wrk runs (rotating order), each
round's req/s ratios against the first name; prints medians. Servers must already run."""
import os, statistics, subprocess, sys, re
rounds, dur = int(sys.argv[1]), sys.argv[2]
targets = []
for arg in sys.argv[3:]:
    name, url, token, pid = (arg.split("=", 3) + ["", ""])[:4]
    targets.append((name, url, token, pid))
lua = os.environ.get("LUA", "/work/shared/recipes/peers/header.lua")
res = {n: [] for n, *_ in targets}
cpu = {n: [] for n, *_ in targets}
hz = os.sysconf('SC_CLK_TCK')
def ticks(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return int(f[11]), int(f[12])
for r in range(rounds):
    order = targets[r % len(targets):] + targets[:r % len(targets)]
    got = {}
    for name, url, token, pid in order:
        t0 = ticks(pid)
        env = dict(os.environ, AUTH=f"Bearer {token}")
        out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c32", f"-d{dur}s", "--timeout", "5s", "-s", lua, url],
                             capture_output=True, text=True, env=env, timeout=60).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        bad = re.search(r"non_200_responses: (\d+)", out)
        if bad and int(bad.group(1)): sys.exit(f"{name}: {bad.group(1)} non-200 responses")
        t1 = ticks(pid)
        n = int(re.search(r"(\d+) requests in", out).group(1))
        cpu[name].append(((t1[0]-t0[0])/hz/n*1e6, (t1[1]-t0[1])/hz/n*1e6))
        got[name] = rps
    for n in got: res[n].append(got[n])
    print(" ".join(f"{n}={got[n]:.0f}" for n, *_ in targets), flush=True, file=sys.stderr)
base = targets[0][0]
for name, *_ in targets:
    u = statistics.median(c[0] for c in cpu[name]); k = statistics.median(c[1] for c in cpu[name])
    print(f"{name}: server cpu per request: user {u:.2f} us, kernel {k:.2f} us")
for name, *_ in targets:
    ratios = [a / b for a, b in zip(res[name], res[base])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"{name}: median {statistics.median(res[name]):.0f} req/s; per-round ratio to {base}: median {100*statistics.median(ratios):.1f}% (quartiles {100*q[0]:.1f}-{100*q[2]:.1f})")
if len(targets) >= 3:
    a, b = targets[1][0], targets[2][0]
    ab = [y / x for x, y in zip(res[a], res[b])]
    print(f"{b}/{a}: median {100*statistics.median(ab):.1f}%")
