#!/usr/bin/env python3
"""Short wrk runs of several servers, interleaved round by round, each round's req/s taken as a
ratio to the first server's in the same round. On a VM whose speed drifts by 5-10% within
minutes, the ratio of two runs seconds apart is steadier than the ratio of two 10-second runs a
minute apart (BENCHMARKS.md, "Seventh sitting"). Also the servers' own CPU time per request, from
/proc, and how busy the server's CPU and the load generator's were: a run whose load generator is
busier than its server measures the load generator. Then the rate ratio is bounded by the ratio of
the load generator's own CPU per answer (the baseline's over this server's), which is printed too.

usage: interleave.py ROUNDS SECONDS NAME=URL=PID=LUA[=VAR:VALUE]... ...
  the first server is the baseline; each VAR:VALUE is set in the environment of that server's wrk
  runs, for its Lua script (e.g. AUTH:Bearer <token>). Servers must be running; wrk runs pinned to
  $CLIENT_CPU (default 0). A run with any bad reply (the script's `..._responses: N` line, or
  wrk's Non-2xx line) stops everything. $ALSO_BASE names a further server to take ratios to.
"""
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """User and kernel ticks of a process (fields 14 and 15 of /proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def children_cpu():
    """User plus kernel seconds of this process's waited-for children (wrk, through taskset)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(url, pid, lua, variables, seconds):
    before = cpu_ticks(pid)
    env = dict(os.environ, **variables)
    wrk = ["taskset", "-c", os.environ.get("CLIENT_CPU", "0"), "wrk", "-t1", "-c32",
           f"-d{seconds}s", "--timeout", "5s", "-s", lua, url]
    client_before, started = children_cpu(), time.monotonic()
    out = subprocess.run(wrk, capture_output=True, text=True, env=env, timeout=60 + 2 * int(seconds)).stdout
    wall, client = time.monotonic() - started, children_cpu() - client_before
    after = cpu_ticks(pid)
    bad = re.search(r"_responses: (\d+)", out) or re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)):
        sys.exit(f"{url}: {bad.group(1)} bad replies\n{out}")
    served = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    per_request = [(a - b) / HZ / served * 1e6 for a, b in zip(after, before)]
    busy = (sum(after) - sum(before)) / HZ / wall, client / wall, client / served * 1e6
    return rps, per_request, busy


def main():
    rounds, seconds = int(sys.argv[1]), sys.argv[2]
    servers = []
    for arg in sys.argv[3:]:
        name, url, pid, lua, *variables = arg.split("=")
        servers.append((name, url, int(pid), lua, dict(v.split(":", 1) for v in variables)))
    rps = {s[0]: [] for s in servers}
    cpu = {s[0]: [] for s in servers}
    busy = {s[0]: [] for s in servers}
    for r in range(rounds):
        # Each server takes each place in the order in turn.
        for name, url, pid, lua, variables in servers[r % len(servers):] + servers[:r % len(servers)]:
            got, per_request, how_busy = run(url, pid, lua, variables, seconds)
            rps[name].append(got)
            cpu[name].append(per_request)
            busy[name].append(how_busy)
        print(f"round {r + 1}: " + " ".join(f"{s[0]} {rps[s[0]][-1]:.0f}" for s in servers), flush=True)
    print_table(servers, rps, cpu, servers[0][0], rounds, seconds)
    print_busy(servers, busy, servers[0][0], seconds)
    # And with the server named in $ALSO_BASE (e.g. a peer), if any.
    also = os.environ.get("ALSO_BASE")
    if also:
        print_table(servers, rps, cpu, also, rounds, seconds)
    # A server named "<x> (<how>)" is also compared with the baseline measured the same way.
    for name, *_ in servers[1:]:
        if "(" in name and name.startswith(servers[0][0] + " ("):
            how = name[name.index("("):]
            print_table([s for s in servers if s[0].endswith(how)], rps, cpu, name, rounds, seconds)


def print_busy(servers, busy, base, seconds):
    """How busy each run kept the server's CPU and the load generator's, over its wall time, and
    the load generator's CPU per answer: where it is the busier CPU, the baseline's per-answer CPU
    over this server's bounds the rate ratio, however little the server itself costs."""
    print(f"\n| server | server CPU busy, median of the {seconds} s runs | load generator CPU busy "
          f"| load generator µs/answer | its bound: % of {base} |")
    print("|---|---|---|---|---|")
    base_client = statistics.median(b[2] for b in busy[base])
    for name, *_ in servers:
        server = statistics.median(b[0] for b in busy[name])
        client = statistics.median(b[1] for b in busy[name])
        per_answer = statistics.median(b[2] for b in busy[name])
        print(f"| {name} | {100 * server:.0f}% | {100 * client:.0f}% | {per_answer:.2f} "
              f"| {100 * base_client / per_answer:.1f}% |")


def print_table(servers, rps, cpu, base, rounds, seconds):
    print(f"\n| server | rounds of {seconds} s | req/s median | % of {base}, per round: median (quartiles) "
          f"| user µs/request | kernel µs/request | % of {base} by CPU/request |")
    print("|---|---|---|---|---|---|---|")
    base_cpu = sum(statistics.median(c[i] for c in cpu[base]) for i in (0, 1))
    for name, *_ in servers:
        ratios = [a / b for a, b in zip(rps[name], rps[base])]
        low, _, high = statistics.quantiles(ratios, n=4)
        user = statistics.median(c[0] for c in cpu[name])
        kernel = statistics.median(c[1] for c in cpu[name])
        print(f"| {name} | {rounds} | {statistics.median(rps[name]):,.0f} | "
              f"{100 * statistics.median(ratios):.1f}% ({100 * low:.1f} - {100 * high:.1f}) | "
              f"{user:.2f} | {kernel:.2f} | {100 * base_cpu / (user + kernel):.1f}% |")


if __name__ == "__main__":
    main()
