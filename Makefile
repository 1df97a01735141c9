# consul-overlay build and test entry points. See README.md.
SHELL := /bin/bash
GO ?= go
BIN := bin
CONSUL_VERSION := v1.21.0
PLUGIN_NAME ?= consul-overlay
PLUGIN_TAG ?= latest
export CGO_ENABLED := 0

.PHONY: all build test unit lint consul plugin e2e bench clean

all: build

build:
	$(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/consul-overlay ./plugin

# Everything CI runs: lint, the unit and integration suites (real Consul,
# real kernel in network namespaces) and the Docker end-to-end suite.
test: lint consul build
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...

# Unit and integration tests only, no lint.
unit: consul
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Consul agent for the tests, built from the Go module proxy (pinned, cached).
consul: $(BIN)/consul
$(BIN)/consul: tools/consul/go.mod tools/consul/go.sum
	@mkdir -p $(BIN)
	cd tools/consul && GONOSUMDB=github.com/hashicorp/consul-awsauth CGO_ENABLED=0 \
		$(GO) build -trimpath -o ../../$(BIN)/consul github.com/hashicorp/consul
	@touch $@
	@$(BIN)/consul version | head -1

clean:
	rm -rf $(BIN) build

# Managed Docker plugin: the static daemon in a FROM scratch rootfs (with
# iptables), created disabled as $(PLUGIN_NAME):$(PLUGIN_TAG). Then
# `docker plugin enable $(PLUGIN_NAME):$(PLUGIN_TAG)`; networks use the
# driver name with its tag: -d $(PLUGIN_NAME):$(PLUGIN_TAG).
plugin: build
	PLUGIN_DATAPLANE=$(PLUGIN_DATAPLANE) scripts/plugin.sh $(BIN)/consul-overlay $(PLUGIN_NAME):$(PLUGIN_TAG)

# The tests' container image, FROM scratch with Debian's busybox-static.
.PHONY: busybox-image
busybox-image:
	scripts/busybox-image.sh consul-overlay-test/busybox:latest

# --- The two-host lab (lab/): make demo, make e2e ---------------------------

# Docker Compose v2 for the lab, built from the Go module proxy (pinned,
# cached like bin/consul; about 3 minutes on 2 cores the first time). The lab
# installs it as the docker CLI plugin when the CLI has none.
COMPOSE_VERSION := v2.40.3
.PHONY: compose lab-prereqs demo demo-down
compose: $(BIN)/docker-compose
$(BIN)/docker-compose: lab/tools/compose/go.mod lab/tools/compose/go.sum
	@mkdir -p $(BIN)
	cd lab/tools/compose && $(GO) build -trimpath \
		-ldflags '-s -w -X github.com/docker/compose/v2/internal.Version=$(COMPOSE_VERSION)' \
		-o ../../../$(BIN)/docker-compose github.com/docker/compose/v2/cmd
	@touch $@
	@$(BIN)/docker-compose version

# Installs from Debian what the lab needs and is missing; starts dockerd if
# none answers.
lab-prereqs:
	lab/prereqs.sh

# Two Docker hosts on this machine (its own engine and a second dockerd in a
# network namespace), a Consul server and an agent per host, consul-overlay
# installed on both engines from a local registry, and an example Compose
# application across both. make demo-down removes it all.
demo: lab-prereqs consul compose busybox-image plugin
	lab/demo.sh

demo-down:
	lab/down.sh

# The end-to-end suite on the same lab (internal/e2e, build tag e2e): one
# PASS/FAIL line per scenario at the end; the lab is torn down even when the
# suite fails or is interrupted. E2E_RUN selects scenarios, for example
# E2E_RUN='TestE2E/(compose-up|dns-by-name)$'; E2E_KEEP_LAB=1 leaves the lab up.
#
# ENGINE=29 runs the lab (both hosts) on engine 29.8.1 from `make engine`
# instead of the machine's 20.10 (lab/lib.sh, LAB_ENGINE); FIREWALL=nftables
# starts it with its nftables firewall backend. The plugin and the busybox
# image are then built on the lab's host A, not on the machine's engine.
E2E_RUN ?= .
ENGINE ?= 20.10
FIREWALL ?=
ifeq ($(ENGINE),29)
E2E_BUILDS := engine build
else
E2E_BUILDS := busybox-image plugin
endif
e2e: lab-prereqs consul compose $(E2E_BUILDS)
	@export LAB_ENGINE='$(ENGINE)' LAB_FIREWALL='$(FIREWALL)'; \
	trap '[ -n "$$E2E_KEEP_LAB" ] || lab/down.sh --owner e2e' EXIT; \
	$(GO) test -tags e2e -count=1 -v -timeout 30m -run '$(E2E_RUN)' ./internal/e2e/

# The chaos suite (internal/e2e/chaos_test.go, build tags e2e and chaos;
# `make e2e` does not run it): hosts, Consul and engines failing on the
# engine-29 lab (LAB_ID chooses the lab), with HOST_GRACE=$(CHAOS_HOST_GRACE)
# so that a lost host is reaped within the run, and CHAOS_CONSUL_SERVERS
# (3: the server scenario kills the leader; 1: the only server). CHAOS_RUN selects
# scenarios (CHAOS_RUN='TestChaos/chaos-fuzz-socket$'), CHAOS_RUNS the
# concurrent `docker run` per host of the kill -9 scenario (default 20),
# E2E_KEEP_LAB=1 leaves the lab up.
CHAOS_HOST_GRACE ?= 30s
CHAOS_CONSUL_SERVERS ?= 3
CHAOS_RUN ?= TestChaos
.PHONY: chaos
chaos: lab-prereqs consul compose engine build
	@export LAB_ENGINE=29 LAB_FIREWALL= LAB_HOST_GRACE='$(CHAOS_HOST_GRACE)' LAB_CONSUL_SERVERS='$(CHAOS_CONSUL_SERVERS)'; \
	trap '[ -n "$$E2E_KEEP_LAB" ] || lab/down.sh --owner e2e' EXIT; \
	$(GO) test -tags e2e,chaos -count=1 -v -timeout 30m -run '$(CHAOS_RUN)' ./internal/e2e/

# --- Docker engine 29 (tools/engine): make engine ----------------------------
# dockerd and docker-proxy 29.8.1 (module github.com/moby/moby/v2 v2.0.0-beta.24)
# and the runc 1.3.3 it needs, built from the Go module proxy into
# bin/engine-29/ (pinned, cached like bin/consul; about 8 minutes on 2 idle
# cores the first time). The lab and the Docker suites run on it with
# ENGINE=29 (make e2e ENGINE=29, make dockertest ENGINE=29); runc needs
# Debian's libseccomp-dev.
ENGINE29_VERSION := 29.8.1
ENGINE29 := $(BIN)/engine-29
.PHONY: engine
engine: $(ENGINE29)/dockerd $(ENGINE29)/runc
$(ENGINE29)/dockerd: tools/engine/go.mod tools/engine/go.sum
	@mkdir -p $(ENGINE29)
	cd tools/engine && CGO_ENABLED=0 $(GO) build -trimpath \
		-tags 'netgo osusergo static_build nri_no_wasm' \
		-ldflags '-X github.com/moby/moby/v2/dockerversion.Version=$(ENGINE29_VERSION)' \
		-o ../../$(ENGINE29)/ github.com/moby/moby/v2/cmd/dockerd github.com/moby/moby/v2/cmd/docker-proxy
	@touch $@
	@$(ENGINE29)/dockerd --version
$(ENGINE29)/runc: tools/engine/runc/go.mod tools/engine/runc/go.sum
	@mkdir -p $(ENGINE29)
	@dpkg -s libseccomp-dev >/dev/null 2>&1 || apt-get install -y libseccomp-dev
	cd tools/engine/runc && CGO_ENABLED=1 $(GO) build -trimpath \
		-tags 'seccomp urfave_cli_no_docs' \
		-ldflags '-X main.version=1.3.3' \
		-o ../../../$(ENGINE29)/runc github.com/opencontainers/runc
	@touch $@
	@$(ENGINE29)/runc --version | head -1

# The Docker suite (internal/dockertest, which `make test` runs on the
# machine's engine) alone, with CI=true. ENGINE=29 runs it on an engine
# 29.8.1 of its own in the network namespace codt-a (scripts/dockertest.sh;
# DOCKERTEST_ID=x: cox-a), torn down again even when the suite fails;
# DOCKERTEST_RUN selects tests.
.PHONY: dockertest
ifeq ($(ENGINE),29)
dockertest: consul engine build
	DOCKERTEST_RUN='$(DOCKERTEST_RUN)' scripts/dockertest.sh
else
dockertest: consul build
	CI=true $(GO) test -count=1 -v -timeout 20m -run '$(or $(DOCKERTEST_RUN),.)' ./internal/dockertest/
endif

# --- Benchmarks (bench/, results in BENCHMARKS.md) ---------------------------
# As root: consul-overlay side by side with its baselines (underlay, a
# hand-built kernel VXLAN, a bridge network, raw Consul writes), each figure
# with its ratio, recorded in BENCHMARKS.md (newest run first). About 12 min
# on 2 cores; BENCH_QUICK=1 runs a smaller version in under 3. BENCH_ONLY=a,b
# runs some: dataplane, jumbo, attach, network, forward, docker, ipam, scale,
# hosts, swarm, encrypted.
bench: consul build
	BENCH_QUICK='$(BENCH_QUICK)' BENCH_ONLY='$(BENCH_ONLY)' \
		$(GO) run ./bench/cmd/overlaybench -plugin $(BIN)/consul-overlay -out BENCHMARKS.md
