"""Data loading and configuration errors: shards are checked (names, headers, token ids), batches are
random but reproducible and rank-disjoint, and every bad input stops the run with one line naming it, on
stderr and at the end of the run's log, without touching an earlier run's files."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_gpt as T
from conftest import REPO, cli, tiny_env


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())
    return path


def assert_one_line_error(rc, err, *needles):
    """Exit 2 and exactly one `error:` line on stderr naming every needle, no traceback."""
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def error_of(env, cwd, *needles):
    rc, err, _, log = cli(env, cwd)
    return assert_one_line_error(rc, err, *needles), log


def test_error_is_one_line_from_the_real_process(corpus, tmp_path):
    env = dict(os.environ, **tiny_env(corpus, RUN_ID="bad", CRAWLER_LOOPS="three"))
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.stderr == "error: CRAWLER_LOOPS='three' is not a valid int\n" and proc.returncode == 2


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


def test_sidecars_are_not_shards(corpus, tmp_path):
    """The upstream CaseOps byte sidecar fineweb_val_bytes_000000.bin sits beside the val shards: reading it
    as one would double the val tokens."""
    data = tmp_path / "data"
    shutil.copytree(corpus[0], data)
    n_val = len(T.load_val_tokens(str(data)))
    write_shard(data / "fineweb_val_bytes_000000.bin", np.arange(n_val) % 7)
    write_shard(data / "fineweb_train_bytes_000000.bin", range(1000))
    (data / "fineweb_val_000001.bin.tmp").write_bytes(b"partial")
    assert len(T.load_val_tokens(str(data))) == n_val
    assert [p.rsplit("/", 1)[1] for p in T.shard_paths(str(data), "val")] == ["fineweb_val_000000.bin"]
    assert all("bytes" not in p for p in T.shard_paths(str(data), "train"))


@pytest.mark.parametrize("case", ["missing_dir", "no_val", "bad_header", "truncated"])
def test_bad_data_fails_with_one_line(corpus, tmp_path, case):
    data = tmp_path / "data"
    shutil.copytree(corpus[0], data)
    if case == "missing_dir":
        shutil.rmtree(data)
        needles = ("DATA_PATH=", "no such folder", "cached_challenge_fineweb.py")
    elif case == "no_val":
        (data / "fineweb_val_000000.bin").unlink()
        needles = ("no fineweb_val_NNNNNN.bin shards",)
    elif case == "bad_header":
        write_shard(data / "fineweb_train_000000.bin", range(10), magic=7)
        needles = ("fineweb_train_000000.bin", "bad shard header")
    else:
        raw = (data / "fineweb_val_000000.bin").read_bytes()
        (data / "fineweb_val_000000.bin").write_bytes(raw[:-100])
        needles = ("fineweb_val_000000.bin", "truncated")
    error_of(tiny_env(corpus, DATA_PATH=data, RUN_ID="bad", ITERATIONS=1), tmp_path, *needles)


@pytest.mark.parametrize("split", ["val", "train"])
def test_token_ids_beyond_the_vocab_stop_at_start_up(corpus, tmp_path, split):
    """Shards of a larger tokenizer: one line naming the file, the largest id and VOCAB_SIZE, also as the
    last line of the failed run's log, instead of an IndexError mid-run."""
    data = tmp_path / "data"
    shutil.copytree(corpus[0], data)
    path = data / f"fineweb_{split}_000000.bin"
    tokens = T.open_shard(path).copy()
    tokens[len(tokens) // 2] = 700
    write_shard(path, tokens)
    line, _ = error_of(tiny_env(corpus, DATA_PATH=data, RUN_ID="ids", ITERATIONS=1), tmp_path,
                       f"fineweb_{split}_000000.bin", "token id 700", "VOCAB_SIZE=512", "(log: logs/ids_failed.txt)")
    assert (tmp_path / "logs/ids_failed.txt").read_text().strip().splitlines()[-1] == line  # says why it stopped


def test_missing_data_names_the_downloader_variant_of_its_path(corpus, tmp_path):
    """Paths in the downloader's layout (the record preset's CaseOps defaults) say which --variant fetches them."""
    variant = "sp8192_lossless_caps_caseops_v1_reserved"
    fetch = f"cached_challenge_fineweb.py --variant {variant}`"
    error_of(tiny_env(corpus, RUN_ID="v1", DATA_PATH=tmp_path / f"fineweb10B_{variant}"), tmp_path, "no such folder", fetch)
    tok = tmp_path / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    error_of(tiny_env(corpus, RUN_ID="v2", TOKENIZER_PATH=tok), tmp_path, f"TOKENIZER_PATH={tok}: no such file", fetch)
    error_of(tiny_env(corpus, RUN_ID="v3", TOKENIZER_PATH=tmp_path / "fineweb_8192_bpe.model"), tmp_path,
             "cached_challenge_fineweb.py --variant sp8192`")


def test_an_error_before_training_leaves_the_run_id_free(corpus, tmp_path):
    """A run that fails before training starts keeps its log as logs/<RUN_ID>_failed.txt (later failures append),
    so the same RUN_ID runs once the input is fixed; a run that trained keeps its RUN_ID."""
    bad = tiny_env(corpus, RUN_ID="again", ITERATIONS=1, QUANT_METHOD="rtn", EVAL_STRIDE=0, DATA_PATH=tmp_path / "none")
    for _ in range(2):
        error_of(bad, tmp_path, "no such folder", "(log: logs/again_failed.txt)")
    assert (tmp_path / "logs/again_failed.txt").read_text().count("error:") == 2
    rc, err, final, _ = cli(dict(bad, DATA_PATH=str(corpus[0])), tmp_path)
    assert rc == 0 and final["steps"] == 1, err
    error_of(bad, tmp_path, "RUN_ID=again is taken")


def test_shards_of_another_tokenizer_stop_at_start_up(corpus, tmp_path):
    """Shards and TOKENIZER_PATH from different tokenizers give a wrong bpb silently: ids beyond the tokenizer's
    pieces, or ids within them that decode to text re-encoding otherwise, stop the run before training."""
    import sentencepiece as spm
    data, tok, docs = corpus
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[3:] * 3), model_prefix=str(tmp_path / "other"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=3,
                                   pad_id=0, minloglevel=2)
    other = str(tmp_path / "other.model")
    error_of(tiny_env(corpus, TOKENIZER_PATH=other, RUN_ID="a"), tmp_path, f"do not come from TOKENIZER_PATH={other}",
             "val token id", "400 pieces")
    mine = tmp_path / "mine"  # val shards of the 400-piece tokenizer, read with the corpus's 512-piece one
    mine.mkdir()
    sp = spm.SentencePieceProcessor(model_file=other)
    write_shard(mine / "fineweb_val_000000.bin", np.concatenate([[T.BOS_ID] + sp.encode(d) for d in docs[:12]]))
    shutil.copy(data / "fineweb_train_000000.bin", mine)
    error_of(tiny_env(corpus, DATA_PATH=mine, RUN_ID="b"), tmp_path, f"do not come from TOKENIZER_PATH={tok}",
             "sample documents re-encode to other ids")
    rc, err, _, _ = cli(tiny_env(corpus, DATA_PATH=mine, TOKENIZER_PATH=other, RUN_ID="c", ITERATIONS=1,
                                 QUANT_METHOD="rtn", EVAL_STRIDE=0), tmp_path)
    assert rc == 0, err  # the matching pair runs


