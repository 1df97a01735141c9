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
	scripts/plugin.sh $(BIN)/consul-overlay $(PLUGIN_NAME):$(PLUGIN_TAG)

# The tests' container image, FROM scratch with Debian's busybox-static.
.PHONY: busybox-image
busybox-image:
	scripts/busybox-image.sh consul-overlay-test/busybox:latest
