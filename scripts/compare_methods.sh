#!/usr/bin/env bash
# Train the nine methods of the paper's Table 5 (or those of METHODS) on the same shards, seed and steps, then
# compare them.
#
#   scripts/compare_methods.sh [CORPUS.jsonl] [OUT_DIR]
#
# CORPUS (default ../shared/data/dwiki-dev.jsonl, one document a line) is split into training documents and its
# last HELDOUT_DOCS, held out; both become shards, a SentencePiece tokenizer is trained on the training shards, the
# baseline is trained first and serves as the reference model of rho1 and spacy_refloss, and `lacy-stream compare`
# scores all nine runs on the held-out shards. Each run validates on the held-out shards too, keeps its final
# checkpoint only, writes its output to OUT_DIR/logs/METHOD.log and prints one line: its last progress line. Runs
# already finished are kept (a rerun resumes).
#
# Settings, from the environment (default):
#   STEPS            optimizer steps of each run (300)
#   SEQ_LEN          tokens per training window (256)
#   BATCH            windows per micro-batch, in training and in compare's held-out batches (8)
#   VOCAB            pieces of the SentencePiece tokenizer (4000)
#   PRESET           the model preset (tiny)
#   WORKERS          dataloader workers of each run, which annotate with spaCy (1)
#   HELDOUT_DOCS     documents held out (60)
#   COMPARE_BATCHES  held-out batches that compare scores (16)
#   CONFIG           the job config each run starts from, before the settings above (tiny_cpu)
#   METHODS          the methods trained after the baseline, which always runs first (all eight others)
#   TRAIN_ARGS       more `lacy-stream train` settings for every run, e.g. "--train.seed=1 --train.probe_windows=8"
#   LACY             the lacy-stream command, e.g. "python -m lacy_stream" (lacy-stream)
set -euo pipefail

CORPUS=${1:-../shared/data/dwiki-dev.jsonl}
OUT=${2:-runs/compare-methods}
STEPS=${STEPS:-300}
SEQ_LEN=${SEQ_LEN:-256}
BATCH=${BATCH:-8}
VOCAB=${VOCAB:-4000}
PRESET=${PRESET:-tiny}
WORKERS=${WORKERS:-1}
HELDOUT_DOCS=${HELDOUT_DOCS:-60}
COMPARE_BATCHES=${COMPARE_BATCHES:-16}
CONFIG=${CONFIG:-tiny_cpu}
LACY=${LACY:-lacy-stream}
METHODS=${METHODS:-loss_based rho1 llm_judge spacy lacy spacy_refloss lacy_ignorefacts lacy_ignore}
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"

mkdir -p "$OUT/source" "$OUT/logs"
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
    local log="$OUT/logs/$method.log"
    if ! $LACY train --config "$CONFIG" \
        --data.shards="$OUT/train" --data.seq_len="$SEQ_LEN" --data.batch_size="$BATCH" \
        --data.num_workers="$WORKERS" --tokenizer.path="$OUT/tokenizer.model" --model.preset="$PRESET" \
        --train.steps="$STEPS" --train.run_dir="$OUT/runs/$method" --train.val_shards="$OUT/heldout" \
        --checkpoint.keep=1 --loss.method="$method" --annotation.cache_dir="$OUT/label-cache" \
        ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} "$@" > "$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "$method: training failed (its whole output: $log)" >&2
        exit 1
    fi
    local last
    last=$(grep -E '^(step [0-9]+/[0-9]+ |nothing to do)' "$log" | tail -n 1 || true)
    local note=""
    case $method in
        # their loss counts the ignored tokens as 0 (the log says so too): it is not comparable with the others'
        lacy_ignorefacts|lacy_ignore) note="  (its loss leaves the ignored tokens out)" ;;
    esac
    printf '%-17s %s%s\n' "$method" "$last" "$note"
}

train baseline
runs=("$OUT/runs/baseline")
for method in $METHODS; do
    case $method in
        rho1|spacy_refloss) train "$method" --loss.reference="$OUT/runs/baseline" ;;
        *) train "$method" ;;
    esac
    runs+=("$OUT/runs/$method")
done

$LACY compare --runs "${runs[@]}" --val-shards "$OUT/heldout" --out "$OUT/comparison" \
    --batches "$COMPARE_BATCHES" --batch-size "$BATCH"
