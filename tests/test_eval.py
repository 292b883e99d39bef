"""Exact evaluation: the byte count equals the decoded text's UTF-8 length, windows score every target
exactly once, and stride = seq_len equals a plain non-overlapping evaluation."""
import copy
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as T
from conftest import REPO, cli, tiny_env, tiny_hparams as hparams

OFFICIAL_SP = REPO.parent / "shared/data/tokenizers/fineweb_1024_bpe.model"
CPU = torch.device("cpu")


def decoded_bytes(sp, tokens):
    """Independent byte count: UTF-8 length of every decoded document, BOS excluded."""
    starts = np.flatnonzero(tokens == T.BOS_ID)
    assert starts[0] == 0
    docs = np.split(tokens, starts[1:])
    return sum(len(sp.decode(d[1:].tolist()).encode("utf-8")) for d in docs)


@pytest.fixture(scope="module")
def trained(corpus, finished):
    """The finished run's tiny model (its float checkpoint), with val tokens and byte tables."""
    data, tok, _ = corpus
    ckpt = torch.load(finished[0] / "logs/done_model.pt")
    model = T.GPT(hparams())
    model.load_state_dict(ckpt["model"])
    return model, T.load_val_tokens(data)[:6000], T.load_tokenizer_luts(str(tok), 512)


def run_eval(trained, **extra):
    model, tokens, luts = trained
    h = hparams(**extra)
    return T.evaluate(model, tokens, luts, h, T.Run())


def test_val_bytes_equal_decoded_utf8(corpus, trained):
    data, tok, val_docs = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens = T.load_val_tokens(data)
    assert any(ord(c) > 127 for c in sp.decode(tokens[:200].tolist()))  # the non-ASCII docs are in val
    model = trained[0]
    res = T.evaluate(model, tokens, T.load_tokenizer_luts(str(tok), 512), hparams(), T.Run())
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


def scored_positions(plan):
    for c0, c1, wins in plan:
        for ws, first, n in wins:
            yield c0, c1, ws, range(ws + first, ws + n)


def test_windows_score_every_target_once():
    for n, L, stride in [(1000, 128, 128), (1000, 128, 64), (1000, 128, 1), (129, 128, 64), (50, 128, 16)]:
        hits = np.zeros(n, int)
        for ws, first, length in T.eval_windows(0, n, 0, L, stride):
            assert length <= L and ws + length <= n
            assert ws == 0 or first >= L - stride  # later windows keep L - stride or more tokens of context
            hits[ws + first:ws + length] += 1
        assert (hits == 1).all(), (n, L, stride)


def test_window_plan_isolation_and_chunks():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 50, 3000)
    starts = [0, 40, 41, 300, 1200, 1300, 2999]
    tokens[starts] = T.BOS_ID
    for isolate in (False, True):
        for chunk in (0, 256, 1000):
            plan = T.window_plan(tokens, 128, 32, isolate, chunk)
            hits = np.zeros(len(tokens) - 1, int)
            for c0, c1, ws, scored in scored_positions(plan):
                hits[scored] += 1
                assert c0 <= scored.start and scored.stop <= c1  # a chunk scores only its own targets
                doc = max(s for s in starts if s <= scored.start)
                assert not isolate or ws >= doc  # no context from the previous document
                assert scored.stop - 1 - ws < 128
                if not isolate and scored.start >= 128:
                    assert scored.start - ws >= 128 - 32  # full context away from the stream start
            assert (hits == 1).all(), (isolate, chunk)
            if chunk:
                assert [c0 for c0, _, _ in plan] == list(range(0, len(tokens) - 1, chunk))


def test_stride_zero_means_no_sliding_eval_and_planner_refuses_bad_strides():
    for env, (seq_len, stride) in [({}, (2048, 64)), ({"EVAL_STRIDE": "0"}, (2048, 2048)),
                                   ({"EVAL_STRIDE": "0", "EVAL_SEQ_LEN": "512"}, (512, 512)),
                                   ({"TRAIN_SEQ_LEN": "256"}, (256, 64))]:
        h = T.Hyperparameters(env)
        assert (h.eval_seq_len, h.eval_stride) == (seq_len, stride), env
    for stride in (0, -1, 129):  # 0 never advances (the TTT planner looped forever); > L skips targets
        with pytest.raises(ValueError, match="cannot cover the targets"):
            T.eval_windows(0, 1000, 0, 128, stride)


def test_a_count_short_of_the_val_targets_is_an_error():
    tokens = np.arange(101)
    assert T.as_metrics(torch.tensor([70.0, 100.0, 250.0], dtype=torch.float64), tokens)["val_tokens"] == 100
    with pytest.raises(T.ConfigError, match="scored 52 of 100 val targets"):
        T.as_metrics(torch.tensor([35.0, 52.0, 130.0], dtype=torch.float64), tokens)


