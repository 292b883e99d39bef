"""The record stack: explicit encoder size, skips over the executed sequence, loops switched on partway,
parallel lanes, gated skips, the attention-output gate, Polar-Express Newton-Schulz and MuonEq-R, and the
vocabulary-driven data defaults."""
import contextlib

import pytest
import torch

import train_gpt as T
from conftest import tiny_hparams as hparams

RECORD = dict(NUM_FLAT_LAYERS=8, NUM_ENCODER_LAYERS=3, NUM_CRAWLER_LAYERS=3, CRAWLER_LOOPS=3)


def model_of(**extra):
    h = hparams(**extra)
    torch.manual_seed(0)
    return h, T.GPT(h)


def batch(h, n=2, seed=0):
    t = torch.randint(0, h.vocab_size, (n, h.train_seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def pairs(model, loops):
    """(receiving block, block whose output it receives) per skip, following the forward's LIFO stack."""
    r, stack, out = model.routes[loops], [], []
    for i, p in enumerate(r.positions):
        j = model.schedule[p][0]
        if r.receive[i] >= 0:
            out.append((j, stack.pop()))
        if r.save[i]:
            stack.append(j)
    return out


def test_record_layout_and_executed_skips():
    """The record's 17 applications: blocks 0,1,2 | 3,4,5 x3 | 6..10 (ours number the crawler 8,9,10 and the
    decoder flats 3..7); its encoder is the first 8 applications, the next 8 receive skips, the last none."""
    _, model = model_of(**RECORD, UNET_SKIPS="executed", CRAWLER_START_FRAC=0.35)
    assert [j for j, _, _ in model.schedule] == [0, 1, 2] + [8, 9, 10] * 3 + [3, 4, 5, 6, 7]
    full = model.routes[3]
    assert full.save == [True] * 8 + [False] * 9
    assert full.receive == [-1] * 8 + list(range(8)) + [-1]
    # decoder position k takes encoder output 7 - k (in record numbering: d0 <- e7 (blk4), d7 <- e0 (blk0))
    assert pairs(model, 3) == [(10, 9), (8, 8), (9, 10), (10, 9), (3, 8), (4, 2), (5, 1), (6, 0)]
    # the crawler once: an 11-application U-Net, 5 save, the next 5 receive, the last none
    once = model.routes[1]
    assert [model.schedule[p][0] for p in once.positions] == [0, 1, 2, 8, 9, 10, 3, 4, 5, 6, 7]
    assert pairs(model, 1) == [(10, 9), (3, 8), (4, 2), (5, 1), (6, 0)]
    assert model.skip_weights.shape[0] == 8


def test_flat_skips_and_encoder_size():
    _, model = model_of(**RECORD)
    assert pairs(model, 3) == [(3, 2), (4, 1), (5, 0)]  # encoder flats feed the first decoder flats
    assert model_of(NUM_FLAT_LAYERS=5)[0].num_encoder_layers == 2  # default: half
    with pytest.raises(T.ConfigError, match="NUM_ENCODER_LAYERS=6: at most NUM_FLAT_LAYERS=5"):
        hparams(NUM_FLAT_LAYERS=5, NUM_ENCODER_LAYERS=6)
    # every encoder flat before the crawler, none after: the decoder side is the crawler alone
    _, model = model_of(NUM_FLAT_LAYERS=2, NUM_ENCODER_LAYERS=2)
    assert [r for _, r, _ in model.schedule] == ["enc", "enc", "mid", "mid"] and not pairs(model, model.loops)


def test_crawler_once_then_every_loop():
    h, model = model_of(**RECORD, CRAWLER_START_FRAC=0.35)
    calls = []
    for c in range(8, 11):
        model.blocks[c].register_forward_pre_hook(lambda mod, args, c=c: calls.append(c))
    x, y = batch(h)
    for runs in (1, 3):
        model.loops = runs
        calls.clear()
        model(x, y)
        assert calls == [8, 9, 10] * runs


def test_warmup_compiles_both_routes_and_training_switches(tmp_path):
    """Warm-up runs the crawler-once route and the every-loop route (both graphs compile before the clock);
    training runs once until CRAWLER_START_FRAC, then every loop; export sees every loop."""
    h, model = model_of(**RECORD, CRAWLER_START_FRAC=0.5)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(mod.loops))
    trainer = T.Trainer(model, model, T.build_optimizers(model, h, T.Run(), T.newton_schulz), h, 1,
                        contextlib.nullcontext())
    trainer.warmup(2, 2, h.train_seq_len, h.vocab_size, torch.device("cpu"))
    assert seen == [1, 1, 3, 3]
    # without the switch only the every-loop graph is needed
    h1, m1 = model_of(**RECORD)
    seen1 = []
    m1.register_forward_pre_hook(lambda mod, args: seen1.append(mod.loops))
    T.Trainer(m1, m1, T.build_optimizers(m1, h1, T.Run(), T.newton_schulz), h1, 1,
              contextlib.nullcontext()).warmup(2, 2, h1.train_seq_len, h1.vocab_size, torch.device("cpu"))
    assert seen1 == [3, 3]


def test_training_loop_switches_at_the_fraction(corpus, tmp_path):
    from conftest import cli, tiny_env
    env = tiny_env(corpus, **RECORD, CRAWLER_START_FRAC="0.5", ITERATIONS="8", QUANT_METHOD="loop_gptq",
                   EVAL_STRIDE="0", RUN_ID="switch", TRAIN_LOG_EVERY="1")
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    assert "step 0: the crawler runs 1 of 3 loops (progress 0.000" in log
    assert "step 4: the crawler runs 3 of 3 loops (progress 0.500" in log
    assert "route, 1 crawler loops (block: * saved for a skip, + receives one, = in two lanes): 0* 1* 2* 8 9 10 +3 +4 +5 6 7\n" in log
    assert final["steps"] == 8


def test_loops_switch_on_one_at_a_time(corpus, tmp_path):
    """CRAWLER_START_FRAC with one share per later loop: the crawler runs 1, then 2, then 3 loops; each count is a
    route of its own (loop 2's crawler applications included, loop 3's not), compiled in the warm-up; the rows of
    a loop switched on later restart from loop 0's then, not before."""
    h, model = model_of(**RECORD, CRAWLER_START_FRAC="0.25,0.5", CONTROL_VECTORS="application")
    assert [h.loops_at(p) for p in (0.0, 0.2, 0.25, 0.4, 0.5, 0.9)] == [1, 1, 2, 2, 3, 3]
    assert sorted(model.routes) == [1, 2, 3] and h.loop_counts() == [1, 2, 3]
    assert [model.schedule[p][0] for p in model.routes[2].positions] == [0, 1, 2] + [8, 9, 10] * 2 + [3, 4, 5, 6, 7]
    with torch.no_grad():
        model.resid_mix.normal_()
    before = model.resid_mix.detach().clone()
    rows = {k: [p for p, (_, _, kk) in enumerate(model.schedule) if kk == k] for k in range(3)}
    assert model.start_loops(dict(model.named_parameters()), 1, 2) == [1]  # 1 -> 2 loops
    assert torch.equal(model.resid_mix[rows[1]], before[rows[0]])
    assert torch.equal(model.resid_mix[rows[2]], before[rows[2]])  # loop 2 is not running yet: untouched
    with torch.no_grad():
        model.resid_mix[rows[1]] += 1  # loop 1 trains on
    trained = model.resid_mix.detach().clone()
    assert model.start_loops(dict(model.named_parameters()), 2, 3) == [2]  # 2 -> 3 loops
    assert torch.equal(model.resid_mix[rows[1]], trained[rows[1]])  # loop 1 (already running) keeps its rows
    assert torch.equal(model.resid_mix[rows[2]], before[rows[0]])
    assert hparams(**RECORD, CRAWLER_START_FRAC="0.3").loops_at(0.3) == 3  # one value: every later loop at once
    for bad in ("0.5,0.25", "0.1,0.2,0.3", "-0.1"):
        with pytest.raises(T.ConfigError, match=f"CRAWLER_START_FRAC=.*: give one share of the budget in .0, 1. for all "
                                                f"later loops, or 2 ascending ones, one per later loop"):
            hparams(**RECORD, CRAWLER_START_FRAC=bad)
    (tmp_path / "model.pt").write_bytes(b"")  # a training setting: an export or eval of a saved model ignores it
    assert hparams(**RECORD, CRAWLER_START_FRAC="0.1,0.2,0.3", EXPORT_FROM=str(tmp_path / "model.pt")).export_from
    from conftest import cli, tiny_env
    env = tiny_env(corpus, **RECORD, CRAWLER_START_FRAC="0.25,0.5", CONTROL_VECTORS="application", ITERATIONS="8", EVAL_STRIDE="0",
                   QUANT_METHOD="rtn", RUN_ID="anneal", TRAIN_LOG_EVERY="1")
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    switches = [line.split(": ", 1)[1].split(" (")[0] for line in log.splitlines() if "the crawler runs" in line]
    assert switches == ["the crawler runs 1 of 3 loops", "the crawler runs 2 of 3 loops", "the crawler runs 3 of 3 loops"]
    assert ("step 2: the crawler runs 2 of 3 loops (progress 0.250, CRAWLER_START_FRAC=0.25,0.5); loop 1's control rows "
            "restart from loop 0's\n") in log
    assert "step 4: the crawler runs 3 of 3 loops (progress 0.500, CRAWLER_START_FRAC=0.25,0.5); loop 2's control rows " \
           "restart from loop 0's\n" in log
    assert "route, 2 crawler loops" in log and final["config"]["crawler_start_frac"] == [0.25, 0.5]


def test_parallel_lanes_read_before_either_writes():
    """In a lane block the MLP reads lane 1, which this block's attention has not written; in a serial block
    the MLP reads the stream after attention."""
    h, model = model_of(**RECORD, PARALLEL_LAST_N=2)
    x, y = batch(h)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.proj.weight.normal_(std=0.05)
            b.mlp.proj.weight.normal_(std=0.05)
    seen = {}
    for j in (6, 7, 5):  # 6, 7: the last two applications, in lanes; 5: serial
        model.blocks[j].mlp.fc.register_forward_pre_hook(lambda mod, args, j=j: seen.__setitem__(j, args[0].clone()))
    assert model.routes[3].lanes_from == len(model.schedule) - 2
    for j in (7, 5):
        model(x, y)
        before = seen[j]
        with torch.no_grad():
            model.blocks[j].attn.proj.weight.mul_(3.0)
        assert torch.isfinite(model(x, y)).all()
        # lanes: its own attention changed, its MLP input did not; serial: the MLP reads attention's output
        assert torch.equal(seen[j], before) == (j == 7)
    assert model.lane_resid.shape == (17, 2) and model.lane_post.shape == (17, 2, 2)
    assert model.lane_resid[0, 0].item() == pytest.approx(1.1)


def test_lanes_end_with_their_mean():
    """The output reads the mean of the two lanes: moving lane 0 by 1 equals moving both by 1/2."""
    h, model = model_of(**RECORD, PARALLEL_LAST_N=1)
    x, y = batch(h)
    out = {}
    for name, d0, d1 in (("a", 1.0, 0.0), ("b", 0.5, 0.5), ("c", 1.0, 1.0)):
        model.blocks[7].parallel = lambda lanes, x0, c, d0=d0, d1=d1: [lanes[0] + d0, lanes[1] + d1]
        out[name] = model(x, y)
    assert torch.allclose(out["a"], out["b"], atol=1e-5) and not torch.allclose(out["a"], out["c"], atol=1e-3)


def test_lanes_must_start_after_the_skip_sources():
    with pytest.raises(T.ConfigError, match="PARALLEL_LAST_N=12: the lanes must start after"):
        model_of(**RECORD, UNET_SKIPS="executed", PARALLEL_LAST_N=12)


def test_gated_skip_is_a_lerp_starting_halfway():
    _, gated = model_of(**RECORD, SKIP_GATE=1)
    _, plain = model_of(**RECORD)
    x, s = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert torch.allclose(plain.skip(x, s, 0), x + s)
    assert torch.allclose(gated.skip(x, s, 0), 0.5 * x + 0.5 * s, atol=1e-6)
    with torch.no_grad():
        gated.skip_gates[1].fill_(30.0)
    assert torch.allclose(gated.skip(x, s, 1), x)  # gate open: the stream passes, the skip is shut out


def test_attention_gate_per_head_from_the_first_dims():
    torch.manual_seed(0)
    gated, plain = T.Attention(64, 4, 2, False, True), T.Attention(64, 4, 2, False, False)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate"})
    with torch.no_grad():
        for a in (gated, plain):
            a.proj.weight.copy_(torch.eye(64))
    x = torch.randn(2, 8, 64)
    cos, sin = T.rotary_tables(16, 8, 10000.0, 1.0)
    q_gain = torch.ones(4)
    y0, y = plain(x, cos, sin, q_gain, None), gated(x, cos, sin, q_gain, None)
    assert torch.allclose(y, 0.5 * y0, atol=1e-6)  # zero init: every head at one half
    with torch.no_grad():
        gated.gate[1].fill_(-1e4)  # head 1 shut wherever the first 12 dims sum positive
    x[..., :12] = x[..., :12].abs()
    y0, y = plain(x, cos, sin, q_gain, None), gated(x, cos, sin, q_gain, None)
    assert torch.allclose(y[..., 16:32], torch.zeros(()), atol=1e-6)
    assert torch.allclose(y[..., :16], 0.5 * y0[..., :16], atol=1e-6)


def test_polar_express_orthogonalises_tighter_than_classic():
    g = torch.randn(4, 64, 32) @ torch.diag(torch.logspace(-2, 0, 32))  # a spread spectrum
    spread = {}
    for name, coeffs in T.NS_COEFFS.items():
        sv = torch.linalg.svdvals(T.newton_schulz(g, 5, coeffs).float())
        spread[name] = (sv - 1).abs().max().item()
    assert spread["polar"] < spread["classic"] and spread["polar"] < 0.25


def test_row_normalised_muon_ignores_row_scales():
    """MuonEq-R: each row of the update is unit-norm before orthogonalising, so rescaling the rows of a
    gradient leaves the step unchanged; plain Muon's step changes."""
    def step(row_norm, scale):
        p = torch.nn.Parameter(torch.zeros(16, 8))
        p.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * scale
        T.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, wd=0.0, row_norm=row_norm).step()
        return p.detach()
    scale = torch.logspace(-1, 1, 16)[:, None]
    assert torch.allclose(step(True, 1.0), step(True, scale), atol=1e-6)
    assert not torch.allclose(step(False, 1.0), step(False, scale), atol=1e-3)


