"""Model and optimizer invariants: every parameter is optimised and moves, loops add depth but no matrices,
warm-up leaves no trace, the LR schedule has the documented shape."""
import contextlib

import pytest
import torch

import train_gpt as T
from conftest import tiny_hparams as hparams


def tiny_model(**extra):
    h = hparams(**extra)
    torch.manual_seed(0)
    return h, T.GPT(h)


def batch(h, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, h.vocab_size, (n, h.train_seq_len + 1), generator=g)
    t[:, 0] = T.BOS_ID
    return t[:, :-1], t[:, 1:]


def trainer_for(model, h, accum=1):
    opts = T.build_optimizers(model, h, T.Run(), T.newton_schulz)
    return T.Trainer(model, model, opts, h, accum, contextlib.nullcontext())


def test_every_parameter_in_one_group_and_moves():
    h, model = tiny_model(CRAWLER_LOOPS=3, CRAWLER_LOOP_ROPE_SCALES="9,1,1", MUON_WD=0, EMBED_WD=0)
    groups = T.param_groups(model)
    T.check_param_groups(model, groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "blocks.2.attn.c_q.weight" in [names[id(p)] for p in groups[0]]  # the crawler block is Muon's
    assert {names[id(p)] for p in groups[1]} == {"tok_emb.weight", "bigram.embed.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, h)
    for s in range(3):
        trainer.step([batch(h, seed=s)], 1.0, 0.95)
    frozen = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not frozen, f"never updated: {frozen}"
    # per-loop rows of the control tensors differ after training: the loops are told apart
    mid = [p for p, (_, role, _) in enumerate(model.schedule) if role == "mid"]
    assert len(mid) == 3 and not torch.equal(model.app_emb[mid[0]], model.app_emb[mid[1]])


def test_orphan_parameter_is_caught():
    h, model = tiny_model()
    model.orphan = torch.nn.Parameter(torch.zeros(3))
    matrices, embeds, scalars = T.param_groups(model)
    scalars = [p for p in scalars if p is not model.orphan]
    with pytest.raises(AssertionError, match="orphan"):
        T.check_param_groups(model, (matrices, embeds, scalars))
    with pytest.raises(AssertionError, match="duplicated"):
        T.check_param_groups(model, (matrices, embeds, scalars + [model.orphan, model.orphan]))


def test_loops_add_depth_not_matrices():
    counts, outs = {}, {}
    for loops in (1, 2, 4):
        h, model = tiny_model(CRAWLER_LOOPS=loops)
        matrices, embeds, _ = T.param_groups(model)
        counts[loops] = (sum(p.numel() for p in matrices + embeds), sum(p.numel() for p in model.parameters()))
        assert len(model.schedule) == h.num_flat_layers + loops
        x, y = batch(h)
        with torch.no_grad():
            model.blocks[-1].attn.proj.weight.normal_()  # make the crawler contribute
            outs[loops] = model(x, y)
    assert counts[1][0] == counts[2][0] == counts[4][0]  # same weights: depth costs no matrix bytes
    # only the per-application control rows grow: 5 vectors of MODEL_DIM + one q gain per head, per loop
    per_loop = 5 * 64 + 4
    assert counts[2][1] - counts[1][1] == per_loop and counts[4][1] - counts[1][1] == 3 * per_loop
    assert not torch.allclose(outs[1], outs[2]) and not torch.allclose(outs[2], outs[4])


def test_zero_loops_is_plain_unet_gpt():
    h, model = tiny_model(CRAWLER_LOOPS=0, NUM_FLAT_LAYERS=4)
    assert len(model.blocks) == 4 and [r for _, r, _ in model.schedule] == ["enc", "enc", "dec", "dec"]
    T.check_param_groups(model, T.param_groups(model))


def test_xsa_selection():
    assert hparams(XSA_BLOCKS="all").xsa_flags() == [True, True, True]
    assert hparams(XSA_BLOCKS="crawler").xsa_flags() == [False, False, True]
    assert hparams(XSA_BLOCKS="0,2").xsa_flags() == [True, False, True]
    assert hparams(XSA_BLOCKS="none").xsa_flags() == [False, False, False]
    with pytest.raises(T.ConfigError, match="XSA_BLOCKS"):
        hparams(XSA_BLOCKS="5")


def test_exclusive_attention_removes_self_value_component():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = T.exclusive(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert (out * vn).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out + (y * vn).sum(-1, keepdim=True) * vn, y, atol=1e-5)


def test_rope_tables_use_real_length_and_loop_scales():
    cos, sin = T.rotary_tables(16, 2048, 10000.0, 1.0)
    assert cos.shape == (2048, 8)
    assert torch.allclose(torch.atan2(sin[1], cos[1]), 1 / 10000.0 ** (torch.arange(0, 16, 2) / 16))
    cos9, sin9 = T.rotary_tables(16, 2048, 10000.0, 9.0)
    assert torch.allclose(torch.atan2(sin9[1], cos9[1]) * 9, torch.atan2(sin[1], cos[1]), atol=1e-6)
    h, model = tiny_model(CRAWLER_LOOP_ROPE_SCALES="9,1")
    assert model.rope_index == [0, 1, 2, 0] and model.rope_cos.shape[0] == 3


def test_document_start_isolation_in_smear_and_bigram():
    """Changing the last token of one document must not change anything at the next BOS."""
    h, model = tiny_model()
    with torch.no_grad():
        model.smear.lam.fill_(1.0)
        model.bigram.embed.weight.normal_()
    x, _ = batch(h, n=1)
    x[0, 10] = T.BOS_ID
    x2 = x.clone()
    x2[0, 9] = (x[0, 9] + 1) % h.vocab_size
    emb = lambda ids: model.smear(T.rms_norm(model.tok_emb(ids) + model.bigram(ids)), ids)
    a, b = emb(x), emb(x2)
    assert torch.equal(a[0, 10], b[0, 10]) and torch.equal(a[0, 11], b[0, 11])
    assert not torch.equal(a[0, 9], b[0, 9])


def test_warmup_leaves_model_and_optimizer_unchanged():
    h, model = tiny_model()
    trainer = trainer_for(model, h)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.warmup(3, 4, h.train_seq_len, h.vocab_size, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not opt.state for opt in trainer.opts)
    assert trainer.opts[0].param_groups[0]["lr"] == h.matrix_lr
    # and training after warm-up matches training without it
    h2, fresh = tiny_model()
    t2 = trainer_for(fresh, h2)
    for tr, m in ((trainer, model), (t2, fresh)):
        tr.step([batch(h, seed=5)], 1.0, 0.95)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_schedule_shape():
    h = hparams(LR_WARMUP_STEPS=10, WARMDOWN_FRAC=0.5, MIN_LR_FRAC=0.1, MUON_MOMENTUM_WARMUP_STEPS=100)
    lr = lambda step, progress: T.schedule(step, progress, h)[0]
    assert lr(0, 0.0) == pytest.approx(0.1)
    assert lr(9, 0.0) == 1.0 and lr(100, 0.49) == 1.0
    assert lr(100, 0.75) == pytest.approx(0.55)
    assert lr(100, 1.0) == pytest.approx(0.1) and lr(100, 1.2) == pytest.approx(0.1)
    # Muon momentum ramps linearly from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM, whatever the LR does
    assert [T.schedule(s, 0.9, h)[1] for s in (0, 50, 100, 500)] == pytest.approx([0.92, 0.955, 0.99, 0.99])


def test_muon_orthogonalises_and_batches_by_shape():
    g = torch.randn(3, 32, 16)
    out = T.newton_schulz(g, 5).float()
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.5 and sv.max() < 1.3  # singular values pushed towards 1
    ps = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4, 8))]
    muon = T.Muon(ps, lr=0.1, momentum=0.9, backend_steps=5, wd=0.0)
    assert sorted(len(s) for s in muon.stacks) == [1, 3]
    for p in ps:
        p.grad = torch.randn_like(p)
    snapshot = [p.detach().clone() for p in ps]
    muon.step()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot, ps))


