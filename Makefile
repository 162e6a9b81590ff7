# kvrouter — the front door. `make run` runs the main job, `make test` passes the tests.
SHARED ?= ../shared
# Debian installs nats-server in /usr/sbin, which a non-login PATH may lack.
export PATH := $(PATH):/usr/sbin
CARGO  ?= cargo
OUT    := out

.PHONY: run sim bench-policies bench-http bench-engines index test lint unit interop faults deploy-check bench-build bench-index fuzz deps clean

## The main job: the OpenAI API with KV-aware routing over 4 mock workers, all in
## one process (in-memory discovery and events) on http://127.0.0.1:8000. Ctrl-C stops it.
run: deps
	$(CARGO) build --release -p kvrouter
	./target/release/kvrouter serve --http-host 127.0.0.1 --http-port 8000 --router-mode kv --workers 4

## Offline simulator: replay the Mooncake trace (12,031 requests) through 8 simulated
## engines behind the real router core, once per routing mode, in virtual time.
sim:
	$(CARGO) build --release -p kvrouter
	mkdir -p $(OUT)
	./target/release/kvrouter sim --trace $(SHARED)/data/mooncake_conversation_trace.jsonl \
	  --workers 8 --speedup 6 --json $(OUT)/sim.json --plot $(OUT)/sim.svg
	@echo "results: $(OUT)/sim.json, chart: $(OUT)/sim.svg"

## HTTP load: serve (8 mock workers, engines x1000) driven by an open-loop replay of the
## trace at SPEEDUP x its recorded rate (300 = ~950 requests/s); one JSON line per run.
## The load generator runs niced so it does not preempt the server on a 2-core machine.
SPEEDUP ?= 300
## Issue 13's policy matrix: kvrouter vs peers' policies on four traces (~6 min).
bench-policies:
	$(CARGO) build --release -p kvrouter
	tools/sim_policies.sh ./target/release/kvrouter $(SHARED) $(OUT)/policies
	@echo "results: $(OUT)/policies/policies-*.{txt,json,svg}"

bench-http:
	$(CARGO) build --release -p kvrouter
	mkdir -p $(OUT)
	./target/release/kvrouter serve --http-host 127.0.0.1 --http-port 18181 --workers 8 \
	  --router-mode kv --speedup-ratio 1000 > $(OUT)/bench-serve.log 2>&1 & echo $$! > $(OUT)/bench-serve.pid
	sleep 2
	nice -n 19 ./target/release/kvrouter bench http --url http://127.0.0.1:18181 --limit 6000 \
	  --trace $(SHARED)/data/mooncake_conversation_trace.jsonl --speedup $(SPEEDUP) | tee -a $(OUT)/bench-http.jsonl; \
	  status=$$?; kill $$(cat $(OUT)/bench-serve.pid); exit $$status
	python3 tools/plot_bench_http.py $(OUT)/bench-http.jsonl $(OUT)/bench-http.svg
	@echo "chart: $(OUT)/bench-http.svg"

## kvrouter kv / round-robin vs sglang-router 0.3.2 cache_aware over the same stand-in
## vLLM engines (2 and 4 engines, and 4 with small caches), streaming chat with 31 shared
## system prompts; sglang-router is installed from the Python registry into out/ first (~6 min).
bench-engines:
	$(CARGO) build --release -p kvrouter
	mkdir -p $(OUT)
	[ -x $(OUT)/sglang-router/bin/python ] || { python3 -m venv $(OUT)/sglang-router && \
	  $(OUT)/sglang-router/bin/pip install -q --disable-pip-version-check sglang-router==0.3.2; }
	python3 tools/bench_engines.py --kvrouter target/release/kvrouter \
	  --sglang-python $(OUT)/sglang-router/bin/python --out $(OUT)/bench-engines
	@echo "results: $(OUT)/bench-engines.json, chart: $(OUT)/bench-engines.svg"

## Replay the trace's KV events and lookups through the index alone (one JSON line).
index: $(OUT)/conv.kvops
	$(CARGO) build --release -p kvrouter
	./target/release/kvrouter bench index --ops $(OUT)/conv.kvops

$(OUT)/conv.kvops:
	mkdir -p $(OUT)
	python3 $(SHARED)/tools/kv-ops-gen $(SHARED)/data/mooncake_conversation_trace.jsonl -o $@

## Everything CI checks: formatting, lints (warnings are errors), all tests, the
## interop tests against the engines' own KV-event publishers, the fault suite and
## the deployment manifests.
test: deps lint unit interop faults deploy-check

deps:
	@./scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

## vLLM 0.21 / 0.33 and SGLang 0.5.12 / 0.5.23 publishing through their own kv_events.py
## (taken from their wheels, downloaded once into out/interop) to kvrouter's subscriber.
interop:
	./scripts/interop-setup.sh $(OUT)/interop
	KVROUTER_INTEROP=$(abspath $(OUT)/interop) KVROUTER_INTEROP_PYTHON=$(abspath $(OUT)/interop/venv/bin/python) \
	  $(CARGO) test -p kvrouter-engines --test interop -- --ignored

## The fault suite, over real etcd and NATS (bounded: about two minutes): worker kill -9
## with and without migration, SIGTERM drains, services leaving etcd, etcd replaced
## (single server and a 3-member cluster), KV events lost or forged (NATS restart, gap
## repair, restarted router, phantom workers), slow and malformed HTTP clients.
faults:
	$(CARGO) test -p kvrouter --test faults -- --ignored --nocapture
	$(CARGO) test -p kvrouter-runtime --test etcd_heal
	$(CARGO) test -p kvrouter-router --test recovery --test forged --test durable --test migrate
	$(CARGO) test -p kvrouter --test edge

## The Kubernetes manifests, without a cluster: schemas (kubernetes-validate from the
## Python registry, installed once into out/), and every kvrouter container's flags
## and environment run through `kvrouter … --check-config`; and every metric the
## Grafana dashboard queries, scraped from a running `serve`.
deploy-check:
	[ -x $(OUT)/deploy-venv/bin/kubernetes-validate ] || { python3 -m venv $(OUT)/deploy-venv && \
	  $(OUT)/deploy-venv/bin/pip install -q --disable-pip-version-check kubernetes-validate==1.37.0; }
	$(CARGO) build -p kvrouter
	$(OUT)/deploy-venv/bin/python tools/check_deploy.py target/debug/kvrouter $(OUT)/deploy-venv/bin/kubernetes-validate
	python3 tools/check_dashboard.py target/debug/kvrouter

## Compile (not run) the criterion benchmarks.
bench-build:
	$(CARGO) bench --workspace --no-run

## Side-by-side with dynamo-kv-router 1.6.1 (builds bench/dynamo-compare; ~10 min).
bench-index:
	$(CARGO) build --release -p kvrouter
	cd bench/dynamo-compare && $(CARGO) build --release
	KVROUTER_SHARED=$(abspath $(SHARED)) python3 tools/bench_index.py

## Fuzz every decoder (KV-event JSON + index, engines' msgpack + translation,
## request-plane frames, HTTP bodies + template + tokenizer) for RUNS inputs
## each (default 10^6; installs cargo-fuzz on first use; ~15 min with the build).
fuzz:
	RUNS=$(or $(RUNS),1000000) tools/fuzz.sh

clean:
	$(CARGO) clean
	rm -rf $(OUT)