def test_data_defaults_follow_the_vocabulary():
    h = T.Hyperparameters({"VOCAB_SIZE": "8192"})
    assert h.data_path == "./data/datasets/fineweb10B_sp8192"
    assert h.tokenizer_path == "./data/tokenizers/fineweb_8192_bpe.model"
    assert T.Hyperparameters({}).data_path == "./data/datasets/fineweb10B_sp1024"
    assert T.Hyperparameters({"VOCAB_SIZE": "8192", "DATA_PATH": "mine"}).data_path == "mine"
    # an artifact's vocabulary replaces the environment's, and the unset paths follow it
    h = T.Hyperparameters({})
    h.use_model_config({"vocab_size": 8192})
    assert h.data_path.endswith("fineweb10B_sp8192") and h.tokenizer_path.endswith("fineweb_8192_bpe.model")


def test_later_loops_restart_from_loop_zero_at_the_switch():
    """While the crawler runs once only loop 0's control rows train (the others only decay); at the switch
    the later loops' rows become copies of loop 0's, in the live weights and in the EMA alike."""
    h, model = model_of(**RECORD, CRAWLER_START_FRAC=0.5)
    with torch.no_grad():
        for name in ("resid_mix", "attn_scale", "q_gain", "app_emb"):
            getattr(model, name).normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert model.start_loops(dict(model.named_parameters()), 1, 3) == [1, 2]
    loop = {p: (j, k) for p, (j, _, k) in enumerate(model.schedule)}
    first = {j: p for p, (j, k) in loop.items() if k == 0}
    for p, (j, k) in loop.items():
        source = first[j] if k > 0 else p
        assert all(torch.equal(getattr(model, n)[p], before[n][source]) for n in ("resid_mix", "attn_scale", "q_gain", "app_emb"))
    assert torch.equal(model.blocks[0].attn.c_q.weight, before["blocks.0.attn.c_q.weight"])
    # per-block control vectors have nothing to copy
    _, shared = model_of(**RECORD, CRAWLER_START_FRAC=0.5, CONTROL_VECTORS="block")
    snapshot = {n: p.detach().clone() for n, p in shared.named_parameters()}
    assert shared.start_loops(dict(shared.named_parameters()), 1, 3) == []
    assert all(torch.equal(snapshot[n], p) for n, p in shared.named_parameters())


