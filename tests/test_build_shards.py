"""CPU tests for data/stdlib_corpus.py and data/build_shards.py (offline, a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
MADE_UP = "zorblaxquint"  # appears only in the val documents
N_VAL, SHARD_TOKENS, VOCAB = 40, 50_000, 512


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


stdlib_corpus, build_shards = load("stdlib_corpus"), load("build_shards")


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1
    assert not header[3:].any()
    n = int(header[2])
    assert path.stat().st_size == 256 * 4 + 2 * n
    return np.fromfile(path, dtype="<u2", offset=256 * 4)


def split_at_bos(tokens: np.ndarray, bos: int = 1) -> list[list[int]]:
    starts = np.flatnonzero(tokens == bos)
    assert len(starts) and starts[0] == 0, "stream must start with BOS"
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, [*starts[1:], len(tokens)])]


def val_documents() -> list[str]:
    """Single-line ASCII docs (stable under nmt_nfkc), each repeating MADE_UP many times."""
    rng = random.Random(0)
    words = "the model reads data from a file and returns 42 values in 2024 with care".split()
    return [" ".join(rng.choice(words) if rng.random() < 0.5 else MADE_UP for _ in range(300))
            for _ in range(N_VAL)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    corpus = tmp / "stdlib.jsonl"
    assert stdlib_corpus.main(["--out", str(corpus), "--max-bytes", "1500000"]) == 0
    val_file = tmp / "a_val.jsonl"
    val_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in val_documents()))
    out = tmp / "out"
    rc = build_shards.main(["--inputs", str(val_file), str(corpus), "--val-docs", str(N_VAL),
                            "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp / "tok" / "sp"),
                            "--shard-tokens", str(SHARD_TOKENS), "--out-dir", str(out)])
    assert rc == 0
    docs = val_documents() + [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    return {"tmp": tmp, "corpus": corpus, "out": out, "docs": docs, "val_file": val_file,
            "sp": spm.SentencePieceProcessor(model_file=str(tmp / "tok" / "sp.model"))}


def test_stdlib_corpus_valid_and_deterministic(built, tmp_path):
    again = tmp_path / "again.jsonl"  # second run in a fresh process (other hash seed) via the CLI
    subprocess.run([sys.executable, str(REPO / "data" / "stdlib_corpus.py"), "--out", str(again),
                    "--max-bytes", "1500000"], check=True, capture_output=True, timeout=60)
    data = built["corpus"].read_bytes()
    assert again.read_bytes() == data
    assert 0 < len(data) <= 1_500_000
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    assert len(texts) >= 100
    assert all(isinstance(t, str) and len(t) >= 200 for t in texts)
    assert not list(tmp_path.glob("*.tmp"))


def test_shards_headers_counts_and_val_roundtrip(built):
    out, sp, docs = built["out"], built["sp"], built["docs"]
    assert sp.vocab_size() == VOCAB and sp.bos_id() == 1
    val_files = sorted(out.glob("fineweb_val_*.bin"))
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert [p.name for p in val_files][:1] == ["fineweb_val_000000.bin"]
    assert [p.name for p in train_files] == [f"fineweb_train_{i:06d}.bin" for i in range(len(train_files))]
    assert len(train_files) >= 2 and not list(out.glob("*.tmp"))

    val = np.concatenate([read_shard(p) for p in val_files])
    train_shards = [read_shard(p) for p in train_files]
    assert all(len(s) == SHARD_TOKENS for s in train_shards[:-1]) and 0 < len(train_shards[-1]) <= SHARD_TOKENS
    assert all(len(read_shard(p)) <= SHARD_TOKENS for p in val_files)
    train = np.concatenate(train_shards)

    encoded = [sp.encode(d, out_type=int) for d in docs]
    assert len(val) + len(train) == sum(len(e) + 1 for e in encoded)
    val_docs = split_at_bos(val)
    assert len(val_docs) == N_VAL
    assert [sp.decode(ids) for ids in val_docs] == docs[:N_VAL]  # exact text back
    assert split_at_bos(train) == encoded[N_VAL:]  # train docs in order, spanning shard boundaries

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["docs"] == N_VAL and manifest["splits"]["val"]["tokens"] == len(val)
    assert manifest["splits"]["train"]["docs"] == len(docs) - N_VAL
    assert manifest["splits"]["train"]["shards"] == len(train_files)
    assert Path(manifest["tokenizer"]).resolve() == (built["tmp"] / "tok" / "sp.model").resolve()


def test_byte_fallback_roundtrip(built):
    sp = built["sp"]
    for text in ["naïve − 5 € 日本", "emoji 🙂 and tab-free ascii", "Ünïcödé ß ÷ 中文字符"]:
        ids = sp.encode(text, out_type=int)
        assert sp.unk_id() not in ids
        assert sp.decode(ids) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("日本", out_type=int))


def vocab_has_word(model: Path) -> bool:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return any(sp.id_to_piece(i).lstrip("\u2581") == MADE_UP for i in range(sp.vocab_size()))


def test_tokenizer_never_saw_val_docs(built, tmp_path):
    assert not vocab_has_word(built["tmp"] / "tok" / "sp.model")
    assert len(built["sp"].encode(MADE_UP)) >= 3
    # Positive control: the same setup with the val docs in train does learn the word.
    rc = build_shards.main(["--inputs", str(built["val_file"]), str(built["corpus"]), "--val-docs", "0",
                            "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp_path / "ctl"),
                            "--out-dir", str(tmp_path / "out")])
    assert rc == 0 and vocab_has_word(tmp_path / "ctl.model")


def test_input_formats_with_existing_tokenizer(built, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("second document, a whole file")
    (src / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"body": "third"}\n{"body": ""}\n{"body": "fourth"}\n'))
    (src / "a.jsonl").write_text('{"body": "first"}\n')
    (src / "ignored.md").write_text("not an input")
    model = str(built["tmp"] / "tok" / "sp.model")
    rc = build_shards.main(["--inputs", str(src), "--val-docs", "1", "--text-key", "body",
                            "--tokenizer", model, "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    sp = built["sp"]
    got = [sp.decode(ids) for ids in split_at_bos(read_shard(tmp_path / "out" / "fineweb_val_000000.bin"))]
    got += [sp.decode(ids) for ids in split_at_bos(read_shard(tmp_path / "out" / "fineweb_train_000000.bin"))]
    assert got == ["first", "second document, a whole file", "third", "fourth"]


@pytest.mark.parametrize("case", ["missing_input", "too_few_docs"])
def test_expected_errors_are_one_line(built, tmp_path, case):
    model = str(built["tmp"] / "tok" / "sp.model")
    if case == "missing_input":
        missing = tmp_path / "does_not_exist.jsonl"
        r = run_cli("--inputs", str(missing), "--val-docs", "1", "--tokenizer", model, "--out-dir", str(tmp_path))
        must_name = [str(missing), "not found"]
    else:
        r = run_cli("--inputs", str(built["val_file"]), "--val-docs", "1000", "--tokenizer", model,
                    "--out-dir", str(tmp_path / "o"))
        must_name = ["--val-docs", "1000", str(N_VAL)]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(s in lines[0] for s in must_name), r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_shards_need_overwrite(built, tmp_path, capsys):
    model, out = str(built["tmp"] / "tok" / "sp.model"), tmp_path / "out"
    args = ["--inputs", str(built["val_file"]), "--val-docs", "1", "--tokenizer", model, "--out-dir", str(out)]
    assert build_shards.main([*args, "--shard-tokens", "1000"]) == 0
    n_before = len(list(out.glob("fineweb_train_*.bin")))
    assert n_before > 1
    assert build_shards.main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert len(list(out.glob("fineweb_train_*.bin"))) == n_before  # untouched
    assert build_shards.main([*args, "--overwrite"]) == 0  # default shard size: one train shard, stale ones gone
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


PARAGRAPHS = ["Call me Ishmael.", "Some years ago, never mind how long precisely.",
              "It is a way I have of driving off the spleen.", "Whenever I find myself growing grim.",
              "Then I account it high time to get to sea."]


def test_txt_blank_lines_separate_documents(built, tmp_path, capsys):
    book = tmp_path / "book.txt"  # separators: empty and whitespace-only lines, runs of them, at both ends
    book.write_text("\n\n" + "\n\n".join(PARAGRAPHS[:2]) + "\n \t\n\n" + PARAGRAPHS[2] + "\n\n\n"
                    + "\n\t\n".join(PARAGRAPHS[3:]) + "\n\n")
    out = tmp_path / "out"
    rc = build_shards.main(["--inputs", str(book), "--val-docs", "2", "--tokenizer",
                            str(built["tmp"] / "tok" / "sp.model"), "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    sp = built["sp"]
    val = [sp.decode(ids) for ids in split_at_bos(read_shard(out / "fineweb_val_000000.bin"))]
    train = [sp.decode(ids) for ids in split_at_bos(read_shard(out / "fineweb_train_000000.bin"))]
    assert (val, train) == (PARAGRAPHS[:2], PARAGRAPHS[2:])
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert (splits["val"]["docs"], splits["train"]["docs"]) == (2, 3)


def test_train_docs_keeps_the_first_train_documents(built, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(PARAGRAPHS))
    out = tmp_path / "out"
    rc = build_shards.main(["--inputs", str(book), "--val-docs", "1", "--train-docs", "2", "--tokenizer",
                            str(built["tmp"] / "tok" / "sp.model"), "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    sp = built["sp"]
    val = [sp.decode(ids) for ids in split_at_bos(read_shard(out / "fineweb_val_000000.bin"))]
    train = [sp.decode(ids) for ids in split_at_bos(read_shard(out / "fineweb_train_000000.bin"))]
    assert len(PARAGRAPHS) > 3 and (val, train) == (PARAGRAPHS[:1], PARAGRAPHS[1:3])


def test_txt_documents_keep_their_lines(tmp_path):
    # Exact texts (the tokenizer's normalization would hide indentation and line breaks).
    docs = ["  indented first line\nsecond line  ", "one\n\tmore", "last, no final newline"]
    path = tmp_path / "doc.txt"
    path.write_bytes(f"{docs[0]}\r\n   \r\n{docs[1]}\n\n\n{docs[2]}".encode())  # CRLF reads as \n
    assert list(build_shards.read_docs(path, "text")) == docs
    path.write_text(" \n\t\n")
    assert list(build_shards.read_docs(path, "text")) == []  # blank lines only: no empty documents


@pytest.mark.parametrize("overwrite", [False, True])
def test_sidecar_is_not_a_shard(built, tmp_path, capsys, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    sidecar = out / "fineweb_val_bytes_000000.bin"  # e.g. the upstream CaseOps byte sidecar
    sidecar.write_bytes(b"user data")
    if overwrite:
        (out / "fineweb_train_000007.bin").write_bytes(b"stale")  # a real shard name: still dropped
    args = ["--inputs", str(built["val_file"]), "--val-docs", "1", "--tokenizer",
            str(built["tmp"] / "tok" / "sp.model"), "--out-dir", str(out)]
    assert build_shards.main(args + ["--overwrite"] * overwrite) == 0, capsys.readouterr().err
    assert sidecar.is_file() and sidecar.read_bytes() == b"user data", "the sidecar was removed or changed"
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert ("removed 1 stale" in capsys.readouterr().out) == overwrite


@pytest.mark.parametrize("case", ["vocab_too_high", "vocab_too_small"])
def test_tokenizer_vocab_errors_point_the_right_way(tmp_path, capsys, case):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                              for i in range(4)))
    out = tmp_path / "out"

    def build(vocab: int) -> int:
        return build_shards.main(["--inputs", str(corpus), "--val-docs", "1", "--train-tokenizer", str(vocab),
                                  "--tokenizer-out", str(tmp_path / "tok" / "sp"), "--out-dir", str(out)])

    assert build(5000 if case == "vocab_too_high" else 100) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("build_shards: error: tokenizer training failed:"), line
    if case == "vocab_too_high":
        m = re.search(r"use --train-tokenizer (\d+) or less", line)
        assert m and "larger" not in line, line
    else:
        m = re.search(r"use a larger --train-tokenizer \(at least (\d+)", line)
        assert m and "smaller --train-tokenizer" not in line and "vocab_size" not in line, line
    assert "Vocabulary size" in line and "trainer_interface" not in line, line  # SentencePiece's words, no noise
    assert not out.exists()
    assert build(int(m[1])) == 0, capsys.readouterr().err  # the advised vocab does train
