#!/usr/bin/env python3
"""Summarize bench/run.sh wrk sittings: per endpoint, median/min/max req/s, median p50/p99, bad
replies; then keyplane's throughput as a fraction of the baseline and as a multiple of each peer.
usage: summarize.py sitting1.txt sitting2.txt ..."""
import re
import statistics
import sys

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNIT[m.group(2)]


data, order, sittings = {}, [], []
for path in sys.argv[1:]:
    name = None
    sittings.append({})
    for line in open(path):
        line = line.strip()
        if line.startswith("=== "):
            name = line[4:]
            if name not in data:
                data[name] = {"rps": [], "p50": [], "p99": [], "bad": 0}
                order.append(name)
        elif name and line.startswith("Requests/sec:"):
            data[name]["rps"].append(float(line.split()[1]))
            sittings[-1][name] = float(line.split()[1])
        elif name and line.startswith("50%"):
            data[name]["p50"].append(ms(line.split()[1]))
        elif name and line.startswith("99%"):
            data[name]["p99"].append(ms(line.split()[1]))
        elif name and ("responses:" in line or line.startswith("Non-2xx")):
            data[name]["bad"] += int(line.split()[-1])
        elif name and line.startswith("cpu per request:"):
            fields = line.split()
            data[name].setdefault("user", []).append(float(fields[4]))
            data[name].setdefault("kernel", []).append(float(fields[7]))

median = {name: statistics.median(data[name]["rps"]) for name in order}
base = median[order[0]]


def paired(name):
    """Each sitting's endpoint/baseline ratio (the two ran minutes apart): median, min, max."""
    ratios = [s[name] / s[order[0]] for s in sittings if name in s and order[0] in s]
    return statistics.median(ratios), min(ratios), max(ratios)


print("| endpoint | n | req/s median | min - max | % of baseline (medians) | % of baseline, per sitting: median (min - max) | p50 ms | p99 ms | bad replies |")
print("|---|---|---|---|---|---|---|---|---|")
for name in order:
    d = data[name]
    mid, low, high = paired(name)
    print(f"| {name} | {len(d['rps'])} | {median[name]:,.0f} | {min(d['rps']):,.0f} - {max(d['rps']):,.0f} | "
          f"{100 * median[name] / base:.1f}% | {100 * mid:.1f}% ({100 * low:.1f} - {100 * high:.1f}) | "
          f"{statistics.median(d['p50']):.2f} | {statistics.median(d['p99']):.2f} | {d['bad']} |")
print()
if all("user" in data[name] for name in order):
    print("| endpoint | server CPU per request, median: user µs | kernel µs | total µs | hello world's total / this (CPU-bound ratio) |")
    print("|---|---|---|---|---|")
    total = {name: statistics.median(u + k for u, k in zip(data[name]["user"], data[name]["kernel"])) for name in order}
    for name in order:
        print(f"| {name} | {statistics.median(data[name]['user']):.2f} | {statistics.median(data[name]['kernel']):.2f} | "
              f"{total[name]:.2f} | {100 * total[order[0]] / total[name]:.1f}% |")
    print()
pairs = [("keyplane forward-auth", "DRF HasAPIKey /protected/"),
         ("keyplane introspection", "oidc-provider introspection"),
         ("keyplane forward-auth", "oidc-provider introspection"),
         ("keyplane introspection", "DRF HasAPIKey /protected/")]
for ours, peer in pairs:
    if ours in median and peer in median:
        print(f"ratio {ours} / {peer}: {median[ours] / median[peer]:.1f}x")