def test_two_ranks_train_the_record_stack_identically(corpus, tmp_path):
    """2-rank gloo: the loop switch, lanes, gates and skips keep every rank's weights identical (DDP needs
    every parameter in both routes' graphs), also with document-masked attention; QUANT_FIT's probes follow
    rank 0's sizes on both ranks."""
    from conftest import run_train, tiny_env
    env = tiny_env(corpus, **RECORD, UNET_SKIPS="executed", SKIP_GATE=1, CRAWLER_START_FRAC="0.5", PARALLEL_LAST_N=3,
                   ATTN_GATE=1, MUON_NS="polar", MUON_ROW_NORM=1, ITERATIONS=6, QUANT_METHOD="rtn", EVAL_STRIDE=0,
                   RUN_ID="rec2", SCALAR_WD="0.02", QUANT_FIT=1, GPTQ_SDCLIP_K=12, MAX_ARTIFACT_BYTES=10_000_000,
                   DOC_ATTENTION=1)
    final, log = run_train(env, tmp_path, nproc=2)
    assert final["rank_weights_identical"] is True and final["steps"] == 6
    assert "step 3: the crawler runs 3 of 3 loops" in log
    assert "quant fit: probe 2: SDClip widths x 0.5000" in log and final["quant_fit_scale"] == 0.5
    assert "attention: sdpa (auto" in log and final["config"]["doc_attention"] is True  # the masked SDPA on CPUs


