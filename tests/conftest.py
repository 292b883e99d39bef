"""Shared fixtures: a tiny offline corpus (stdlib docstrings plus non-ASCII documents), a SentencePiece
model trained on it with the challenge's settings, shards written by data/build_shards.py, and helpers
that run train_gpt.py with a tiny crawler config on the CPU."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as T  # noqa: E402

VOCAB = 512
NON_ASCII = ["Un café naïve − 5 € à l'été, déjà vu.", "Größe: 3 µm ≤ 5 µm; 東京 and 日本語 text 🙂 ok.",
             "Em dash — and en dash – and “quotes” plus ½ and ℃."]

TINY = dict(MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", NUM_FLAT_LAYERS="2", NUM_CRAWLER_LAYERS="1",
            CRAWLER_LOOPS="2", TRAIN_SEQ_LEN="128", MICRO_BATCH_TOKENS="2048", TRAIN_BATCH_TOKENS="4096",
            MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="1", COMPILE="0", BIGRAM_VOCAB_SIZE="256", BIGRAM_DIM="16",
            VOCAB_SIZE=str(VOCAB), EVAL_BATCH_SEQS="16", MATRIX_LR="0.02", EMBED_LR="0.05", SCALAR_LR="0.02",
            MUON_MOMENTUM_WARMUP_STEPS="10", WARMDOWN_FRAC="0.3", EMA_DECAY="0.9", GPTQ_CALIB_TOKENS="4096")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(data dir, tokenizer path, val documents): 30 val docs, 3 of them non-ASCII."""
    tmp = tmp_path_factory.mktemp("corpus")
    stdlib = tmp / "stdlib.jsonl"
    subprocess.run([sys.executable, str(REPO / "data/stdlib_corpus.py"), "--out", str(stdlib), "--max-bytes", "1200000"],
                   check=True, capture_output=True)
    docs = [json.loads(line)["text"] for line in stdlib.read_text().splitlines()]
    docs = NON_ASCII + docs
    with open(tmp / "docs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    data = tmp / "shards"
    subprocess.run([sys.executable, str(REPO / "data/build_shards.py"), "--inputs", str(tmp / "docs.jsonl"),
                    "--val-docs", "30", "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp / "sp"),
                    "--out-dir", str(data)], check=True, capture_output=True)
    return data, tmp / "sp.model", docs[:30]


def tiny_env(corpus, **extra):
    data, tok, _ = corpus
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(env, cwd, nproc=1, timeout=600, expect_rc=0):
    """Runs train_gpt.py (plain or under torchrun); returns (final JSON record, log text)."""
    script = str(REPO / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (Path(cwd) / "logs" / f"{env['RUN_ID']}.txt").read_text()
    final = [json.loads(line) for line in log.splitlines() if line.startswith('{"event": "final"')]
    assert len(final) == 1
    return final[0], log


@pytest.fixture(scope="session")
def ln_vocab():
    return math.log(VOCAB)


def tiny_hparams(**extra):
    return T.Hyperparameters(dict(TINY, **{k: str(v) for k, v in extra.items()}))


def train_tiny(data, steps, schedule=False, **extra):
    """A tiny model trained in-process for `steps` steps on the corpus shards (constant LR, or the run's
    warmup/warmdown schedule); returns (model, loader)."""
    h = tiny_hparams(DATA_PATH=data, **extra)
    torch.manual_seed(0)
    model = T.GPT(h)
    trainer = T.Trainer(model, model, T.build_optimizers(model, h, 0, 1, T.newton_schulz), h, 1,
                        contextlib.nullcontext())
    loader = T.TrainLoader(T.shard_paths(data, "train"), h.train_seq_len, 0, 0, 1)
    for s in range(steps):
        trainer.step(loader.next_step(32, 1), T.lr_multiplier(s, s / steps, h) if schedule else 1.0, s)
    return model, loader
