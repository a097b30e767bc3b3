#!/usr/bin/env bash
# The mesh simulator's speed: bench/sim/big-mesh.lua (20 services × 3 instances, 10 virtual
# minutes, faults) on a release build, wall time and peak memory per seed.
# Usage: bench/sim/run.sh [SEEDS]   (default 1..3)
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build -c release --product tandem >/dev/null
seeds=${1:-1..3}
first=${seeds%..*}
last=${seeds#*..}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for s in $(seq "$first" "$last"); do
  /usr/bin/time -f "seed $s: %e s wall, %M KiB peak RSS" .build/release/tandem sim bench/sim/big-mesh.lua --seed "$s" \
    > "$out/report.$s.txt"
  head -1 "$out/report.$s.txt"
  tail -1 "$out/report.$s.txt"
done
