#!/usr/bin/env bash
# Issue 13's policy matrix: kvrouter's `kv` and `kv-sticky` against the peers'
# policies, round-robin and the oracle, on the conversation trace and three
# synthetic traces, 8 workers, each at an arrival rate where round-robin's
# p90 TTFT is above 2 s. Writes $OUT/policies-<trace>.{json,svg,txt}.
# Usage: tools/sim_policies.sh KVROUTER SHARED_DIR OUT_DIR
set -euo pipefail
K=$1 SHARED=$2 OUT=$3
mkdir -p "$OUT"
MODES=round-robin,kv,kv-sticky,sglang-cache-aware,prefix-hash,llm-d,oracle
for shape in small-families large-families sessions; do
  "$K" synth-trace --shape "$shape" --requests 8000 --rate 10 --seed 0 --out "$OUT/$shape.jsonl"
done
run() { # name trace speedup [extra flags]
  local name=$1 trace=$2 x=$3; shift 3
  "$K" sim --trace "$trace" --workers 8 --speedup "$x" --router-mode "$MODES" --no-progress \
    --json "$OUT/policies-$name.json" --plot "$OUT/policies-$name.svg" "$@" | tee "$OUT/policies-$name.txt"
}
# The production trace keeps the engines' default cache (16,384 blocks of 64
# tokens: its oracle is 27 %); the synthetic ones get a quarter of it, so that
# their shared prefixes outgrow the fleet's cache or one worker's.
run conversation "$SHARED/data/mooncake_conversation_trace.jsonl" 6 &
run small-families "$OUT/small-families.jsonl" 8 --num-gpu-blocks 4096
wait
run large-families "$OUT/large-families.jsonl" 2 --num-gpu-blocks 4096 &
run sessions "$OUT/sessions.jsonl" 2.5 --num-gpu-blocks 4096
wait