@pytest.mark.parametrize("var,value,needle", [
    ("CRAWLER_LOOPS", "three", "CRAWLER_LOOPS='three' is not a valid int"),
    ("MLP_ACT", "gelu", "MLP_ACT='gelu': allowed values are relu_sq, leaky_relu_sq"),
    ("WARMDOWN_FRAC", "1.5", "WARMDOWN_FRAC='1.5': must be between 0 and 1"),
    ("COMPILE", "yes", "COMPILE='yes' is not a valid flag"),
    ("CRAWLER_LOOP_ROPE_SCALES", "9,1,1", "give 2 positive values"),
    ("CRAWLER_LOOP_ROPE_SCALES", "nan,1", "give 2 positive values"),
    ("CRAWLER_LOOP_ROPE_SCALES", "inf,1", "give 2 positive values"),
    ("MATRIX_LR", "nan", "MATRIX_LR='nan': must be a finite number"),
    ("MATRIX_LR", "inf", "MATRIX_LR='inf': must be a finite number"),
    ("MAX_WALLCLOCK_SECONDS", "nan", "MAX_WALLCLOCK_SECONDS='nan': must be a finite number"),
    ("TRAIN_BATCH_TOKENS", "5000", "TRAIN_BATCH_TOKENS=5000 must split"),
    ("TOKENIZER_PATH", "/nonexistent/sp.model", "TOKENIZER_PATH=/nonexistent/sp.model: no such file"),
    ("VOCAB_SIZE", "100", "raise VOCAB_SIZE"),
    ("TTT_LORA_CHUNK", "256", "TTT_LORA_CHUNK=256: must be at most EVAL_SEQ_LEN=128"),
])
def test_bad_setting_fails_with_one_line(corpus, tmp_path, var, value, needle):
    env = tiny_env(corpus, RUN_ID="bad", ITERATIONS=1, TTT="lora" if var.startswith("TTT") else "off", **{var: value})
    error_of(env, tmp_path, needle)


def test_unknown_variable_sharing_a_prefix_or_close_to_ours_is_reported():
    env = {"CRAWLER_LOOP": "3", "EVAL_STIDE": "64", "HOME": "/root", "CRAWLER_LOOPS": "2", "ITERATONS": "9",
           "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1", "OMP_NUM_THREADS": "1", "PROFILE_AT": "5"}
    assert T.Hyperparameters(env).unknown_env == {"CRAWLER_LOOP": "CRAWLER_LOOPS", "EVAL_STIDE": "EVAL_STRIDE",
                                                  "ITERATONS": "ITERATIONS"}


def test_a_used_run_id_is_refused_and_nothing_is_touched(corpus, finished, tmp_path):
    """Rerunning a RUN_ID (two SMOKE=1 runs did) must not append to its log or overwrite its files."""
    cwd = finished[0]
    before = {p.name: p.read_bytes() for p in (cwd / "logs").iterdir()}
    error_of(tiny_env(corpus, RUN_ID="done", ITERATIONS=1), cwd, "RUN_ID=done is taken (logs/done.txt exists)")
    assert {p.name: p.read_bytes() for p in (cwd / "logs").iterdir()} == before


def test_unexpected_failure_is_logged_before_the_traceback(corpus, tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("CUDA out of memory\nmore detail")
    monkeypatch.setattr(T, "export", boom)
    with pytest.raises(RuntimeError):
        cli(tiny_env(corpus, RUN_ID="boom", ITERATIONS=1, EVAL_STRIDE=0), tmp_path)
    log = (tmp_path / "logs/boom.txt").read_text()
    assert log.strip().splitlines()[-1] == "error: RuntimeError: CUDA out of memory (traceback below)"


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
