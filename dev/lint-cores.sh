#!/usr/bin/env bash
# Pure cores must not read a clock, sleep, draw unseeded randomness, start tasks or do I/O.
# This greps for the usual ways in; a hit is a design error, not a style nit.
set -euo pipefail
cd "$(dirname "$0")/.."
cores=(Sources/TandemCore Sources/TandemIdentity Sources/TandemRaft Sources/TandemStore Sources/TandemTraffic Sources/TandemReplica Sources/TandemSimulation)
banned='import Foundation|import Dispatch|import NIO|(^|[^A-Za-z])Date\(|ContinuousClock|SuspendingClock|DispatchTime|clock_gettime|gettimeofday|SystemRandomNumberGenerator|\.random\(|arc4random|usleep|sleep\(|Task \{|Task\.detached|Thread\(|DispatchQueue|import Glibc'
if grep -rnE "$banned" "${cores[@]}" --include=*.swift; then
  echo "lint-cores: the lines above use a clock, sleep, randomness, threads or I/O inside a pure core" >&2
  exit 1
fi
echo "lint-cores: ok (${cores[*]})"
