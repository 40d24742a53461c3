#!/usr/bin/env bash
# The long-context quality sweeps of docs/long_context.md, in the order they are run.
# Every command is resumable (a cell is saved as soon as it is measured), so running this
# script again continues where it stopped. They take hours on 2 cores: they are not tests.
#
#   bash scripts/quality_sweeps.sh            every stage, in order
#   bash scripts/quality_sweeps.sh gw0 gw1    only these stages
#
# Stages:
#   chunked16   chunked (fixed) at 16k (2x), depths 0-100 % step 10, seeds $SEEDS (default 0,1,2)
#   yarn16      YaRN at 16k, the same grid
#               (exact-auto at 16k and the 8k control are measured already)
#   weak16      vanilla, sink and linear at 16k, depths 0/25/50/75/100 %, seed 0
#   gw0, gw1    G/W sensitivity at 16k, depths 0-100 % step 20, seed 0 / seed 1:
#               G in {2,3,6,8} with W=1024, W in {256,512,2048} with G=4
#               (G=4 W=1024 is what exact-auto picks at 16k: its cells are the auto files')
#   passkey32   exact-auto and the better of chunked / YaRN at 32k (4x), depths step 20, seed 0
#   needle      needle at 16k for the better of chunked / YaRN, and the 8k control grid
#   perplexity  chunked, YaRN, linear, sink and vanilla at 8k / 16k / 32k
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
OUT=docs/long_context
SCRATCH=${TMPDIR:-/tmp}/quality_sweeps   # each command's own report; the docs' report merges the files
EVAL=("$PY" scripts/eval_long_context.py --threads "${THREADS:-2}" --no-progress --markdown "$SCRATCH/last.md" --plots "$SCRATCH")
STEP20=0,0.2,0.4,0.6,0.8,1
GW_METHODS=exact-g2-w1024,exact-g3-w1024,exact-g6-w1024,exact-g8-w1024,exact-g4-w256,exact-g4-w512,exact-g4-w2048

better_of_chunked_and_yarn() {   # the more accurate of the two on their shared 16k passkey cells
  "$PY" -m selfextend_gguf.evaluate.compare better-of --methods chunked,yarn --length 16384 \
    "$OUT"/passkey_16k_chunked-fixed.json "$OUT"/passkey_16k_yarn.json
}

stage() {
  echo "=== [$(date +%T)] $1" >&2
  case $1 in
    chunked16)
      "${EVAL[@]}" --tasks passkey --methods chunked --lengths 16k --seeds "${SEEDS:-0,1,2}" --out "$OUT"/passkey_16k_chunked-fixed.json ;;
    yarn16)
      "${EVAL[@]}" --tasks passkey --methods yarn --lengths 16k --seeds "${SEEDS:-0,1,2}" --out "$OUT"/passkey_16k_yarn.json ;;
    weak16)
      for method in vanilla sink linear; do
        "${EVAL[@]}" --tasks passkey --methods "$method" --lengths 16k --depths 0,0.25,0.5,0.75,1 --seeds 0 --out "$OUT/passkey_16k_$method.json"
      done ;;
    gw0|gw1)
      "${EVAL[@]}" --tasks passkey --methods "$GW_METHODS" --lengths 16k --depths "$STEP20" --seeds "${1#gw}" \
        --out "$OUT"/passkey_16k_gw.json ;;
    passkey32)
      "${EVAL[@]}" --tasks passkey --methods exact-auto --lengths 32k --depths "$STEP20" --seeds 0 --out "$OUT"/passkey_32k_exact-auto.json
      local other; other=$(better_of_chunked_and_yarn)
      "${EVAL[@]}" --tasks passkey --methods "$other" --lengths 32k --depths "$STEP20" --seeds 0 --out "$OUT/passkey_32k_$other.json" ;;
    needle)
      local other; other=$(better_of_chunked_and_yarn)
      "${EVAL[@]}" --tasks needle --methods "$other" --lengths 16k --depths 0.1,0.3,0.5,0.7,0.9 --seeds 0 --out "$OUT/needle_$other.json"
      "${EVAL[@]}" --tasks needle --methods exact-auto --lengths 8k --depths 0.1,0.3,0.5,0.7,0.9 --seeds 0 --out "$OUT"/needle_exact-auto_8k.json ;;
    perplexity)
      for method in chunked yarn linear sink vanilla; do
        "${EVAL[@]}" --tasks perplexity --methods "$method" --ppl-lengths 1x,2x,4x --out "$OUT/perplexity_$method.json"
      done ;;
    *) echo "unknown stage $1 (chunked16 yarn16 weak16 gw0 gw1 passkey32 needle perplexity)" >&2; return 2 ;;
  esac
}

stages=("$@")
((${#stages[@]})) || stages=(chunked16 yarn16 weak16 gw0 gw1 passkey32 needle perplexity)
for s in "${stages[@]}"; do stage "$s"; done
