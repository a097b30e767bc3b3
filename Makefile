# Tandem — build, test, demo and bench. `make test` is what CI runs on a fresh clone.
SWIFT ?= swift
SHELL := /bin/bash
# golang-go + golang-etcd-server-dev: Go's own etcd client (clientv3 3.4 sources) for the seed's
# Go program in examples/registry, built offline in GOPATH mode.
APT_PACKAGES := libluajit-5.1-dev pkg-config zlib1g-dev etcd-client etcd-server python3-etcd3 python3-grpcio python3-jwt python3-cryptography curl wrk golang-go golang-etcd-server-dev
BUILD_LOG := .build/tandem-build.log

.PHONY: all deps build test docs examples examples-run demo bench release fmt lint sim clean

all: build

# Installs the Debian packages the build and tests need, if any is missing.
# Never add libnginx-mod-http-lua here: it removes libluajit-5.1-dev (see docs/ARCHITECTURE.md).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	else echo "deps: all present ($(APT_PACKAGES))"; fi
	@pkg-config --exists luajit || { echo "deps: pkg-config cannot find luajit" >&2; exit 1; }

# Builds everything (tests included) and fails on any warning in Tandem's own code.
build: deps
	@mkdir -p .build
	$(SWIFT) build --build-tests 2>&1 | tee $(BUILD_LOG)
	@if grep -E "/(Sources|Tests)/.*(warning|error):" $(BUILD_LOG) | grep -v "/.build/"; then \
	  echo "build: warnings are errors in Tandem's code" >&2; exit 1; fi

lint:
	$(SWIFT) format lint --strict --recursive Sources Tests Package.swift
	./dev/lint-cores.sh

fmt:
	$(SWIFT) format --in-place --recursive Sources Tests Package.swift

test: build lint
	@set -o pipefail; $(SWIFT) test --skip-build 2>&1 | tee .build/tandem-test.log
	@# The shipped policy library's own cases, on the real engine with a virtual clock.
	.build/debug/tandem policy test policies
	@# The same seed must give the same trace in two separate processes (hash seeds differ).
	@a=$$(.build/debug/tandem sim-registry --seed 77 | grep "trace hash"); \
	 b=$$(.build/debug/tandem sim-registry --seed 77 | grep "trace hash"); \
	 if [ "$$a" != "$$b" ]; then echo "determinism across processes failed: $$a vs $$b" >&2; exit 1; fi; \
	 echo "determinism across processes: ok ($$a)"
	@# Every example scenario over a few seeds, through the real command: zero violations.
	@for f in examples/scenarios/*.lua; do \
	  out=$$(.build/debug/tandem sim $$f --seeds $${SIM_SEEDS:-1..3}) || { echo "$$out"; exit 1; }; \
	  echo "sim $$f: $$(echo "$$out" | tail -1)"; \
	done
	@a=$$(.build/debug/tandem sim examples/scenarios/canary.lua --seed 5 | head -1); \
	 b=$$(.build/debug/tandem sim examples/scenarios/canary.lua --seed 5 | head -1); \
	 if [ "$$a" != "$$b" ]; then echo "mesh determinism across processes failed: $$a vs $$b" >&2; exit 1; fi; \
	 echo "mesh determinism across processes: ok ($$a)"
	@$(MAKE) --no-print-directory examples-run
	@n=$$(grep -oE "Test run with [0-9]+ tests" .build/tandem-test.log | grep -oE "[0-9]+" | tail -1); \
	 echo "tests: $$n passed, 0 failed"

# The generated references (tests fail when a checked-in copy is stale).
docs:
	$(SWIFT) build --product tandem
	.build/debug/tandem docs config > docs/config.md
	.build/debug/tandem docs lua > docs/lua-api.md
	.build/debug/tandem docs cli > docs/cli.md
	.build/debug/tandem policy defs > policies/tandem.d.lua

# Every example end to end (examples/*/run.sh: real processes, each checks what it shows).
# The load test runs short here; run it yourself for the seed's table (see its README).
examples: build examples-run
examples-run:
	@for f in examples/*/run.sh; do \
	  echo "== $$f"; \
	  QUIET=1 DURATION=1 CONCURRENCY="10 50" $$f || exit 1; \
	done

# A small mesh on this machine (embedded registry, users ×2 and orders behind `tandem run`),
# then the same registry code on virtual time surviving a leader crash, then a mesh scenario.
# Builds only the binary (the tests are not needed to watch it work), with one progress line.
demo: deps
	@echo "building tandem (the first build takes several minutes; log: $(BUILD_LOG))"
	@mkdir -p .build; set -o pipefail; $(SWIFT) build --product tandem 2>&1 | tee $(BUILD_LOG) | \
	  awk '/^\[[0-9]+\/[0-9]+\]/ { printf "\r  %-78.78s", $$0; fflush() } END { printf "\r%-80s\r", "" }' \
	  || { tail -30 $(BUILD_LOG); exit 1; }
	@echo "== Tandem demo: a mesh of three services with sidecars and the embedded registry =="
	examples/users-orders/run.sh
	@echo
	@echo "== The registry's real Raft, MVCC store and WAL on virtual time: the leader crashes =="
	.build/debug/tandem sim-registry --seed 7 --leader-crash
	@echo "Replay any seed with: .build/debug/tandem sim-registry --seed N   (make sim SEEDS=1..1000 for a sweep)"
	@echo
	@echo "== A whole mesh on virtual time: a retry storm held back by the retry budget (docs/simulation.md) =="
	.build/debug/tandem sim examples/scenarios/retry-storm.lua --trace 8

sim: build
	.build/debug/tandem sim-registry --seeds $${SEEDS:-1..1000}

bench: deps
	./dev/build-release.sh TandemBench
	.build/release/TandemBench

# The deployable binary (flags in dev/build-release.sh: static Swift runtime, no run-time
# exclusivity checks; the tests run the checked debug build).
release: deps
	./dev/build-release.sh tandem
	@echo "built .build/release/tandem"

clean:
	rm -rf .build
