#!/usr/bin/env bash
# Runs every cargo-fuzz target for RUNS inputs (default 10^6) from its seeds,
# coverage-guided (libFuzzer, AddressSanitizer), and prints one line per target.
# A crash stops with libFuzzer's report and the input under fuzz/artifacts/.
set -euo pipefail
RUNS=${RUNS:-1000000}
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in router_event_json engine_msgpack request_frame http_body; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -runs="$RUNS" -max_len=8192 -print_final_stats=1 >"corpus/$t.log" 2>&1 || {
    tail -40 "corpus/$t.log"
    exit 1
  }
  secs=$(($(date +%s) - start))
  done_line=$(grep -E '^Done [0-9]+ runs' "corpus/$t.log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "corpus/$t.log" | tail -1)
  echo "$t: ${done_line:-no summary} (${cov:-cov: ?} edges, corpus $(ls "corpus/$t" | wc -l) inputs, ${secs}s with build)"
done
