#!/usr/bin/env bash
# Builds and runs bench/etcd-raft against the etcd 3.4 source Debian packages, in GOPATH mode
# (no module proxy needed). Installs golang-go and golang-etcd-server-dev if missing.
set -euo pipefail
cd "$(dirname "$0")/etcd-raft"
for p in golang-go golang-etcd-server-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p"; }
done
export GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS=-mod=mod GOCACHE="${TMPDIR:-/tmp}/tandem-go-cache"
unset GOFLAGS
go version
go build -o "${TMPDIR:-/tmp}/etcd-raft-bench" .
"${TMPDIR:-/tmp}/etcd-raft-bench"
