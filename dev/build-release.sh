#!/usr/bin/env bash
# The release build that is deployed and measured (make release, make bench, bench/*/run.sh):
# one set of flags everywhere, since changing them rebuilds every module.
#   --static-swift-stdlib          Swift runtime and Foundation linked statically (about 6 MB
#                                  less resident memory than shared libraries).
#   -enforce-exclusivity=unchecked no run-time exclusivity checks (swift_beginAccess) in any
#                                  module, NIO's included: 15 % fewer user-space instructions
#                                  per proxied request (bench/RESULTS.md). Debug builds — every
#                                  test — keep the checks, so a violation still fails the tests.
#   -Xlinker --no-export-dynamic   the executable's own symbols stay out of its dynamic symbol
#                                  table (40,700 of them, 3.5 MB of .dynsym/.dynstr/.gnu.hash
#                                  that the loader read at every start): the sidecar's RSS
#                                  peak under load 25.7 -> 24.0 MB (bench/RESULTS.md). Nothing
#                                  in it looks its own symbols up with dlsym; crash backtraces
#                                  read .symtab from the file.
# Usage: dev/build-release.sh [PRODUCT…]   (default: tandem)
set -euo pipefail
cd "$(dirname "$0")/.."
for product in "${@:-tandem}"; do
  swift build -c release --static-swift-stdlib -Xswiftc -enforce-exclusivity=unchecked \
    -Xlinker --no-export-dynamic --product "$product"
done
