#!/usr/bin/env bash
# The canonical run of train_gpt.py (through torchrun on several GPUs). Every variable below is a default:
# set it outside to override.
#   bash run.sh                          # 4 flat + 1 crawler x 3 loops on all visible GPUs, 600 s cap
#   NUM_FLAT_LAYERS=6 SEED=42 bash run.sh
#   bash run.sh leg3                     # a preset from presets/ (values set outside still win)
#   NPROC_PER_NODE=1 MAX_WALLCLOCK_SECONDS=300 bash run.sh   # one GPU, same global batch by accumulation
#   SMOKE=1 bash run.sh                  # offline end-to-end check, CPU or GPU (about 70 s on 2 CPU cores)
# README.md documents every variable.
set -euo pipefail
cd "$(dirname "$0")"
set -a  # every variable assigned below (and in presets) is exported to train_gpt.py

if [ "${SMOKE:-0}" = 1 ]; then
  # Tiny corpus from the docstrings of the installed Python standard library, a 512-piece tokenizer
  # trained on it, shards, and a tiny model: the whole pipeline with no download. The sizes below win
  # over a preset's; the preset's layout and other settings still apply (SMOKE=1 bash run.sh record).
  smoke=data/datasets/smoke
  if [ ! -f "$smoke/fineweb_val_000000.bin" ]; then
    mkdir -p data/tokenizers
    python3 data/stdlib_corpus.py --out data/datasets/smoke_docs.jsonl
    python3 data/build_shards.py --inputs data/datasets/smoke_docs.jsonl --val-docs 20 --shuffle-seed 0 \
      --train-tokenizer 512 --tokenizer-out data/tokenizers/smoke_512 --out-dir "$smoke" --overwrite
  fi
  : "${DATA_PATH:=$smoke}" "${TOKENIZER_PATH:=data/tokenizers/smoke_512.model}" "${VOCAB_SIZE:=512}"
  : "${MODEL_DIM:=64}" "${NUM_HEADS:=4}" "${NUM_KV_HEADS:=2}"
  : "${TRAIN_SEQ_LEN:=128}" "${TRAIN_BATCH_TOKENS:=4096}" "${ITERATIONS:=120}"
  : "${MAX_WALLCLOCK_SECONDS:=0}" "${WARMUP_STEPS:=2}" "${MUON_MOMENTUM_WARMUP_STEPS:=40}" "${TRAIN_LOG_EVERY:=20}"
  : "${COMPILE:=0}" "${BIGRAM_VOCAB_SIZE:=512}" "${GPTQ_CALIB_TOKENS:=16384}" "${TTT_LORA_RANK:=8}" "${TTT_LORA_CHUNK:=128}"
  : "${OMP_NUM_THREADS:=1}"  # one CPU thread: two spin-waiting ones are 4x slower on a busy 2-core machine
  : "${NPROC_PER_NODE:=1}" "${RUN_ID:=smoke_$(date +%Y%m%d_%H%M%S)}"  # a new RUN_ID per run: logs are never reused
fi

if [ $# -gt 0 ]; then
  preset="presets/$1.env"
  [ -f "$preset" ] || { echo "run.sh: no preset '$1' (have: $(ls presets | sed 's/\.env$//' | tr '\n' ' '))" >&2; exit 1; }
  source "$preset"
fi
if [ "${SMOKE:-0}" = 1 ]; then
  : "${NUM_FLAT_LAYERS:=2}" "${CRAWLER_LOOPS:=2}" "${EMA_DECAY:=0.95}"  # when no preset sets them
fi

# Data: the downloader's layout for the vocabulary (python3 data/cached_challenge_fineweb.py --variant sp8192)
: "${VOCAB_SIZE:=1024}"
: "${DATA_PATH:=./data/datasets/fineweb10B_sp${VOCAB_SIZE}}"
: "${TOKENIZER_PATH:=./data/tokenizers/fineweb_${VOCAB_SIZE}_bpe.model}"
: "${SEED:=1337}"
# Layout: NUM_FLAT_LAYERS unique blocks (NUM_ENCODER_LAYERS before the crawler, default half) around
# NUM_CRAWLER_LAYERS shared blocks run CRAWLER_LOOPS times; effective depth = flat + crawler x loops.
: "${MODEL_DIM:=512}"
: "${NUM_HEADS:=8}"
: "${NUM_KV_HEADS:=4}"
: "${NUM_FLAT_LAYERS:=4}"
: "${NUM_CRAWLER_LAYERS:=1}"
: "${CRAWLER_LOOPS:=3}"
: "${CRAWLER_LOOP_ROPE_SCALES:=}"           # e.g. 9,1,1: loop 0 sees 9x longer RoPE wavelengths
: "${MLP_MULT:=3.0}"
: "${CRAWLER_MLP_MULT:=6.0}"
: "${MLP_ACT:=leaky_relu_sq}"
: "${XSA_BLOCKS:=all}"
: "${QK_GAIN_INIT:=4.0}"
: "${ROPE_DIMS:=16}"
: "${BIGRAM_VOCAB_SIZE:=2048}"
: "${SMEAR_GATE:=1}"
# Batch and schedule: 786,432 tokens per step at any GPU count (micro-batches of up to 98,304 tokens per
# rank, accumulation fills the gap).
: "${TRAIN_SEQ_LEN:=2048}"
: "${TRAIN_BATCH_TOKENS:=786432}"
: "${MAX_WALLCLOCK_SECONDS:=600}"
: "${ITERATIONS:=20000}"
: "${LR_WARMUP_STEPS:=20}"
: "${WARMDOWN_FRAC:=0.7}"
: "${MIN_LR_FRAC:=0.1}"
# Optimizers and weight averaging
: "${MATRIX_LR:=0.03}"
: "${EMBED_LR:=0.035}"
: "${SCALAR_LR:=0.025}"
: "${MUON_WD:=0.04}"
: "${EMA_DECAY:=0.997}"
: "${TRAIN_LOG_EVERY:=100}"
: "${RUN_ID:=$(date +%Y%m%d_%H%M%S)_seed${SEED}}"
set +a
if ! ls "$DATA_PATH"/fineweb_val_[0-9][0-9][0-9][0-9][0-9][0-9].bin >/dev/null 2>&1 || [ ! -f "$TOKENIZER_PATH" ]; then
  echo "run.sh: no FineWeb shards in $DATA_PATH or no tokenizer at $TOKENIZER_PATH." >&2
  folder=$(basename "$DATA_PATH")  # the downloader's layout names its variant (the record preset's: CaseOps)
  case "$folder" in fineweb10B_sp*) variant=${folder#fineweb10B_} ;; *) variant=sp$VOCAB_SIZE ;; esac
  echo "Fetch them with:  python3 data/cached_challenge_fineweb.py --variant $variant --train-shards 80" >&2
  echo "(or point DATA_PATH/TOKENIZER_PATH at your own shards, or try SMOKE=1 bash run.sh)" >&2
  exit 1
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
script=train_gpt.py
if [ "${PROFILE:-0}" = 1 ]; then
  script=scripts/profile_steps.py  # train_gpt.py plus a CUDA profile of two training steps (README: Speed)
fi
if [ "$NPROC_PER_NODE" = 1 ]; then
  exec python3 "$script"  # one process needs no launcher, and Ctrl-C then prints only the script's own line
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" "$script"