def test_stride_equal_seq_len_is_plain_eval(trained):
    model, tokens, luts = trained
    tokens = tokens[:128 * 40 + 1]
    res = T.evaluate(model, tokens, luts, hparams(), T.Run(), stride=128)
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():  # plain eval computed directly: consecutive non-overlapping 128-token windows
        nll = model(t[:-1].view(40, 128), t[1:].view(40, 128)).double()
    assert res["val_tokens"] == nll.numel() == len(t) - 1
    assert res["val_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)


def test_sliding_scores_each_token_once_with_its_windows_context(trained):
    model, tokens, luts = trained
    plain = run_eval(trained, EVAL_STRIDE=128)
    sliding = T.evaluate(model, tokens, luts, hparams(), T.Run(), stride=32)
    assert sliding["val_tokens"] == plain["val_tokens"] and sliding["val_bytes"] == plain["val_bytes"]
    t, n, prev, scored = torch.from_numpy(tokens.astype(np.int64)), len(tokens) - 1, 0, []
    with torch.no_grad():  # directly: the first window scores its 128 targets, each next one its last 32
        for end in list(range(128, n, 32)) + [n]:
            start = max(0, end - 128)
            scored.append(model(t[start:end][None], t[start + 1:end + 1][None])[0, prev - start:])
            prev = end
    nll = torch.cat(scored).double()
    assert nll.numel() == n and sliding["val_loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert abs(sliding["val_loss"] - plain["val_loss"]) > 1e-4  # other contexts (whether they help: P1, README)
    isolated = T.evaluate(model, tokens, luts, hparams(EVAL_DOC_ISOLATION=1), T.Run(), stride=32)
    assert isolated["val_tokens"] == plain["val_tokens"] and isolated["val_loss"] != sliding["val_loss"]


def ttt(trained, tokens, mode, **extra):
    """Runs a TTT mode on a copy of the trained model; returns (metrics, per-chunk sums)."""
    model = copy.deepcopy(trained[0])
    settings = dict(TTT=mode, EVAL_STRIDE=64, TTT_CHUNK_TOKENS=256, TTT_LORA_CHUNK=64, TTT_LR=0.05, TTT_LORA_LR=0.01)
    h = hparams(**{**settings, **extra})
    if mode == "sgd":
        return T.ttt_sgd(model, model, tokens, trained[2], h, T.Run())
    return T.ttt_lora(model, model, tokens, trained[2], h, T.Run())


@pytest.mark.parametrize("mode", ["sgd", "lora", "phased"])
def test_ttt_never_looks_ahead(trained, mode):
    tokens = np.where(trained[1][:2000] == T.BOS_ID, 5, trained[1][:2000])
    tokens[[0, 700]] = T.BOS_ID  # two documents for the per-document mode
    cut = 1300
    changed = tokens.copy()
    changed[cut + 1:] = np.random.default_rng(1).integers(4, 500, len(tokens) - cut - 1)
    (m1, parts1), (m2, parts2) = ttt(trained, tokens, mode), ttt(trained, changed, mode)
    early = [k for k in parts1 if k < cut - 256]
    assert len(early) >= 3 and sorted(parts1) == sorted(parts2)
    for k in early:
        assert torch.equal(parts1[k], parts2[k]), k  # bitwise: nothing later reached these scores
    assert m1["val_loss"] != m2["val_loss"]
    assert m1["val_tokens"] == len(tokens) - 1
    # score before update: the first chunk (of the stream, or of each document) is scored by the
    # untouched model
    model, luts = trained[0], trained[2]
    firsts = {0: T.window_plan(tokens, 128, 64, False, 256)[0][2]} if mode == "sgd" else {
        a: [(a, 0, 64)] for a in (0, 700)}  # (phased: one batch, so no phase runs before a first chunk)
    for a, wins in firsts.items():
        base = T.score_windows(model, tokens, wins, luts, 16, T.Run())
        assert torch.allclose(parts1[a], base, rtol=1e-6), (a, parts1[a], base)


@pytest.mark.parametrize("mode", ["sgd", "lora", "phased"])
def test_ttt_learns_a_repeat(trained, mode):
    """A passage longer than the context window, then the same passage again: only test-time training
    can carry it over, so TTT must lower the repeat's loss below the plain sliding eval's."""
    passage = np.where(trained[1][1:641] == T.BOS_ID, 5, trained[1][1:641])  # one document
    tokens = np.concatenate([[T.BOS_ID], passage, passage]).astype(trained[1].dtype)
    _, parts = ttt(trained, tokens, mode, TTT_EPOCHS=2, TTT_CHUNK_TOKENS=128)
    second = sum(v for k, v in parts.items() if k >= 640)  # targets of the second copy
    wins = [w for c0, c1, wins in T.window_plan(tokens, 128, 64, False, 128) if c0 >= 640 for w in wins]
    base = T.score_windows(trained[0], tokens, wins, trained[2], 16, T.Run())
    assert second[1] == base[1] == 640  # the same positions
    assert second[0] < 0.95 * base[0], (second[0].item(), base[0].item())


def test_phased_ttt_phases_learn_only_from_scored_documents(trained):
    """TTT=phased, three documents a batch each, one global SGD phase after the second: every score of the
    first two documents and the third's before the change is bitwise independent of the third's later
    tokens; the first two documents' first chunks are the untouched model's, the third's is not (the phase
    trained the base model on the first two)."""
    tokens = np.where(trained[1][:2000] == T.BOS_ID, 5, trained[1][:2000])
    tokens[[0, 500, 1100]] = T.BOS_ID  # lengths 500, 600, 900: scored in that order
    changed = tokens.copy()
    changed[1301:] = np.random.default_rng(1).integers(4, 500, len(tokens) - 1301)
    extra = dict(TTT_LORA_DOCS=1, TTT_PHASES=1, TTT_PHASE_DOCS=2, TTT_PHASE_LR=0.05, TTT_LORA_WD=0.1, TTT_LORA_BETA1=0)
    (m1, parts1), (m2, parts2) = ttt(trained, tokens, "phased", **extra), ttt(trained, changed, "phased", **extra)
    early = [k for k in parts1 if k < 1300 - 128]
    assert len(early) >= 15 and sorted(parts1) == sorted(parts2) and m1["val_loss"] != m2["val_loss"]
    for k in early:
        assert torch.equal(parts1[k], parts2[k]), k
    model, luts = trained[0], trained[2]
    for a, untouched in ((0, True), (500, True), (1100, False)):
        base = T.score_windows(model, tokens, [(a, 0, 64)], luts, 16, T.Run())
        assert torch.allclose(parts1[a], base, rtol=1e-6) == untouched, a
    no_phase = ttt(trained, tokens, "phased", **dict(extra, TTT_PHASES=0))[1]
    assert torch.allclose(no_phase[1100], T.score_windows(model, tokens, [(1100, 0, 64)], luts, 16, T.Run()), rtol=1e-6)


def test_sgd_steps_keep_one_batch_shape():
    """Every SGD step (TTT=sgd chunks, phased phases) runs TTT_BATCH_SEQS rows: a short last batch wraps round
    to the first rows, since a new shape compiles anew (a phase over 6 rows once cost a recompile on the GPU)."""
    seen = []
    lin = T.nn.Linear(1, 1)

    def runner(x, y):
        seen.append(x[:, 0].tolist())
        return lin(x[..., None].float()).squeeze(-1)

    seqs = torch.arange(5)[:, None].repeat(1, 3)  # 5 rows of 2 targets, row r all r
    T.sgd_epochs(runner, list(lin.parameters()), torch.optim.SGD(lin.parameters(), lr=0.0), seqs, 0.0, 1,
                 hparams(TTT_BATCH_SEQS=4), T.Run())
    assert seen == [[0, 1, 2, 3], [4, 0, 1, 2]]


def test_ttt_time_projection_counts_compile_time_and_warns():
    h, lines = hparams(MAX_EVAL_SECONDS="12"), []
    t0 = T.time.perf_counter() - 1.0  # 1 s for the first 10% of the tokens
    assert T.project_eval_time(lines.append, t0, 0, 5, 100, h, spent=5.0) == 5  # under 10%: silent
    assert not lines
    assert T.project_eval_time(lines.append, t0, 5, 5, 100, h, spent=5.0) == 10
    assert T.project_eval_time(lines.append, t0, 10, 5, 100, h, spent=5.0) == 15  # logs only once
    (line,) = lines
    projected = float(line.split("projected ")[1].split("s")[0])
    assert 14 <= projected <= 17 and "over MAX_EVAL_SECONDS=12" in line


def test_phased_ttt_skips_a_phase_without_a_full_row_and_refuses_shared_batches(trained):
    """A phase over fewer scored tokens than TRAIN_SEQ_LEN has no row to train on: it is skipped (it crashed
    in unfold); phases that would fall on one batch are a configuration error, not a silently lost phase."""
    tokens = np.where(trained[1][:301] == T.BOS_ID, 5, trained[1][:301])
    tokens[[0, 40, 100]] = T.BOS_ID  # documents of 40, 60 and 200 tokens; the first phase sees only 40
    metrics, parts = ttt(trained, tokens, "phased", TTT_LORA_DOCS=1, TTT_PHASES=2, TTT_PHASE_DOCS=2)
    assert metrics["val_tokens"] == 300 and min(parts) == 0
    with pytest.raises(T.ConfigError, match="TTT_PHASE_DOCS=100: two of the 3 phases fall after the same batch of "
                                            "TTT_LORA_DOCS=64 documents; TTT_PHASES x TTT_LORA_DOCS = 192"):
        hparams(TTT="phased", TTT_LORA_CHUNK=64, TTT_PHASE_DOCS=100)


def test_lora_ttt_batches_64_documents_a_rank_unless_set():
    """TTT_LORA_DOCS=0 (default) is 64 a rank: 8 GPUs keep 64 adapter rows each (not 8), and the record's
    1,500 phase documents still fall after 3 distinct batches of 512 (500 < 512 documents a phase)."""
    one, eight = (hparams(TTT="phased", TTT_LORA_CHUNK=64, TTT_PHASE_DOCS=1500, WORLD_SIZE=w) for w in (1, 8))
    assert (one.ttt_lora_docs, eight.ttt_lora_docs) == (64, 512)
    assert one.ttt_phase_batches() == [7, 15, 23] and eight.ttt_phase_batches() == [0, 1, 2]
    assert hparams(TTT_LORA_DOCS=3, WORLD_SIZE=8).ttt_lora_docs == 3 and "world" not in eight.as_dict()


def test_val_bytes_come_from_a_byte_sidecar_beside_the_shards(corpus, finished, tmp_path):
    """A text transform such as CaseOps writes each token's bytes of the original text to
    fineweb_val_bytes_NNNNNN.bin: the roundtrip, sliding and TTT evals then count bytes from it (every val
    target once), not from the tokenizer's pieces; a sidecar that does not match the val shards is an error."""
    from test_data import assert_one_line_error, write_shard
    data = tmp_path / "data"
    shutil.copytree(corpus[0], data)
    tokens = T.load_val_tokens(str(data))
    side = np.where(tokens == T.BOS_ID, 0, tokens % 7 + 1)  # not what the pieces count
    write_shard(data / "fineweb_val_bytes_000000.bin", side)
    env = tiny_env(corpus, RUN_ID="side", DATA_PATH=data, EVAL_ONLY=finished[0] / "logs/done_model.ptz",
                   EVAL_STRIDE=64, TTT="lora", TTT_LORA_CHUNK=64)
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    assert final["val_bytes"] == int(side[1:].sum()) != finished[1]["val_bytes"]
    for key in ("roundtrip", "sliding", "ttt"):  # the bytes each eval divided by: nats x tokens / (bpb x ln 2)
        implied = final[f"{key}_val_loss"] * final["val_tokens"] / (final[f"{key}_val_bpb"] * math.log(2))
        assert implied == pytest.approx(final["val_bytes"], rel=1e-9), key
    assert final["roundtrip_val_loss"] == finished[1]["roundtrip_val_loss"]  # the same targets, other bytes
    assert "val bytes: from the byte sidecars" in log
    write_shard(data / "fineweb_val_bytes_000000.bin", side[:-1])
    rc, err, _, _ = cli(dict(env, RUN_ID="side_bad"), tmp_path)
    assert_one_line_error(rc, err, "the byte sidecars fineweb_val_bytes_*.bin do not match the val shards")


def test_phased_ttt_on_two_ranks_scores_as_one(corpus, finished, tmp_path):
    """TTT=phased on the finished run's artifact: 2 gloo ranks (each a share of every batch, gradients and
    the warm-started A all-reduced) give the 1-rank score; 3 documents a batch: rank 1 pads its one to 2 rows."""
    from conftest import run_train, tiny_env
    scores = []
    for nproc in (1, 2):
        env = tiny_env(corpus, RUN_ID=f"phased{nproc}", EVAL_ONLY=finished[0] / "logs/done_model.ptz", EVAL_STRIDE=0,
                       TTT="phased", TTT_LORA_DOCS=3, TTT_LORA_CHUNK=64, TTT_LORA_RANK=4, TTT_PHASES=2,
                       TTT_PHASE_DOCS=6, TTT_PHASE_LR=0.02, TTT_BATCH_SEQS=4)
        final, log = run_train(env, tmp_path, nproc=nproc)
        assert "ttt: phase 2/2: SGD over 6 scored documents" in log, log[-2000:]
        scores.append(final["ttt_val_bpb"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-4, abs=0)  # float sums in another order (measured 1.3e-5);
    # a rank keeping its own warm-start A instead of the all-ranks mean: 1.3e-2; padding rows in the mean: 1.7e-2
