#!/usr/bin/env bash
# Prepares the interop tests: a venv with the publishers' own dependencies
# (msgspec, pyzmq, pydantic, psutil) and, from the engines' published wheels,
# only the files that publish KV events. Idempotent; everything goes under $1.
#   vLLM 0.21.0, 0.33.0 · SGLang 0.5.12, 0.5.23
set -euo pipefail
root=${1:?usage: interop-setup.sh DIR}
mkdir -p "$root/wheels"
if [ ! -x "$root/venv/bin/python" ]; then
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q --disable-pip-version-check \
    msgspec==0.23.0 pyzmq==27.3.0 pydantic==2.14.4 psutil==7.2.2
fi
for pkg in vllm==0.21.0 vllm==0.33.0 sglang==0.5.12 sglang==0.5.23; do
  name=${pkg%%==*}; version=${pkg##*==}; dir="$root/$name-$version"
  [ -f "$dir/.done" ] && continue
  echo "interop: fetching $pkg (wheel, no dependencies)…" >&2
  "$root/venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$root/wheels" "$pkg"
  wheel=$(ls "$root/wheels/$name-$version"-*.whl | head -1)
  python3 - "$wheel" "$dir" <<'PY'
import sys, zipfile
wanted = ("vllm/config/kv_events.py", "vllm/distributed/kv_events.py",
          "sglang/srt/disaggregation/kv_events.py", "sglang/srt/utils/network.py")
with zipfile.ZipFile(sys.argv[1]) as z:
    found = [n for n in z.namelist() if n in wanted]
    if not any(n.endswith("kv_events.py") for n in found):
        sys.exit(f"{sys.argv[1]}: no kv_events.py in the wheel")
    z.extractall(sys.argv[2], members=found)
PY
  rm -f "$wheel"
  touch "$dir/.done"
done
