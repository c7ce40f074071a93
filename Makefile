# keybroker — run `make help` for the targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install the system packages (SoftHSM2, swtpm, tpm2-tools, protoc, node, ...) when missing and the pinned npm packages of test/oidc-provider
	scripts/install-deps.sh

.PHONY: build
build: ## Build keybrokerd and keybrokerctl into bin/
	$(GO) build -o $(BIN)/ ./cmd/keybrokerd ./cmd/keybrokerctl

BACKEND ?= pkcs11

.PHONY: run
run: ## Dev mode: daemon in the foreground on SoftHSM2 (or BACKEND=tpm: swtpm) under .keybroker/dev, key "demo"
	$(MAKE) --no-print-directory build
	BACKEND=$(BACKEND) scripts/dev-run.sh

.PHONY: run-cluster
run-cluster: ## Three replicas on a 3-member etcd and one SoftHSM2 behind p11-kit server, under .keybroker/cluster
	$(MAKE) --no-print-directory build
	scripts/run-cluster.sh

.PHONY: test
test: deps check-proto vet ## Everything CI runs: deps, generated-code check, vet, all tests with -race on real SoftHSM2
	$(GO) test -race -count=1 -timeout 15m ./...

.PHONY: test-fresh
test-fresh: ## What CI runs: `make run`, `make test` and the README's service install (systemd) in a fresh Debian root (root; commit first)
	scripts/fresh-machine.sh

.PHONY: bench
bench: build ## Benchmark matrix vs in-process hardware (SoftHSM2, swtpm, GetJWKS, many tenants), one table; BENCH_DURATION=5s per cell
	scripts/bench.sh

FUZZTIME ?= 60s

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZTIME each (default 60s)
	@set -e; for t in \
	  "./kms FuzzValidateName" "./kms FuzzSignerOpts" \
	  "./pop FuzzParseJWS" "./pop FuzzJWK" "./pop FuzzECDSADERToJOSE" \
	  "./internal/store FuzzDecode" "./internal/config FuzzParse" "./internal/audit FuzzVerify"; do \
	  set -- $$t; echo "== $$2"; $(GO) test -run '^$$' -fuzz "^$$2$$" -fuzztime $(FUZZTIME) $$1; done

.PHONY: soak
soak: ## Long resilience runs: 1,000-goroutine mixed load for 10 s, HSM and TPM restarts
	KEYBROKER_SOAK=1 $(GO) test -race -count=1 -timeout 30m -run 'TestMixedLoad|TestRecoversFromHSMRestart|TestHungHSM|Restart|Hung' ./internal/server ./hsm ./tpm

.PHONY: vet
vet: ## gofmt check and go vet
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...

.PHONY: proto
proto: ## Regenerate the gRPC code from api/proto (pinned plugins)
	scripts/protogen.sh

.PHONY: check-proto
check-proto: ## Fail when the committed generated code is stale
	scripts/check-proto.sh

.PHONY: clean
clean: ## Remove build output (keeps .keybroker/dev, the dev token and its keys)
	rm -rf $(BIN)

.PHONY: clean-dev
clean-dev: ## Delete the dev token and all its keys
	rm -rf .keybroker/dev
