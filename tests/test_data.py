"""Data loading and configuration errors: shards are checked, batches are random but reproducible and
rank-disjoint, and every bad input stops the run with one line naming it."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_gpt as T
from conftest import REPO, tiny_env


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())
    return path


def run_script(env, cwd):
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_shard_header_checks(tmp_path):
    good = write_shard(tmp_path / "fineweb_train_000000.bin", range(100))
    assert list(T.open_shard(good)[:3]) == [0, 1, 2]
    with pytest.raises(T.ConfigError, match="bad_magic.bin: bad shard header"):
        T.open_shard(write_shard(tmp_path / "bad_magic.bin", range(10), magic=123))
    with pytest.raises(T.ConfigError, match="bad_version.bin: bad shard header"):
        T.open_shard(write_shard(tmp_path / "bad_version.bin", range(10), version=2))
    with pytest.raises(T.ConfigError, match="short.bin: header says 50 tokens.*truncated"):
        T.open_shard(write_shard(tmp_path / "short.bin", range(10), count=50))
    (tmp_path / "tiny.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(T.ConfigError, match="tiny.bin: bad shard header"):
        T.open_shard(tmp_path / "tiny.bin")


@pytest.mark.parametrize("case", ["missing_dir", "no_val", "bad_header", "truncated"])
def test_bad_data_fails_with_one_line(corpus, tmp_path, case):
    data = tmp_path / "data"
    shutil.copytree(corpus[0], data)
    if case == "missing_dir":
        shutil.rmtree(data)
        needles = ("DATA_PATH=", "no such folder", "cached_challenge_fineweb.py")
    elif case == "no_val":
        (data / "fineweb_val_000000.bin").unlink()
        needles = ("no fineweb_val_*.bin shards",)
    elif case == "bad_header":
        write_shard(data / "fineweb_train_000000.bin", range(10), magic=7)
        needles = ("fineweb_train_000000.bin", "bad shard header")
    else:
        raw = (data / "fineweb_val_000000.bin").read_bytes()
        (data / "fineweb_val_000000.bin").write_bytes(raw[:-100])
        needles = ("fineweb_val_000000.bin", "truncated")
    env = tiny_env(corpus, DATA_PATH=data, RUN_ID="bad", ITERATIONS=1)
    assert_one_line_error(run_script(env, tmp_path), *needles)


@pytest.mark.parametrize("var,value,needle", [
    ("CRAWLER_LOOPS", "three", "CRAWLER_LOOPS='three' is not a valid int"),
    ("MLP_ACT", "gelu", "MLP_ACT='gelu': allowed values are relu_sq, leaky_relu_sq"),
    ("WARMDOWN_FRAC", "1.5", "WARMDOWN_FRAC='1.5': must be between 0 and 1"),
    ("COMPILE", "yes", "COMPILE='yes' is not a valid flag"),
    ("CRAWLER_LOOP_ROPE_SCALES", "9,1,1", "give 2 positive values"),
    ("TRAIN_BATCH_TOKENS", "5000", "TRAIN_BATCH_TOKENS=5000 must split"),
    ("TOKENIZER_PATH", "/nonexistent/sp.model", "TOKENIZER_PATH=/nonexistent/sp.model: no such file"),
    ("VOCAB_SIZE", "100", "raise VOCAB_SIZE"),
])
def test_bad_setting_fails_with_one_line(corpus, tmp_path, var, value, needle):
    env = tiny_env(corpus, RUN_ID="bad", ITERATIONS=1, **{var: value})
    assert_one_line_error(run_script(env, tmp_path), needle)


def test_unknown_variable_sharing_a_prefix_is_reported():
    h = T.Hyperparameters({"CRAWLER_LOOP": "3", "EVAL_STIDE": "64", "HOME": "/root", "CRAWLER_LOOPS": "2"})
    assert h.unknown_env == ["CRAWLER_LOOP", "EVAL_STIDE"]


def make_loader(tmp_path, rank=0, world=1, seed=1, seq_len=8):
    paths = [write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(i * 1000, i * 1000 + 161) % 65536)
             for i in range(2)]
    return T.TrainLoader(paths, seq_len, seed, rank, world)


def window_starts(batches):
    return [int(x[r, 0]) for x, _ in batches for r in range(x.size(0))]


def test_loader_is_seeded_random_disjoint_and_exhaustive(tmp_path):
    a = [window_starts(make_loader(tmp_path).next_step(2, 2)) for _ in range(1)]
    b = [window_starts(make_loader(tmp_path).next_step(2, 2)) for _ in range(1)]
    c = [window_starts(make_loader(tmp_path, seed=2).next_step(2, 2)) for _ in range(1)]
    assert a == b and a != c
    # targets are inputs shifted by one
    x, y = next(make_loader(tmp_path).next_step(3, 1))
    assert (x[:, 1:] == y[:, :-1]).all() and x.shape == (3, 8)
    # two ranks split the same global step: disjoint, and together the one-rank batch
    one = window_starts(make_loader(tmp_path).next_step(2, 2))
    r0 = window_starts(make_loader(tmp_path, 0, 2).next_step(1, 2))
    r1 = window_starts(make_loader(tmp_path, 1, 2).next_step(1, 2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)
    # one epoch = every window once (2 shards x 20 windows of 8+1 tokens), then a reshuffled, shifted grid
    loader = make_loader(tmp_path)
    epoch = window_starts(b for _ in range(10) for b in loader.next_step(2, 2))
    assert len(epoch) == len(set(epoch)) == 40
    assert sorted(epoch) == sorted([i * 1000 + 8 * j for i in range(2) for j in range(20)])
    nxt = window_starts(loader.next_step(2, 2))
    assert loader.epoch == 1 and all(s % 8 == nxt[0] % 8 for s in nxt) and nxt[0] % 8 != 0
