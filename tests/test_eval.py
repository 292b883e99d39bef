"""Exact evaluation: the byte count equals the decoded text's UTF-8 length, windows score every target
exactly once, and stride = seq_len equals a plain non-overlapping evaluation."""
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as T
from conftest import REPO, TINY

OFFICIAL_SP = REPO.parent / "shared/data/tokenizers/fineweb_1024_bpe.model"
CPU = torch.device("cpu")


def decoded_bytes(sp, tokens):
    """Independent byte count: UTF-8 length of every decoded document, BOS excluded."""
    starts = np.flatnonzero(tokens == T.BOS_ID)
    assert starts[0] == 0
    docs = np.split(tokens, starts[1:])
    return sum(len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs)


def hparams(**extra):
    return T.Hyperparameters(dict(TINY, **{k: str(v) for k, v in extra.items()}))


@pytest.fixture(scope="module")
def trained(corpus):
    """A tiny model trained for 40 steps on the corpus, with its val tokens and byte tables."""
    data, tok, _ = corpus
    h = hparams(DATA_PATH=data)
    torch.manual_seed(0)
    model = T.GPT(h)
    opts = T.build_optimizers(model, h, 0, 1, T.newton_schulz)
    trainer = T.Trainer(model, model, opts, h, 1, contextlib.nullcontext())
    loader = T.TrainLoader(T.shard_paths(data, "train"), h.train_seq_len, 0, 0, 1)
    for s in range(40):
        trainer.step(loader.next_step(32, 1), 1.0, s)
    luts = T.load_tokenizer_luts(str(tok), h.vocab_size)
    return model, T.load_val_tokens(data)[:6000], luts


def run_eval(trained, **extra):
    model, tokens, luts = trained
    h = hparams(**extra)
    return T.evaluate(model, tokens, luts, h, 0, 1, CPU, contextlib.nullcontext())


def test_val_bytes_equal_decoded_utf8(corpus, trained):
    data, tok, val_docs = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens = T.load_val_tokens(data)
    assert any(ord(c) > 127 for c in sp.decode(tokens[:200].tolist()))  # the non-ASCII docs are in val
    model = trained[0]
    res = T.evaluate(model, tokens, T.load_tokenizer_luts(str(tok), 512), hparams(), 0, 1, CPU,
                     contextlib.nullcontext())
    assert res["val_tokens"] == len(tokens) - 1
    assert res["val_bytes"] == decoded_bytes(sp, tokens)


@pytest.mark.skipif(not OFFICIAL_SP.exists(), reason="needs ../shared/data (present in CI)")
def test_val_bytes_with_official_sp1024(corpus, tmp_path):
    _, _, val_docs = corpus
    (tmp_path / "docs.jsonl").write_text("".join(
        __import__("json").dumps({"text": d}) + "\n" for d in val_docs + ["naïve − 5 € and more"] * 3))
    subprocess.run([sys.executable, str(REPO / "data/build_shards.py"), "--inputs", str(tmp_path / "docs.jsonl"),
                    "--val-docs", str(len(val_docs)), "--tokenizer", str(OFFICIAL_SP), "--out-dir", str(tmp_path / "s")],
                   check=True, capture_output=True)
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_SP))
    tokens = T.load_val_tokens(str(tmp_path / "s")).astype(np.int64)
    luts = T.load_tokenizer_luts(str(OFFICIAL_SP), 1024)
    x, y = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    lut_bytes = int(T.token_bytes(y, x, luts).sum())
    assert lut_bytes == decoded_bytes(sp, tokens)
    assert decoded_bytes(sp, tokens) >= len("naïve − 5 €".encode())


def test_no_space_byte_after_bos_with_dummy_prefix(corpus, tmp_path):
    """With add_dummy_prefix every document's first piece starts with "▁"; after BOS it adds no byte."""
    _, _, docs = corpus
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(docs).split(".")), model_prefix=str(tmp_path / "dp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "dp.model"))
    tokens = np.concatenate([[T.BOS_ID] + sp.encode(d) for d in docs]).astype(np.int64)
    assert sp.id_to_piece(int(tokens[1])).startswith("\u2581")
    x, y = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    assert int(T.token_bytes(y, x, T.byte_luts(sp, 400)).sum()) == decoded_bytes(sp, tokens)


def test_windows_score_every_target_once():
    for n, L, stride in [(1000, 128, 128), (1000, 128, 64), (1000, 128, 1), (129, 128, 64), (50, 128, 16)]:
        hits = np.zeros(n, int)
        for ws, first, length in T.eval_windows(n, L, stride):
            assert length <= L and ws + length <= n
            assert first == 0 or first == L - stride  # later windows keep L - stride tokens of context
            hits[ws + first:ws + length] += 1
        assert (hits == 1).all(), (n, L, stride)


def test_stride_equal_seq_len_is_plain_eval(trained):
    model, tokens, luts = trained
    res = run_eval(trained, EVAL_STRIDE=128)
    # plain eval computed directly: consecutive 128-token windows, the tail as a shorter window
    t = torch.from_numpy(tokens.astype(np.int64))
    nll = []
    with torch.no_grad():
        for s in range(0, len(t) - 1, 128):
            x, y = t[s:s + 128][None], t[s + 1:s + 129][None]
            nll.append(model(x[:, :y.size(1)], y).double().flatten())
    nll = torch.cat(nll)
    assert res["val_tokens"] == len(nll) == len(t) - 1
    assert res["val_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)


def test_sliding_scores_each_token_once_and_helps(trained):
    plain = run_eval(trained, EVAL_STRIDE=128)
    sliding = run_eval(trained, EVAL_STRIDE=32)
    assert sliding["val_tokens"] == plain["val_tokens"] and sliding["val_bytes"] == plain["val_bytes"]
    assert sliding["val_loss"] < plain["val_loss"]  # more left context per token
    assert sliding["val_bpb"] < plain["val_bpb"]
