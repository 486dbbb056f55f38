#!/bin/bash
# embedded verifier: 1 thread vs 2 threads, one lock (553418b) against shards (ad09248), alternated;
# the bench binaries copied to /work/base as kb-onelock and kb-sharded.
set -euo pipefail
A=/work/base/kb-onelock B=/work/base/kb-sharded exec bash "$(dirname "$0")/../ab-20261205-19/verifier-ab.sh"
