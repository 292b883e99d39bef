"""train_gpt.py end to end on the CPU: a tiny crawler learns, and torchrun with 2 ranks follows the same
loss curve as one process for the same global batch."""
import re

import pytest
import torch

from conftest import run_train, tiny_env


def step_losses(log):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) train_loss ([\d.]+)", log, re.M)}


def test_tiny_crawler_learns(corpus, tmp_path, ln_vocab):
    final, log = run_train(tiny_env(corpus, ITERATIONS=60, TRAIN_LOG_EVERY=10, RUN_ID="learn"), tmp_path)
    losses = step_losses(log)
    assert losses[60] < losses[1] - 1.5
    assert final["val_loss"] < ln_vocab - 1.5, final["val_loss"]
    assert final["steps"] == 60 and final["world_size"] == 1
    assert final["val_tokens"] > 1000 and final["val_bytes"] > final["val_tokens"]
    for key in ("val_bpb", "live_val_bpb", "train_time_ms", "step_avg_ms", "tokens_per_s", "model_params",
                "peak_mem_mib", "seed", "attention", "config", "code_sha256"):
        assert key in final
    assert final["config"]["crawler_loops"] == 2 and final["attention"] == "sdpa"
    assert "flash-attn not installed" in log
    state = torch.load(tmp_path / "logs" / "learn_model.pt")  # final weights saved for re-export
    assert "blocks.2.mlp.fc.weight" in state and not list(tmp_path.glob("logs/*.tmp"))


def test_two_ranks_match_one_process(corpus, tmp_path):
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, WARMUP_STEPS=0, EMA_DECAY=0, EVAL_STRIDE=64, TTT="sgd",
                  TTT_CHUNK_TOKENS=16384, TTT_EPOCHS=1, TTT_BATCH_SEQS=32, QUANT_METHOD="rtn")
    one, log1 = run_train(tiny_env(corpus, RUN_ID="one", **common), tmp_path)  # 1 rank x 2 micro-batches
    two, log2 = run_train(tiny_env(corpus, RUN_ID="two", **common), tmp_path, nproc=2)  # 2 ranks x 1
    assert "step = 1 ranks x 2 x" in log1 and "step = 2 ranks x 1 x" in log2
    l1, l2 = step_losses(log1), step_losses(log2)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 2e-4, (s, l1[s], l2[s])  # logged with 4 decimals
    assert l1[6] < l1[1] - 0.3
    assert abs(one["roundtrip_val_loss"] - two["roundtrip_val_loss"]) < 1e-4
    assert one["sliding_val_loss"] == pytest.approx(two["sliding_val_loss"], rel=1e-6)  # windows split by rank
    assert one["ttt_val_loss"] == pytest.approx(two["ttt_val_loss"], rel=1e-4)  # TTT grads all-reduced
    assert one["val_loss"] == one["ttt_val_loss"] < one["sliding_val_loss"]
    assert one["val_tokens"] == two["val_tokens"] and one["val_bytes"] == two["val_bytes"]
    assert two["world_size"] == 2
