# kvrouter — the front door. `make run` runs the main job, `make test` passes the tests.
SHARED ?= ../shared
# Debian installs nats-server in /usr/sbin, which a non-login PATH may lack.
export PATH := $(PATH):/usr/sbin
CARGO  ?= cargo
OUT    := out

.PHONY: run index test lint unit bench-build bench-index fuzz deps clean

## The main job today: replay the Mooncake production trace (12,031 requests) through
## 8 simulated engines behind the real router, once per routing mode, in virtual time.
run:
	$(CARGO) build --release -p kvrouter
	mkdir -p $(OUT)
	./target/release/kvrouter sim --trace $(SHARED)/data/mooncake_conversation_trace.jsonl \
	  --workers 8 --speedup 6 --json $(OUT)/sim.json --plot $(OUT)/sim.svg
	@echo "results: $(OUT)/sim.json, chart: $(OUT)/sim.svg"

## Replay the trace's KV events and lookups through the index alone (one JSON line).
index: $(OUT)/conv.kvops
	$(CARGO) build --release -p kvrouter
	./target/release/kvrouter bench index --ops $(OUT)/conv.kvops

$(OUT)/conv.kvops:
	mkdir -p $(OUT)
	python3 $(SHARED)/tools/kv-ops-gen $(SHARED)/data/mooncake_conversation_trace.jsonl -o $@

## Everything CI checks: formatting, lints (warnings are errors), all tests.
test: deps lint unit

deps:
	@./scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

## Compile (not run) the criterion benchmarks.
bench-build:
	$(CARGO) bench --workspace --no-run

## Side-by-side with dynamo-kv-router 1.6.1 (builds bench/dynamo-compare; ~10 min).
bench-index:
	$(CARGO) build --release -p kvrouter
	cd bench/dynamo-compare && $(CARGO) build --release
	KVROUTER_SHARED=$(abspath $(SHARED)) python3 tools/bench_index.py

## Fuzz the event decoder + index for 60 s (installs cargo-fuzz on first use).
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/corpus/router_event_json
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run router_event_json corpus/router_event_json seeds/router_event_json -- -max_total_time=60

clean:
	$(CARGO) clean
	rm -rf $(OUT)
