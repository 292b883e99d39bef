"""train_gpt.py end to end on the CPU: a tiny crawler learns; torchrun with 2 ranks follows the same loss
curve as one process and ends with identical weights under the wall clock; the wall-clock budget leaves the
calibration reserve; an interrupt keeps what was trained; long phases print progress."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt as T
from conftest import REPO, cli, read_log, run_train, tiny_env, tiny_hparams


def step_losses(log):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) train_loss ([\d.]+)", log, re.M)}


def test_tiny_crawler_learns(finished, ln_vocab):
    cwd, final, log = finished
    losses = step_losses(log)
    assert losses[60] < losses[1] - 1.5
    assert final["val_loss"] < ln_vocab - 1.5, final["val_loss"]
    assert final["steps"] == 60 and final["world_size"] == 1 and final["rank_weights_identical"] is True
    assert final["val_tokens"] > 1000 and final["val_bytes"] > final["val_tokens"]
    for key in ("val_bpb", "live_val_bpb", "train_time_ms", "step_avg_ms", "tokens_per_s", "model_params",
                "peak_mem_mib", "seed", "attention", "config", "code_sha256", "gpu", "torch_version"):
        assert key in final
    assert final["config"]["crawler_loops"] == 2 and final["attention"] == "sdpa" and final["gpu"] == "cpu"
    assert final["env"]["CRAWLER_QAT"] == "1" and final["env"]["RUN_ID"] == "done" and "HOME" not in final["env"]
    assert "attention: sdpa (auto: no FlashAttention 3 or 4 importable on CUDA)" in log
    ckpt = torch.load(cwd / "logs/done_model.pt")  # final weights and model shape saved for re-export
    assert ckpt["config"]["model_dim"] == 64 and "blocks.2.mlp.fc.weight" in ckpt["model"]
    assert not list(cwd.glob("logs/*.tmp"))


def test_two_ranks_match_one_process(corpus, tmp_path):
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, WARMUP_STEPS=0, EMA_DECAY=0, EVAL_STRIDE=64, TTT="sgd",
                  TTT_CHUNK_TOKENS=4096, TTT_EPOCHS=1, TTT_BATCH_SEQS=32, QUANT_METHOD="rtn")
    rc, err, one, log1 = cli(tiny_env(corpus, RUN_ID="one", **common), tmp_path)  # 1 rank x 2 micro-batches
    assert rc == 0, err
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
    assert two["world_size"] == 2 and two["rank_weights_identical"] is True


def test_two_ranks_stay_identical_under_the_wall_clock(corpus, tmp_path):
    """The LR follows rank 0's clock on every rank: with a decay over the whole budget, per-rank clocks
    would give every rank a different LR at every step."""
    env = tiny_env(corpus, RUN_ID="wall", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3, WARMDOWN_FRAC=1,
                   QUANT_METHOD="rtn", EVAL_STRIDE=0, TRAIN_LOG_EVERY=1000)
    final, log = run_train(env, tmp_path, nproc=2)  # (how many steps fit in 3 s depends on the machine)
    assert final["rank_weights_identical"] is True, log[-2000:]
    assert "error:" not in log


def test_rank_mismatch_is_an_error_and_exit_code(tmp_path):
    lines, errors = [], []
    log = type("Log", (), {"__call__": lambda self, m: lines.append(m), "error": lambda self, m: errors.append(m)})()
    h = tiny_hparams(RUN_ID="x")
    result = dict(artifact_bytes=10, artifact_path="a", rank_weights_identical=False)
    assert T.finish(h, T.Run(log=log), result, dict(val_loss=1.0)) == 4
    assert T.finish(h, T.Run(log=log), dict(result, rank_weights_identical=True), dict(val_loss=1.0)) == 0
    assert lines[0].startswith('{"event": "final"') and '"rank_weights_identical": false' in lines[0]


@pytest.mark.parametrize("method,steps", [("gptq", 6), ("rtn", 10)])
def test_wall_clock_budget_leaves_the_calibration_reserve(corpus, tmp_path, monkeypatch, method, steps):
    """A fake clock that advances one second per training step: a 10 s budget trains until 10 s less the
    calibration reserve (4 s, only when the method calibrates), the LR decays with the elapsed share of that,
    and calibration reads training data inside the budget."""
    clock, real_step = [0.0], T.Trainer.step

    def step(self, *args):
        clock[0] += 1.0
        return real_step(self, *args)

    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T.Trainer, "step", step)
    env = tiny_env(corpus, RUN_ID=method, ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=4,
                   QUANT_METHOD=method, WARMDOWN_FRAC=1, MIN_LR_FRAC=0, LR_WARMUP_STEPS=0, EMA_DECAY=0,
                   TRAIN_LOG_EVERY=1, EVAL_STRIDE=0)
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    assert final["steps"] == steps and final["train_time_ms"] == 1000 * steps
    lrs = [float(m) for m in re.findall(r"^step \d+ train_loss [\d.]+ lr ([\d.]+)", log, re.M)]
    assert lrs == pytest.approx([1 - s / steps for s in range(steps)], abs=1e-3)
    assert f"training data last read at {steps:.1f}s of the 10s budget" in log
    assert "sliding" not in log and "sliding_val_bpb" not in final  # EVAL_STRIDE=0: no sliding eval


def test_step_lines_show_the_current_step_time_beside_the_mean(corpus, tmp_path, monkeypatch):
    """A fake clock on which step s takes s seconds: each step line's `now` is the mean over the steps since
    the previous line, beside the running mean over all steps."""
    clock, real_step, steps = [0.0], T.Trainer.step, [0]

    def step(self, *args):
        steps[0] += 1
        clock[0] += steps[0]
        return real_step(self, *args)

    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T.Trainer, "step", step)
    env = tiny_env(corpus, RUN_ID="now", ITERATIONS=8, TRAIN_LOG_EVERY=4, WARMUP_STEPS=0, QUANT_METHOD="rtn", EVAL_STRIDE=0)
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    lines = re.findall(r"^step (\d+) train_loss [\d.]+ lr [\d.]+ ([\d.]+)ms/step \(now ([\d.]+)\)", log, re.M)
    got = {int(s): (float(mean), float(now)) for s, mean, now in lines}
    assert got == {1: (1000, 1000), 2: (1500, 2000), 3: (2000, 3000), 4: (2500, 4000), 5: (3000, 5000),
                   8: (4500, 7000)}


def wait_for(path, text, proc):
    """Polls a log until `text` appears (the process must still be running)."""
    deadline = time.monotonic() + 600  # a safety net for a hung process, not a speed requirement
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def start(env, cwd, nproc):
    """`bash run.sh` with nproc ranks, from a copy of the repository in cwd (its logs/ land there)."""
    for name in ("train_gpt.py", "run.sh"):
        (cwd / name).write_bytes((REPO / name).read_bytes())
    return subprocess.Popen(["bash", "run.sh"], cwd=cwd, env=dict(os.environ, NPROC_PER_NODE=str(nproc), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupt_saves_the_weights_and_they_export(corpus, tmp_path):
    """Ctrl-C of `NPROC_PER_NODE=1 bash run.sh`: one line on how to export, no traceback, exit 130."""
    env = tiny_env(corpus, RUN_ID="int", ITERATIONS=100000, TRAIN_LOG_EVERY=1)
    proc = start(env, tmp_path, nproc=1)
    wait_for(tmp_path / "logs/int.txt", "step 3 train_loss", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGINT and err == "", err
    (line,) = [ln for ln in out.splitlines() if "EXPORT_FROM=" in ln]
    assert "EXPORT_FROM=logs/int_interrupted.pt" in line
    steps = int(re.search(r"interrupted after step (\d+)", line)[1])
    final, log = read_log(tmp_path, "int")
    assert final is None and steps >= 3 and f"training: {steps} steps" in log
    ckpt = torch.load(tmp_path / "logs/int_interrupted.pt")
    assert ckpt["config"]["num_flat_layers"] == 2 and not list(tmp_path.glob("logs/*.tmp"))
    # the saved weights export with no shape in the environment: the checkpoint carries it
    data, tok, _ = corpus
    rc, err, redo, _ = cli(dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), RUN_ID="redo", COMPILE="0",
                                EXPORT_FROM="logs/int_interrupted.pt", QUANT_METHOD="rtn", EVAL_STRIDE="0"), tmp_path)
    assert rc == 0, err
    assert redo["steps"] == 0 and redo["config"]["model_dim"] == 64 and redo["config"]["train_seq_len"] == 128


def test_interrupt_of_two_ranks(corpus, tmp_path):
    """torchrun forwards the signal to both ranks: they stop after the same step, rank 0 saves, all exit (torchrun
    then reports the signal it got with a traceback of its own)."""
    env = tiny_env(corpus, RUN_ID="int2", ITERATIONS=100000, TRAIN_LOG_EVERY=1)
    proc = start(env, tmp_path, nproc=2)
    wait_for(tmp_path / "logs/int2.txt", "step 3 train_loss", proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=600)
    assert proc.returncode != 0
    log = (tmp_path / "logs/int2.txt").read_text()
    assert len(re.findall(r"interrupted after step \d+: weights saved to logs/int2_interrupted.pt", log)) == 1
    assert torch.load(tmp_path / "logs/int2_interrupted.pt")["model"]


@pytest.mark.parametrize("batch,world,micro,expected", [
    (4096, 1, 0, (32, 1)), (4096, 2, 0, (16, 1)), (786_432, 1, 0, (48, 8)), (786_432, 8, 0, (48, 1)),
    (786_432, 3, 0, (32, 4)), (786_432, 1, 2048 * 4, (4, 96))])
def test_micro_batch_defaults_to_whole_sequences_that_fit(batch, world, micro, expected):
    h = T.Hyperparameters(dict(TRAIN_BATCH_TOKENS=str(batch), MICRO_BATCH_TOKENS=str(micro), TRAIN_SEQ_LEN="2048"
                               if batch > 4096 else "128"))
    assert T.batch_layout(h, world) == expected
    with pytest.raises(T.ConfigError, match="TRAIN_BATCH_TOKENS=5000 must split"):
        T.batch_layout(T.Hyperparameters(dict(TRAIN_BATCH_TOKENS="5000", TRAIN_SEQ_LEN="128")), 1)


def test_progress_lines_at_most_every_interval(monkeypatch):
    lines = []
    monkeypatch.setattr(T, "PROGRESS_SECONDS", 3600.0)
    quiet = T.Progress(lines.append, "eval", 100, "tokens")
    quiet(50)
    assert not lines  # a phase shorter than the interval prints nothing
    monkeypatch.setattr(T, "PROGRESS_SECONDS", 0.0)
    loud = T.Progress(lines.append, "eval", 100, "tokens")
    loud(50)
    loud(100)  # the end is the phase's own result line, not a progress line
    assert len(lines) == 1 and lines[0].startswith("eval: 50/100 tokens (50%), ") and lines[0].endswith("tokens/s")
    monkeypatch.setattr(T, "PROGRESS_SECONDS", 0.05)
    with T.heartbeat(lines.append, "compress (brotli)"):
        time.sleep(0.3)
    assert any(ln.startswith("compress (brotli): still running") for ln in lines[1:])


def test_long_phases_report_progress(corpus, monkeypatch):
    """GPTQ reports its rounds and the evaluation its tokens and rate while they run."""
    data, tok, _ = corpus
    monkeypatch.setattr(T, "PROGRESS_SECONDS", 0.0)
    lines = []
    run = T.Run(log=lines.append)
    h = tiny_hparams(QUANT_METHOD="loop_gptq")
    torch.manual_seed(0)
    model = T.GPT(h)
    loader = T.TrainLoader(T.shard_paths(str(data), "train"), 128, 0, 0, 1)
    plan = T.export_plan(h, model)
    T.quantize_model(model, plan, h, list(loader.next_step(4, 1)), run, {})
    assert [ln for ln in lines if ln.startswith("quantize: 1/")] and len(plan.rounds) > 5
    tokens = T.load_val_tokens(str(data))[:3000]
    T.evaluate(model, tokens, T.load_tokenizer_luts(str(tok), 512), h, run, stride=64, label="sliding eval")
    assert re.search(r"^sliding eval: [\d,]+/2,999 tokens \(\d+%\), [\d,.]+ tokens/s$", "\n".join(lines), re.M)


def test_full_config_on_cpu_warns(corpus):
    data, tok, _ = corpus
    lines = []
    T.prepare(T.Hyperparameters(dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), COMPILE="0")), T.Run(log=lines.append))
    assert any(ln.startswith("warning: training on the CPU") for ln in lines)
    lines.clear()
    T.prepare(tiny_hparams(DATA_PATH=str(data), TOKENIZER_PATH=str(tok)), T.Run(log=lines.append))
    assert lines and not any("warning" in ln for ln in lines)


def test_measured_export_reserve_keeps_calibration_inside_the_budget(corpus, tmp_path, monkeypatch):
    """GPTQ_RESERVE_SECONDS unset: the export (checkpoint, calibration, quantization) is timed once before the clock
    starts, and training stops early enough for it: here it takes 4 s on a fake clock (training steps 1 s each), so
    with the 1.1 margin a 10 s budget trains until 5.6 s (5 steps) and the training data is last read at 9 s."""
    clock, real_step, real_quantize = [0.0], T.Trainer.step, T.quantize_model

    def step(self, *args):
        clock[0] += 1.0
        return real_step(self, *args)

    def quantize(*args):
        clock[0] += 4.0
        return real_quantize(*args)

    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T.Trainer, "step", step)
    monkeypatch.setattr(T, "quantize_model", quantize)
    env = tiny_env(corpus, RUN_ID="measured", ITERATIONS=30, MAX_WALLCLOCK_SECONDS=10, QUANT_METHOD="gptq",
                   EMA_DECAY=0, EVAL_STRIDE=0)
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    assert "export reserve: 4.4s = 4.0s measured" in log and "training stops by 5.6s" in log
    assert final["steps"] == 5 and "training data last read at 9.0s of the 10s budget" in log
    assert not list((tmp_path / "logs").glob("measured_reserve*"))  # the measurement's checkpoint is gone


@pytest.mark.parametrize("target,error,code", [("quantize_model", KeyboardInterrupt, 130), ("compress", RuntimeError, None)])
def test_weights_are_saved_before_quantization_and_survive_its_failure(corpus, tmp_path, monkeypatch, target, error, code):
    """An interrupt during GPTQ or a crash in compression: the float checkpoint is already on disk, the log says how
    to export it, and EXPORT_FROM does."""
    def fail(*args, **kwargs):
        raise error("stop here")
    monkeypatch.setattr(T, target, fail)
    env = tiny_env(corpus, RUN_ID="kept", ITERATIONS=3, EVAL_STRIDE=0, QUANT_METHOD="rtn")
    if code is None:
        with pytest.raises(error):
            cli(env, tmp_path)
    else:
        assert cli(env, tmp_path)[0] == code
    log = (tmp_path / "logs/kept.txt").read_text()
    assert (f"export stopped ({error.__name__}); the trained weights are saved: export them with "
            "EXPORT_FROM=logs/kept_model.pt python3 train_gpt.py") in log
    monkeypatch.undo()
    rc, err, final, _ = cli(tiny_env(corpus, RUN_ID="exported", EXPORT_FROM=tmp_path / "logs/kept_model.pt",
                                     QUANT_METHOD="rtn", EVAL_STRIDE=0), tmp_path)
    assert rc == 0 and final["roundtrip_val_loss"] > 0, err
