"""CPU tests for data/caseops.py and build_shards.py --caseops (offline, a few seconds)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
VOCAB, SHARD_TOKENS = 512, 5_000


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


caseops, build_shards, stdlib_corpus = load("caseops"), load("build_shards"), load("stdlib_corpus")
TITLE, ALLCAPS, CAPNEXT, ESC = caseops.OPERATORS

# Single-line texts that SentencePiece's nmt_nfkc leaves as they are, so they come back exactly.
CRAFTED = [
    "NASA and the ESA sent I/O data to McDonald's iPhone app, ABc and XYz; I think A is fine.",
    f"A literal {TITLE} title, {ESC} escape, {ESC}{TITLE} pair, {CAPNEXT}{ALLCAPS} run and \ue000 plain PUA.",
    "Élan, naïve café, Ünïcödé, 東京 and emoji 🙂: don't DON'T Don't dON'T.",
    "MixedCASE names like HTTPServer, XMLHttpRequest, eBay, macOS, x86_64 and UTF-8 in 2024.",
]


def stdlib_docs(max_chars: int) -> list[str]:
    docs, total = [], 0
    for text in stdlib_corpus.iter_documents(sysconfig.get_paths()["stdlib"], 200):
        if total > max_chars:
            break
        docs.append(text)
        total += len(text)
    return docs


# ---- the transform itself


SPEC = {"iPhone": "i\ue003phone", "McDonald": "\ue001mc\ue003donald", "ABc": "\ue001a\ue003bc",
        "NASA": "\ue002nasa", "I": "\ue001i", "A": "\ue001a", "Hello": "\ue001hello", "hello": "hello",
        "Élan": "Élan", "ÉLAN": "É\ue002lan", "don't": "don't", "DON'T": "\ue002don'\ue001t",
        "abC": "ab\ue003c", "\ue001": "\ue004\ue001", "\ue004": "\ue004\ue004", "\ue000": "\ue000",
        "NASA2024USA": "\ue002nasa2024\ue002usa", "Ab-CD ef": "\ue001ab-\ue002cd ef"}


@pytest.mark.parametrize("text", SPEC)
def test_spec_examples(text):
    assert caseops.encode(text) == SPEC[text]
    assert caseops.decode(SPEC[text]) == text


def test_roundtrip_on_real_text():
    docs = stdlib_docs(2_000_000)
    encoded = [caseops.encode(d) for d in docs]
    assert [caseops.decode(e) for e in encoded] == docs
    joined = "".join(encoded)
    assert not any("A" <= c <= "Z" for c in joined)  # every capital became an operator
    assert all(joined.count(op) > 100 for op in (TITLE, ALLCAPS, CAPNEXT))  # and all three are used


def test_roundtrip_on_crafted_and_random_text():
    for text in CRAFTED + ["", "a", "Z", "ZZ", "1A2b3C", "\ue000\ue001\ue002\ue003\ue004\ue005", "\ue004" * 5,
                           "ß→SS? straße STRASSE", "ǅ ǈ ﬁ Ａ", "tab\tnew\nline  A  B"]:
        assert caseops.decode(caseops.encode(text)) == text, text
    rng = random.Random(0)
    alphabet = "aAbBzZ 1é\u00c9-'" + "".join(chr(c) for c in range(0xE000, 0xE006))
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        assert caseops.decode(caseops.encode(text)) == text, repr(text)


@pytest.mark.parametrize("bad", [TITLE, "a" + TITLE, TITLE + "1", TITLE + " a", ALLCAPS + "é", ALLCAPS,
                                 CAPNEXT, "ab" + CAPNEXT + "-", ESC, ESC + "a", ESC + "\ue000", TITLE + TITLE + "a"])
def test_malformed_decode_raises(bad):
    with pytest.raises(ValueError, match="malformed CaseOps"):
        caseops.decode(bad)


# ---- tokenizer, shards and the byte sidecar


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 2 * int(header[2])
    return np.fromfile(path, dtype="<u2", offset=256 * 4)


def read_split(out: Path, prefix: str) -> tuple[np.ndarray, list[str]]:
    files = sorted(out.glob(f"fineweb_{prefix}_[0-9]*.bin"))
    return np.concatenate([read_shard(p) for p in files]), [p.name for p in files]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caseops")
    docs = CRAFTED + stdlib_docs(1_200_000)
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    n_val = len(CRAFTED) + 8
    out = tmp / "out"
    rc = build_shards.main(["--inputs", str(corpus), "--val-docs", str(n_val), "--caseops",
                            "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp / "tok" / "co"),
                            "--shard-tokens", str(SHARD_TOKENS), "--out-dir", str(out)])
    assert rc == 0
    model = tmp / "tok" / "co.model"
    return {"tmp": tmp, "corpus": corpus, "out": out, "docs": docs, "n_val": n_val,
            "model": model, "sp": spm.SentencePieceProcessor(model_file=str(model))}


def doc_spans(tokens: np.ndarray, bos: int = 1) -> list[tuple[int, int]]:
    starts = np.flatnonzero(tokens == bos)
    assert len(starts) and starts[0] == 0
    return list(zip(starts, [*starts[1:], len(tokens)]))


def test_tokenizer_holds_the_operators(built):
    sp = built["sp"]
    assert [sp.piece_to_id(op) for op in caseops.OPERATORS] == [4, 5, 6, 7]  # upstream's ids
    assert caseops.operator_ids(sp) == [4, 5, 6, 7]
    table = caseops.piece_bytes(sp)
    assert table[:8].tolist() == [0] * 8  # pad, BOS, EOS, unk, the operators
    assert all(table[i] == 1 for i in range(sp.vocab_size()) if sp.is_byte(i))
    assert table[sp.piece_to_id("\u2581t")] == 2 and table[sp.piece_to_id("the")] == 3


def test_sidecar_counts_escaped_operators_once(built):
    sp = built["sp"]
    text = f"{ESC}{TITLE}"  # encodes as ESC ESC ESC TITLE: escape, literal ESC, escape, literal TITLE
    ids = np.array(sp.encode(caseops.encode(text)))
    assert ids.tolist() == [7, 7, 7, 4]
    assert caseops.sidecar(ids, caseops.piece_bytes(sp), 7).tolist() == [0, 3, 0, 3]


def test_val_shards_and_sidecar_count_original_bytes(built):
    out, sp, n_val = built["out"], built["sp"], built["n_val"]
    val, val_names = read_split(out, "val")
    side, side_names = read_split(out, "val_bytes")
    assert len(val_names) >= 3  # several shards, documents running across their boundaries
    assert side_names == [n.replace("val_", "val_bytes_") for n in val_names]
    assert [len(read_shard(out / s)) for s in side_names] == [len(read_shard(out / v)) for v in val_names]
    assert not list(out.glob("fineweb_train_bytes_*")) and not list(out.glob("*.tmp"))

    spans = doc_spans(val)
    assert len(spans) == n_val
    assert not side[[s for s, _ in spans]].any()  # BOS counts 0
    n_markers = 0
    for doc, (s, e) in zip(built["docs"], spans):
        transformed = sp.decode(val[s + 1:e].tolist())
        original = caseops.decode(transformed)
        assert int(side[s:e].sum()) == len(original.encode("utf-8"))  # an independent count of the text
        # The transformed text counts 3 bytes for each operator that is a marker, not text.
        markers = sum(transformed.count(op) - original.count(op) for op in caseops.OPERATORS)
        assert len(transformed.encode("utf-8")) - int(side[s:e].sum()) == 3 * markers
        n_markers += markers
        if doc in CRAFTED:
            assert transformed == caseops.encode(doc) and original == doc
    assert n_markers > 100

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["caseops"] is True
    assert manifest["splits"]["val"]["byte_files"] == side_names
    assert manifest["splits"]["val"]["sidecar_bytes"] == int(side.sum())
    assert "byte_files" not in manifest["splits"]["train"]


def test_train_shards_hold_the_transformed_text(built):
    sp, docs, n_val = built["sp"], built["docs"], built["n_val"]
    train, _ = read_split(built["out"], "train")
    got = [sp.decode(train[s + 1:e].tolist()) for s, e in doc_spans(train)]
    assert got == [sp.decode(sp.encode(caseops.encode(d))) for d in docs[n_val:]]
    assert not any("A" <= c <= "Z" for c in "".join(got))


def test_tokenizer_and_flag_must_agree(built, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert build_shards.main(["--inputs", str(built["corpus"]), "--val-docs", "1", "--train-tokenizer", str(VOCAB),
                              "--tokenizer-out", str(plain), "--out-dir", str(tmp_path / "plain_out")]) == 0
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), "--inputs", str(built["corpus"]),
                        "--val-docs", "1", "--caseops", "--tokenizer", f"{plain}.model", "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--caseops" in lines[0] and "user-defined" in lines[0] and f"{plain}.model" in lines[0]
    assert not out.exists()
    r = subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), "--inputs", str(built["corpus"]),
                        "--val-docs", "1", "--caseops", "--tokenizer", str(built["model"]), "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # positive control: the CaseOps tokenizer is accepted
    # and the other way round: a CaseOps tokenizer without the transform would spell capitals in bytes
    assert build_shards.main(["--inputs", str(built["corpus"]), "--val-docs", "1", "--tokenizer", str(built["model"]),
                              "--out-dir", str(tmp_path / "o2")]) == 1
    assert "add --caseops" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_operators_that_merge_are_not_user_defined(built, tmp_path):
    """Trained on transformed text without user_defined_symbols, the operators are ordinary pieces that
    BPE merges with others (e.g. "▁" + TITLE): such a model is refused."""
    sentences = [caseops.encode(line) for d in built["docs"] for line in d.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "m"),
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert TITLE in pieces and any(TITLE in p and p != TITLE for p in pieces)  # the case this test is about
    assert caseops.operator_ids(sp) is None


def test_overwrite_drops_stale_sidecars(built, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--inputs", str(built["corpus"]), "--val-docs", str(built["n_val"]), "--caseops",
            "--tokenizer", str(built["model"]), "--out-dir", str(out)]
    assert build_shards.main([*args, "--shard-tokens", str(SHARD_TOKENS)]) == 0
    assert len(list(out.glob("fineweb_val_bytes_*.bin"))) >= 3
    capsys.readouterr()
    for f in itertools.chain(out.glob("fineweb_train_*.bin"), out.glob("fineweb_val_0*.bin")):
        f.unlink()  # only sidecars left: they are still ours under --caseops
    assert build_shards.main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert build_shards.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert len(read_shard(out / "fineweb_val_bytes_000000.bin")) == len(read_shard(out / "fineweb_val_000000.bin"))


def test_identity_normalization_keeps_the_text_and_counts_every_byte(tmp_path):
    """--normalization identity (the sp8192 model's) keeps line breaks and fullwidth letters, which nmt_nfkc
    (the sp1024 recipe, the default) turns into spaces and ASCII and leaves out of the byte count: a CaseOps
    tokenizer compared with the sp8192 one must be trained with identity to score the same text."""
    text = "Line one\nLine TWO\n\n\uff32eal end"
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in [text] + stdlib_docs(600_000)))
    got = {}
    for norm in ("nmt_nfkc", "identity"):
        out = tmp_path / norm
        assert build_shards.main(["--inputs", str(corpus), "--val-docs", "1", "--caseops", "--normalization", norm,
                                  "--train-tokenizer", str(VOCAB), "--tokenizer-out", str(tmp_path / norm / "co"),
                                  "--out-dir", str(out)]) == 0
        sp = spm.SentencePieceProcessor(model_file=str(out / "co.model"))
        val, _ = read_split(out, "val")
        side, _ = read_split(out, "val_bytes")
        got[norm] = caseops.decode(sp.decode(val[1:].tolist())), int(side.sum())
    assert got["identity"] == (text, len(text.encode("utf-8")))
    assert got["nmt_nfkc"] == ("Line one Line TWO Real end", 26)


# ---- train_gpt.py on CaseOps shards


def test_train_gpt_counts_the_original_bytes_and_needs_the_sidecar(built, tmp_path):
    """train_gpt.py scores build_shards.py --caseops shards by the original text's UTF-8 bytes (counted here from
    the decoded val documents); the same shards without their sidecars stop at start-up with one line, since the
    CaseOps tokenizer's pieces would count the transformed text (3 bytes for each operator)."""
    from conftest import TINY, cli
    from test_data import assert_one_line_error
    out, sp = built["out"], built["sp"]
    val, _ = read_split(out, "val")
    original = sum(len(caseops.decode(sp.decode(val[s + 1:e].tolist())).encode("utf-8")) for s, e in doc_spans(val))
    env = dict(TINY, DATA_PATH=str(out), TOKENIZER_PATH=str(built["model"]), RUN_ID="co", ITERATIONS="1",
               QUANT_METHOD="rtn", EVAL_STRIDE="0")
    rc, err, final, _ = cli(env, tmp_path)
    assert rc == 0, err
    assert final["val_bytes"] == original
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("fineweb_val_bytes_*"))
    rc, err, _, _ = cli(dict(env, DATA_PATH=str(bare), RUN_ID="co_bare"), tmp_path)
    assert_one_line_error(rc, err, f"DATA_PATH={bare} has no byte sidecars", "CaseOps tokenizer",
                          "--variant sp8192_caseops")
