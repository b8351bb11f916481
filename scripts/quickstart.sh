#!/usr/bin/env bash
# Quick start, end to end with the project's own tools, on a corpus every machine already has:
# the Python standard library's source.
#
#   1. tools/make_stdlib_corpus.py   stdlib .py files -> JSONL, one file a document (8 MB)
#   2. tools/train_tokenizer.py      a 4096-piece SentencePiece BPE tokenizer
#   3. tools/preprocess_data.py      JSONL -> Megatron .bin/.idx
#   4. pretrain_gpt.py               a small MoE (configs/quickstart_moe.yaml); validation loss falls
#
# Steps whose outputs exist are skipped (delete $DATA to redo them). Extra arguments go to
# pretrain_gpt.py, e.g. `scripts/quickstart.sh --train-iters 300 --save runs/quickstart/ckpt`.
# About 2 minutes on 2 idle CPU cores (much longer when other jobs share them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-data/quickstart}
RUN=${RUN:-runs/quickstart}
mkdir -p "$DATA" "$RUN"

if [ ! -f "$DATA/stdlib.jsonl" ]; then
  "$PYTHON" tools/make_stdlib_corpus.py --output "$DATA/stdlib.jsonl" --max-mb 8
fi
if [ ! -f "$DATA/tokenizer.model" ]; then
  "$PYTHON" tools/train_tokenizer.py --input "$DATA/stdlib.jsonl" --model-prefix "$DATA/tokenizer" \
    --vocab-size 4096 --model-type bpe
fi
if [ ! -f "$DATA/stdlib_text_document.idx" ]; then
  "$PYTHON" tools/preprocess_data.py --input "$DATA/stdlib.jsonl" --output-prefix "$DATA/stdlib" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --append-eod --workers 2 --log-interval 100
fi
"$PYTHON" pretrain_gpt.py --config configs/quickstart_moe.yaml \
  --data-path "$DATA/stdlib_text_document" \
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
  --data-cache-path "$DATA/cache" --tensorboard-dir "$RUN/tensorboard" "$@" 2>&1 | tee "$RUN/train.log"
