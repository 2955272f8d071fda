#!/usr/bin/env bash
# Device checks within 10 minutes of timeouts (a lent GPU has 15 minutes in all). The runtime
# benchmark on CUDA: one table naming the device, written into the
# "runtime-gpu" section of docs/benchmarks.md (raw figures also to $OUT/runtime-gpu.json when $OUT is set);
# then the serving benchmark (bench/serve_bench.py --device cuda: a real edit, the server with --concurrency 1 and
# unbounded, with and without churn, patch vs restart; about 3 minutes) into "serve-gpu".
#
#   bench/gpu.sh                       # on a machine with a CUDA GPU
#   bench/gpu.sh --device cpu          # dry run on CPU: same code path, prints the table, writes nothing
#   PYTHON=/path/to/python bench/gpu.sh --gib 2    # extra flags go to bench/runtime.py
#
# Needs torch (CUDA build), transformers, peft, safetensors and this repository. Without the converted
# SmolLM2 directory it uses a random model of SmolLM2-135M's shape (timings depend on shapes only).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$DEVICE" = cpu ]; then
  WRITE=(--no-write)
  SERVE_WRITE=(--no-write --seconds 8 --rounds 1)
else
  WRITE=(--section runtime-gpu)
  SERVE_WRITE=(--section serve-gpu --seconds 10 --rounds 2)
fi
JSON=()
SERVE_JSON=()
if [ -n "${OUT:-}" ]; then JSON=(--json "$OUT/runtime-gpu.json"); SERVE_JSON=(--json "$OUT/serve-gpu.json"); fi
"$PY" -c 'import torch, sys; d = sys.argv[1]; sys.exit(0 if not d.startswith("cuda") or torch.cuda.is_available() else "error: no CUDA device visible to torch; run with --device cpu for a dry run")' "$DEVICE"
timeout 200 "$PY" bench/runtime.py --device "$DEVICE" --repeats 10 --gib 1 --densities 0.01,0.1 --summary \
  "${WRITE[@]}" "${JSON[@]+"${JSON[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}"
# Serving: the same server code path with --device cuda (latency with and without churn, patch vs restart).
timeout 200 "$PY" bench/serve_bench.py --device "$DEVICE" "${SERVE_WRITE[@]}" "${SERVE_JSON[@]+"${SERVE_JSON[@]}"}" \
  || echo "serve benchmark failed or timed out (exit $?); going on" >&2
# Editing on the device: one default-preset edit and one evaluate of it (seconds printed by the commands;
# the timings go to stdout and, with $OUT, to edit-gpu.json / evaluate-gpu.json).
if MODEL=$("$PY" -m roselora_export.cli demo-model 2>/dev/null | tail -1) && [ -d "$MODEL" ]; then
  EDIT_DIR=$(mktemp -d)
  trap 'rm -rf "$EDIT_DIR"' EXIT
  timeout 120 "$PY" -m roselora_export.cli edit --model "$MODEL" --requests examples/requests/landmark.jsonl \
    --out "$EDIT_DIR/adapter" --device "$DEVICE" --no-progress --json > "$EDIT_DIR/edit.json"
  "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print("edit on %s: %.2f s training, %d steps, answer %r" % (sys.argv[2], s["seconds"], s["steps_run"], s["answers"][0]["after"]))' "$EDIT_DIR/edit.json" "$DEVICE"
  START=$SECONDS
  timeout 90 "$PY" -m roselora_export.cli evaluate --model "$MODEL" --requests examples/requests/landmark.jsonl \
    --adapter "$EDIT_DIR/adapter" --device "$DEVICE" --json > "$EDIT_DIR/evaluate.json"
  echo "evaluate on $DEVICE: $((SECONDS - START)) s whole process"
  if [ -n "${OUT:-}" ]; then cp "$EDIT_DIR/edit.json" "$OUT/edit-gpu.json"; cp "$EDIT_DIR/evaluate.json" "$OUT/evaluate-gpu.json"; fi
fi
