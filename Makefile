# kvrouter — the front door. `make run` runs the main job, `make test` passes the tests.
SHARED ?= ../shared
CARGO  ?= cargo
OUT    := out

.PHONY: run test lint unit bench-build bench-index fuzz deps clean

## The main job today: replay the Mooncake production trace through the KV index
## (kv-ops/1 workload from shared/tools/kv-ops-gen) and print the JSON report.
run: $(OUT)/conv.kvops
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
