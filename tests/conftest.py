"""Shared fixtures: a tiny offline corpus (stdlib docstrings plus non-ASCII documents), a SentencePiece
model trained on it with the challenge's settings, shards written by data/build_shards.py, one finished
tiny run whose log, artifact and checkpoint many tests reuse, and helpers that run train_gpt.py with a
tiny crawler config on the CPU (in-process through `cli`, or as a real process where signals or torchrun
matter)."""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: intra-op threads spin-wait on a loaded 2-core box

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
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
SHAPE = ("MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "NUM_FLAT_LAYERS", "NUM_CRAWLER_LAYERS", "CRAWLER_LOOPS",
         "TRAIN_SEQ_LEN", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "VOCAB_SIZE")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(data dir, tokenizer path, val documents): 12 val docs (about 10k tokens), 3 of them non-ASCII."""
    tmp = tmp_path_factory.mktemp("corpus")
    stdlib = tmp / "stdlib.jsonl"
    subprocess.run([sys.executable, str(REPO / "data/stdlib_corpus.py"), "--out", str(stdlib), "--max-bytes", "1200000"],
                   check=True, capture_output=True)
    docs = [json.loads(line)["text"] for line in stdlib.read_text().splitlines()]
    # no long document in val: TTT runs a document's chunks in sequence, and one of 44k tokens made each
    # TTT eval 10x slower; the long ones train
    val = NON_ASCII + [d for d in docs if len(d) <= 10_000][:9]
    docs = val + [d for d in docs if d not in val]
    with open(tmp / "docs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    data = tmp / "shards"
    subprocess.run([sys.executable, str(REPO / "data/build_shards.py"), "--inputs", str(tmp / "docs.jsonl"),
                    "--val-docs", "12", "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp / "sp"),
                    "--out-dir", str(data)], check=True, capture_output=True)
    return data, tmp / "sp.model", docs[:12]


def tiny_env(corpus, **extra):
    """The environment of a tiny run: our variables only (as train_gpt.cli reads them in-process)."""
    data, tok, _ = corpus
    env = dict(TINY, DATA_PATH=str(data), TOKENIZER_PATH=str(tok))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def read_log(cwd, run_id):
    """(final JSON record or None, log text) of logs/<run_id>.txt under cwd."""
    path = Path(cwd) / "logs" / f"{run_id}.txt"
    log = path.read_text() if path.exists() else ""
    final = [json.loads(line) for line in log.splitlines() if line.startswith('{"event": "final"')]
    assert len(final) <= 1
    return (final[0] if final else None), log


def cli(env, cwd):
    """train_gpt.cli in this process (no interpreter and torch start-up): (exit code, stderr, final, log)."""
    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = T.cli(env)
    finally:
        os.chdir(old)
    return (rc, err.getvalue()) + read_log(cwd, env["RUN_ID"])


def run_train(env, cwd, nproc=1, timeout=900, expect_rc=0):
    """Runs train_gpt.py as a real process (plain, or torchrun with nproc ranks); returns (final, log)."""
    script = str(REPO / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, env=dict(full, **env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_log(cwd, env["RUN_ID"])


@pytest.fixture(scope="session")
def finished(corpus, tmp_path_factory):
    """One finished tiny run, in-process: 60 steps with EMA, the crawler trained through QAT, loop-aware
    GPTQ, zstd artifact, float checkpoint, sliding eval. Returns (folder holding logs/, final, log)."""
    cwd = tmp_path_factory.mktemp("finished")
    rc, err, final, log = cli(tiny_env(corpus, RUN_ID="done", ITERATIONS=60, TRAIN_LOG_EVERY=10, COMPRESSOR="zstd",
                                       CRAWLER_QAT=1), cwd)
    assert rc == 0, err + log[-3000:]
    return cwd, final, log


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(path): a copy of a file in this test's tmp folder (tests may corrupt it)."""
    def make(path, name=None):
        return Path(shutil.copy(path, tmp_path / (name or Path(path).name)))
    return make


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
    trainer = T.Trainer(model, model, T.build_optimizers(model, h, T.Run(), T.newton_schulz), h, 1,
                        contextlib.nullcontext())
    loader = T.TrainLoader(T.shard_paths(data, "train"), h.train_seq_len, 0, 0, 1)
    for s in range(steps):
        lr, momentum = T.schedule(s, s / steps, h)
        trainer.step(loader.next_step(32, 1), lr if schedule else 1.0, momentum)
    return model, loader
