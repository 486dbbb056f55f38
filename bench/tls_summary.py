#!/usr/bin/env python3
"""Summarize bench/run.sh's tls sittings (PARTS=tls): per server, req/s median and range, median
p50/p99 and bad replies; then per-sitting paired ratios (the two runs of a pair were seconds
apart in the same sitting), as median (min - max) over the sittings:
keyplane over TLS / hello over TLS, keyplane plain / hello plain, hello over TLS / hello plain
(what TLS costs the hello world), keyplane over TLS / keyplane plain.
usage: tls_summary.py tls1.txt tls2.txt ..."""
import re
import statistics
import sys

HELLO = "axum hello (baseline)"
HELLO_TLS = "axum hello over TLS (tls-hello)"
KEYPLANE = "keyplane forward-auth"
KEYPLANE_TLS = "keyplane forward-auth over TLS"
RATIOS = [
    ("keyplane over TLS / hello over TLS", KEYPLANE_TLS, HELLO_TLS),
    ("keyplane plain / hello plain", KEYPLANE, HELLO),
    ("hello over TLS / hello plain", HELLO_TLS, HELLO),
    ("keyplane over TLS / keyplane plain", KEYPLANE_TLS, KEYPLANE),
]
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNIT[m.group(2)]


def parse(paths):
    """Each file is one sitting: {server: {"rps", "p50", "p99", "bad"}}."""
    sittings = []
    for path in paths:
        sitting, name = {}, None
        for line in open(path):
            line = line.strip()
            if line.startswith("=== "):
                name = line[4:]
                sitting[name] = {"rps": None, "p50": None, "p99": None, "bad": 0}
            elif name is None:
                continue
            elif line.startswith("Requests/sec:"):
                sitting[name]["rps"] = float(line.split()[1])
            elif line.startswith("50%"):
                sitting[name]["p50"] = ms(line.split()[1])
            elif line.startswith("99%"):
                sitting[name]["p99"] = ms(line.split()[1])
            elif "responses:" in line or line.startswith("Non-2xx"):
                sitting[name]["bad"] += int(line.split()[-1])
            elif line.startswith("Socket errors:"):
                # "Socket errors: connect 0, read 0, write 0, timeout 0"
                sitting[name]["bad"] += sum(int(n) for n in re.findall(r"\d+", line))
        sittings.append(sitting)
    return sittings


def spread(values):
    return statistics.median(values), min(values), max(values)


def main(paths):
    sittings = parse(paths)
    order = []
    for sitting in sittings:
        order += [name for name in sitting if name not in order]
    print("| server | n | req/s median | min - max | p50 ms | p99 ms | bad replies |")
    print("|---|---|---|---|---|---|---|")
    for name in order:
        runs = [s[name] for s in sittings if name in s and s[name]["rps"] is not None]
        if not runs:
            print(f"| {name} | 0 | - | - | - | - | - |")
            continue
        mid, low, high = spread([r["rps"] for r in runs])
        p50 = statistics.median(r["p50"] for r in runs if r["p50"] is not None)
        p99 = statistics.median(r["p99"] for r in runs if r["p99"] is not None)
        bad = sum(r["bad"] for r in runs)
        print(f"| {name} | {len(runs)} | {mid:,.0f} | {low:,.0f} - {high:,.0f} | {p50:.2f} | {p99:.2f} | {bad} |")
    print()
    print("| per-sitting ratio | n | median | min - max |")
    print("|---|---|---|---|")
    for label, top, bottom in RATIOS:
        ratios = [s[top]["rps"] / s[bottom]["rps"] for s in sittings
                  if top in s and bottom in s and s[top]["rps"] and s[bottom]["rps"]]
        if not ratios:
            print(f"| {label} | 0 | - | - |")
            continue
        mid, low, high = spread(ratios)
        print(f"| {label} | {len(ratios)} | {100 * mid:.1f}% | {100 * low:.1f}% - {100 * high:.1f}% |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
