#!/usr/bin/env bash
# Train the nine methods of the paper's Table 5 on the same shards, seed and steps, then compare them.
#
#   scripts/compare_methods.sh [CORPUS.jsonl] [OUT_DIR]
#
# CORPUS (default ../shared/data/dwiki-dev.jsonl) is split into training documents and HELDOUT_DOCS held-out
# ones; both become shards, a SentencePiece tokenizer is trained on the training shards, the baseline is
# trained first and serves as the reference model of rho1 and spacy_refloss, and `lacy-stream compare`
# scores all nine runs on the held-out shards. Runs already finished are kept (a rerun resumes).
# Sizes: STEPS, SEQ_LEN, BATCH, VOCAB, WORKERS, PRESET and HELDOUT_DOCS from the environment.
set -euo pipefail

CORPUS=${1:-../shared/data/dwiki-dev.jsonl}
OUT=${2:-runs/compare-methods}
STEPS=${STEPS:-300}
SEQ_LEN=${SEQ_LEN:-256}
BATCH=${BATCH:-8}
VOCAB=${VOCAB:-4000}
WORKERS=${WORKERS:-1}
PRESET=${PRESET:-tiny}
HELDOUT_DOCS=${HELDOUT_DOCS:-60}
LACY=${LACY:-lacy-stream}
CONFIG=${CONFIG:-tiny_cpu}

mkdir -p "$OUT/source"
if [[ ! -f "$OUT/train/manifest.json" ]]; then
    total=$(wc -l < "$CORPUS")
    head -n $((total - HELDOUT_DOCS)) "$CORPUS" > "$OUT/source/train.jsonl"
    tail -n "$HELDOUT_DOCS" "$CORPUS" > "$OUT/source/heldout.jsonl"
    $LACY make-shards "$OUT/source/train.jsonl" --out "$OUT/train" --docs-per-shard 64 --prefix train
    $LACY make-shards "$OUT/source/heldout.jsonl" --out "$OUT/heldout" --docs-per-shard 64 --prefix heldout
fi
if [[ ! -f "$OUT/tokenizer.model" ]]; then
    $LACY train-tokenizer --shards "$OUT/train" --vocab-size "$VOCAB" --out "$OUT/tokenizer.model"
fi

train() {
    local method=$1
    shift
    echo "== $method"
    $LACY train --config "$CONFIG" \
        --data.shards="$OUT/train" --data.seq_len="$SEQ_LEN" --data.batch_size="$BATCH" \
        --data.num_workers="$WORKERS" --tokenizer.path="$OUT/tokenizer.model" --model.preset="$PRESET" \
        --train.steps="$STEPS" --train.run_dir="$OUT/runs/$method" --loss.method="$method" \
        --annotation.cache_dir="$OUT/label-cache" "$@"
}

train baseline
runs=("$OUT/runs/baseline")
for method in loss_based rho1 llm_judge spacy lacy spacy_refloss lacy_ignorefacts lacy_ignore; do
    case $method in
        rho1|spacy_refloss) train "$method" --loss.reference="$OUT/runs/baseline" ;;
        *) train "$method" ;;
    esac
    runs+=("$OUT/runs/$method")
done

$LACY compare --runs "${runs[@]}" --val-shards "$OUT/heldout" --out "$OUT/comparison" \
    --batches "${COMPARE_BATCHES:-16}" --batch-size "$BATCH"