def test_autocast_free_forward_is_finite():
    h, model = tiny_model(MLP_ACT="relu_sq", SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0, LN_SCALE=0, LOGIT_SOFTCAP=0)
    x, y = batch(h)
    nll = model(x, y)
    assert nll.shape == x.shape and torch.isfinite(nll).all()
    assert abs(nll.mean().item() - torch.log(torch.tensor(float(h.vocab_size)))) < 0.5


def test_ema_forgets_the_initial_weights():
    model = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = T.EMA(model, 0.997)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update(model)
    assert torch.allclose(ema.shadow[0], torch.ones(4, 4), atol=1e-6)  # plain 0.997 would still be 26% init
    first = T.EMA(model, 0.997)
    with torch.no_grad():
        model.weight.fill_(2.0)
    first.update(model)
    assert torch.allclose(first.shadow[0], torch.full((4, 4), 1.9))  # decay 0.1 at the first update


def test_frozen_attention_gate_is_one_matmul_under_dynamic_shapes():
    """LoRA TTT compiles with dynamic shapes and the base frozen. `x[..., :12] @ gate.T` then traced as a
    bmm against the gate broadcast to every row, and on the GPU (torch 2.11) the saved per-row copy got
    a stride baked from the warm-up's row count: the record preset's phased TTT died at its first step
    (expected stride 24, got 768). The gate must be a plain 2-D matmul, no weight broadcast over rows."""
    from torch.fx.experimental.proxy_tensor import make_fx
    torch.manual_seed(0)
    attn = T.Attention(64, 8, 4, True, True).requires_grad_(False)
    cos, sin = T.rotary_tables(8, 16, 10000.0, 1.0)
    x = torch.randn(3, 16, 64, requires_grad=True)  # the stream carries the adapters' gradient
    fn = lambda x, p, cos, sin: torch.func.functional_call(attn, p, (x, cos, sin, torch.ones(8), None))  # noqa: E731
    g = make_fx(fn, tracing_mode="symbolic")(x, dict(attn.named_parameters()), cos, sin)
    bmms = [n for n in g.graph.nodes if n.target is torch.ops.aten.bmm.default]
    broadcast = [n for n in bmms if any(a.meta["val"].stride(0) == 0 for a in n.args)]
    assert not broadcast, [str(a.meta["val"].shape) for n in broadcast for a in n.args]
