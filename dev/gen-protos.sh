#!/usr/bin/env bash
# Regenerates Sources/TandemEtcdAPI/Generated from Protos/etcd with protoc (Debian's
# protobuf-compiler) and protoc-gen-swift built from the swift-protobuf version the package
# resolves to. The generated Swift is committed; nothing generates code at build time.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler; }
plugin="${PROTOC_GEN_SWIFT:-}"
if [ -z "$plugin" ]; then
  swift package resolve
  swift build --package-path .build/checkouts/swift-protobuf --scratch-path .build/protoc-plugin \
    --product protoc-gen-swift
  plugin=.build/protoc-plugin/debug/protoc-gen-swift
fi
out=Sources/TandemEtcdAPI/Generated
rm -rf "$out" && mkdir -p "$out"
protoc --plugin=protoc-gen-swift="$plugin" -I Protos/etcd \
  --swift_out="$out" --swift_opt=Visibility=Public --swift_opt=FileNaming=DropPath \
  Protos/etcd/kv.proto Protos/etcd/rpc.proto Protos/etcd/v3lock.proto Protos/etcd/v3election.proto
"$plugin" --version
protoc --version
ls -l "$out"
