#!/usr/bin/env bash
# Interleaved criterion A/B: new = /work/main (CacheKey), base = /tmp/base (225d2a5), each its own target dir.
set -euo pipefail
OUT=$(cd "$(dirname "$0")" && pwd)
for i in 1 2 3; do
  for side in new base; do
    if [ $side = new ]; then dir=/work/main; td=/work/target-release; else dir=/tmp/base; td=/work/target-base; fi
    (cd $dir && KEYPLANE_BENCH_CREDENTIALS=1000000 CARGO_TARGET_DIR=$td taskset -c 1 cargo bench -q -p keyplane-bench --bench verify -- --noplot > $OUT/verify-$side-$i.txt 2>&1)
    (cd $dir && CARGO_TARGET_DIR=$td taskset -c 1 cargo bench -q -p keyplane-bench --bench verifier -- --noplot > $OUT/verifier-$side-$i.txt 2>&1)
    grep -B1 "time:" $OUT/verify-$side-$i.txt $OUT/verifier-$side-$i.txt | grep -v "^--" | paste - - | sed "s/ \+/ /g"
  done
done