def test_layouts_without_skips_and_old_configs():
    _, model = model_of(NUM_FLAT_LAYERS=2, NUM_ENCODER_LAYERS=2)
    assert model.skip_weights is None  # no zero-size parameter that would never get a gradient
    with pytest.raises(T.ConfigError, match="with fewer crawler loops this layout has no U-Net skip"):
        model_of(NUM_FLAT_LAYERS=0, NUM_CRAWLER_LAYERS=1, UNET_SKIPS="executed", CRAWLER_START_FRAC=0.3)
    with pytest.raises(T.ConfigError, match=r"CRAWLER_START_FRAC=1.0: give one share of the budget in \[0, 1\)"):
        hparams(CRAWLER_START_FRAC=1)
    with pytest.raises(T.ConfigError, match="MUON_BACKEND_STEPS=4: MUON_NS=polar is tuned for exactly 5 steps"):
        hparams(MUON_NS="polar", MUON_BACKEND_STEPS=4)
    # a checkpoint written before these settings existed: its layout, not the environment's
    h = hparams(NUM_FLAT_LAYERS=6, CONTROL_VECTORS="block", UNET_SKIPS="executed")
    old = {k: v for k, v in hparams(NUM_FLAT_LAYERS=5).model_config().items() if k not in T.Hyperparameters.LEGACY_SHAPE}
    h.use_model_config(old)
    assert (h.num_flat_layers, h.num_encoder_layers, h.control_vectors, h.unet_skips) == (5, 2, "application", "flat")
