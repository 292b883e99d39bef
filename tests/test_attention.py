"""ATTENTION: backend choice and the FlashAttention-4 wrapper (a torch.library custom op), checked on the CPU
with a stand-in kernel that has FA4's calling convention."""
import sys
import types

import pytest
import torch

import train_gpt as T


def scores_of(q, k, cu=None):
    """Causal scaled scores [B, H, T, T] in fp32 (with varlen starts `cu`: q, k are [tokens, H, D], one batch
    row, and a token sees only its own sequence), k's heads repeated for GQA, and q, k as [B, H, T, D]."""
    if cu is not None:
        q, k = q[None], k[None]
    qt, kt = q.float().transpose(1, 2), k.float().transpose(1, 2).repeat_interleave(q.size(2) // k.size(2), 1)
    s = qt @ kt.transpose(-1, -2) / q.size(-1) ** 0.5
    hidden = torch.ones_like(s[0, 0], dtype=torch.bool).triu(1)
    if cu is not None:
        seq = torch.bucketize(torch.arange(q.size(1)), cu.long(), right=True)
        hidden = hidden | (seq[:, None] != seq[None, :])
    return s.masked_fill(hidden, float("-inf")), qt, kt


def unbatch(x, cu):
    return x if cu is None else x[0]


def fa4_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
    """FA4's _flash_attn_fwd: (out, lse [B, H, T] or [H, tokens] with cu_seqlens, ...), fresh tensors."""
    assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
    assert (cu_seqlens_q is None) == (max_seqlen_q is None) and (cu_seqlens_q is None or cu_seqlens_q.dtype == torch.int32)
    s, _, _ = scores_of(q, k, cu_seqlens_q)
    vt = (v if cu_seqlens_q is None else v[None]).float().transpose(1, 2).repeat_interleave(q.size(-2) // v.size(-2), 1)
    out = unbatch((s.softmax(-1) @ vt).transpose(1, 2), cu_seqlens_q)
    return out.to(q.dtype).contiguous(), unbatch(s.logsumexp(-1), cu_seqlens_q), None, None, None


def fa4_bwd(q, k, v, out, dout, lse, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """FA4's _flash_attn_bwd: (dq, dk, dv), from lse as FA4 does."""
    cu = cu_seqlens_q
    if cu is not None:
        v, out, dout, lse = v[None], out[None], dout[None], lse[None]
    s, qt, kt = scores_of(q, k, cu)
    group = q.size(-2) // k.size(-2)
    vt = v.float().transpose(1, 2).repeat_interleave(group, 1)
    p, do = (s - lse[..., None]).exp(), dout.float().transpose(1, 2)
    dp = do @ vt.transpose(-1, -2)
    ds = p * (dp - (do * out.float().transpose(1, 2)).sum(-1, keepdim=True)) / q.size(-1) ** 0.5
    fold = lambda x: unbatch(x.unflatten(1, (k.size(-2), group)).sum(2).transpose(1, 2), cu).to(k.dtype).contiguous()
    dq = unbatch((ds @ kt).transpose(1, 2), cu).to(q.dtype).contiguous()
    return dq, fold(ds.transpose(-1, -2) @ qt), fold(p.transpose(-1, -2) @ do)


@pytest.fixture
def fa4(monkeypatch):
    """The stand-in kernels installed as FA4's module and ATTENTION=fa4 selected (all restored afterwards)."""
    stand_in = types.SimpleNamespace(_flash_attn_fwd=fa4_fwd, _flash_attn_bwd=fa4_bwd)
    monkeypatch.setitem(sys.modules, T.ATTN_PACKAGES["fa4"], stand_in)
    for key in ("name", "module"):
        monkeypatch.setitem(T.ATTN, key, T.ATTN[key])
    monkeypatch.setattr(T, "VARLEN_DOC_TOKENS", 16)  # room for these tiny rows' documents, and some padding
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert T.select_attention("fa4") == "fa4 (ATTENTION=fa4)" and T.ATTN["module"] is stand_in


def qkv(heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 48, h, 8, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


def grads(fn, q, k, v):
    out = fn(q, k, v)
    out.square().sum().backward()
    return out.detach(), [x.grad.clone() for x in (q, k, v)]


def packed_idx(B=2, T=48, starts=((0, 5, 11), (3, 4))):
    """Token ids [B, T] with BOS at the given positions of each row."""
    idx = torch.randint(2, 9, (B, T), generator=torch.Generator().manual_seed(5))
    for b, row in enumerate(starts):
        idx[b, list(row)] = T_BOS
    return idx


T_BOS = T.BOS_ID


def test_fa4_op_passes_torch_library_checks(fa4):
    """The fake (meta) registration gives the real op's shapes and dtypes, dense and varlen, and the autograd
    registration is consistent with the op, under torch.library's own checks (schema, fake tensors, AOT dispatch)."""
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.pgolf.fa4, (q, k, v, None, 0))
    out, lse = torch.ops.pgolf.fa4(q, k, v, None, 0)
    assert out.shape == q.shape and lse.shape == (2, 4, 48) and lse.dtype == torch.float32
    cu = T.attention_layout(packed_idx(), True)
    flat = [x.detach().flatten(0, 1).requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.pgolf.fa4, (*flat, cu, 96))
    out, lse = torch.ops.pgolf.fa4(*flat, cu, 96)
    assert out.shape == (96, 4, 8) and lse.shape == (4, 96) and lse.dtype == torch.float32


def test_varlen_layout_marks_every_document_and_row_start(fa4, monkeypatch):
    """FlashAttention's layout: the flattened batch's sequence starts (each BOS and each row start, nothing
    else), then empty sequences up to a fixed count, so the compiled graph sees one shape. A row with more
    starts than its room runs its last documents as one causal sequence, within the row."""
    cu = T.attention_layout(packed_idx(), True)
    cap = 2 * (1 + 48 // T.VARLEN_DOC_TOKENS)
    assert cu.dtype == torch.int32 and cu.shape == (cap + 1,) and cap > 6
    assert cu.tolist() == [0, 5, 11, 48, 51, 52] + [96] * (cap - 5)
    assert T.attention_layout(packed_idx(), False) is None
    monkeypatch.setattr(T, "VARLEN_DOC_TOKENS", 48)  # room for one start per row beyond the row's own
    assert T.attention_layout(packed_idx(), True).tolist() == [0, 5, 48, 51, 96]  # never across rows


def test_fa4_path_matches_sdpa_forward_and_backward(fa4, monkeypatch):
    """Dense and with DOC_ATTENTION (varlen against SDPA's document mask), values and gradients."""
    for docs in (False, True):
        monkeypatch.setitem(T.ATTN, "name", "fa4")
        layout = T.attention_layout(packed_idx(), docs)
        out4, g4 = grads(lambda *x: T.attend(*x, layout), *qkv())
        monkeypatch.setitem(T.ATTN, "name", "sdpa")
        layout = T.attention_layout(packed_idx(), docs)
        out, g = grads(lambda *x: T.attend(*x, layout), *qkv())
        assert torch.allclose(out4, out, atol=1e-5), docs
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g4, g)), docs


def test_fa4_holds_a_fullgraph_compile(fa4):
    """torch.compile(fullgraph=True) raises on a graph break: the op (and the varlen layout's fixed-size
    nonzero) must trace as one graph, forward and backward, and give the eager result."""
    idx = packed_idx()
    for docs in (False, True):
        fn = lambda q, k, v, idx: T.attend(q, k, v, T.attention_layout(idx, docs))
        eager_out, eager_g = grads(lambda *x: fn(*x, idx), *qkv(seed=1))
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out, g = grads(lambda *x: compiled(*x, idx), *qkv(seed=1))
        assert torch.allclose(out, eager_out, atol=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, eager_g))


def test_flex_matches_masked_sdpa(monkeypatch):
    """ATTENTION=flex: its block mask (causal, and within documents with DOC_ATTENTION) gives SDPA's result.
    Forward only: FlexAttention has no CPU backward (on CUDA it trains)."""
    q, k, v = (x.detach() for x in qkv())
    for docs in (False, True):
        monkeypatch.setitem(T.ATTN, "name", "flex")
        flex = T.attend(q, k, v, T.attention_layout(packed_idx(), docs))
        monkeypatch.setitem(T.ATTN, "name", "sdpa")
        sdpa = T.attend(q, k, v, T.attention_layout(packed_idx(), docs))
        assert torch.allclose(flex, sdpa, atol=1e-5), docs


def test_flex_mask_on_cuda_is_compiled_without_the_deprecated_flag(monkeypatch):
    """Eager flex on CUDA builds its document mask through torch.compile(create_block_mask), not create_block_mask's
    `_compile=True`, which torch 2.11 warns about in every eval ("will be removed in the future")."""
    import warnings
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the CUDA branch, run on the CPU
    monkeypatch.setitem(T.ATTN, "name", "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        layout = T.attention_layout(packed_idx(), True)
    assert [fn.__name__ for fn in compiled] == ["create_block_mask"]
    monkeypatch.undo()
    q, k, v = (x.detach() for x in qkv())
    monkeypatch.setitem(T.ATTN, "name", "flex")
    flex = T.attend(q, k, v, layout)
    monkeypatch.setitem(T.ATTN, "name", "sdpa")
    assert torch.allclose(flex, T.attend(q, k, v, T.attention_layout(packed_idx(), True)), atol=1e-5)


def test_attention_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.select_attention("auto") == "sdpa (auto: no FlashAttention 3 or 4 importable on CUDA)"
    assert T.select_attention("sdpa") == "sdpa (ATTENTION=sdpa)" and T.ATTN["name"] == "sdpa"
    for name, module in (("fa4", "flash_attn.cute.interface"), ("fa3", "flash_attn_interface")):
        with pytest.raises(T.ConfigError, match=f"ATTENTION={name}: module {module} is not importable"):
            T.select_attention(name)
    with pytest.raises(T.ConfigError, match="ATTENTION"):
        T.Hyperparameters({"ATTENTION": "flash2"})


def test_doc_attention_scores_each_document_as_if_alone():
    """DOC_ATTENTION=1: a row packing three documents gives every token the loss it gets when its document
    runs alone (RoPE is relative; SmearGate and BigramHash already stop at BOS); without it, later
    documents see earlier ones."""
    from conftest import tiny_hparams
    g = torch.Generator().manual_seed(3)
    docs = [torch.cat([torch.tensor([T.BOS_ID]), torch.randint(2, 60, (n,), generator=g)]) for n in (6, 9, 12)]
    row = torch.cat(docs)
    losses = {}
    for doc_attention in (True, False):
        torch.manual_seed(0)
        model = T.GPT(tiny_hparams(DOC_ATTENTION=int(doc_attention), CRAWLER_LOOPS=2))
        with torch.no_grad():
            for p in model.parameters():  # away from the zero init, so attention mixes positions
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            packed = model(row[None, :-1], row[None, 1:])[0]
            # alone: each document, its last target the next document's BOS (the row's last: none)
            pieces = [torch.cat([d, e[:1]]) for d, e in zip(docs, docs[1:])] + [docs[-1]]
            alone = torch.cat([model(x[None, :-1], x[None, 1:])[0] for x in pieces])
        losses[doc_attention] = packed, alone
    packed, alone = losses[True]
    assert packed.shape == alone.shape and torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    leaky, alone_off = losses[False]
    assert not torch.allclose(leaky[len(docs[0]):], alone_off[len(docs[0]):], atol=1e-3)


def test_doc_attention_choice(monkeypatch):
    """auto with DOC_ATTENTION=1: flex on CUDA without FlashAttention, the masked SDPA on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.select_attention("auto", docs=True) == "sdpa (auto: no FlashAttention 3 or 4 importable on CUDA)"
    with pytest.raises(T.ConfigError, match="ATTENTION=flex needs CUDA"):
        T.select_attention("flex", docs=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(T.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    assert T.select_attention("auto", docs=True) == ("flex (auto: no FlashAttention 3 or 4 importable on CUDA, "
                                                     "flex for DOC_ATTENTION=1)")
    assert T.select_attention("auto") == "sdpa (auto: no FlashAttention 3 or 4 importable on CUDA)"
    T.select_attention("sdpa")
    with pytest.raises(T.ConfigError, match="SDPA_BACKEND=flash takes no mask"):
        T.Hyperparameters({"DOC_ATTENTION": "1", "SDPA_BACKEND": "flash"})


def test_masked_sdpa_gets_full_heads(monkeypatch):
    """With a document mask SDPA is given as many k/v heads as q heads: on CUDA no fused kernel takes a mask
    and GQA together, and the fallback (math) materialises fp32 scores per head."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.size(1), kw["enable_gqa"], kw["attn_mask"] is None)) or real(q, k, v, **kw))
    q, k, v = qkv()
    masked, plain = T.attend(q, k, v, T.attention_layout(packed_idx(), True)), T.attend(q, k, v)
    assert seen == [(4, False, False), (2, True, True)]
    assert torch.allclose(masked[0, :5], plain[0, :5], atol=1e-6) and not torch.allclose(masked[0, 5:], plain[0, 5:])


def test_flex_document_mask_is_defined_on_whole_blocks():
    """The compiled flex kernel evaluates the mask on whole 128-position blocks; at a window length that is not a
    multiple of 128 (an eval's last window) an unpadded table of document ids was read past its end: an illegal
    memory access on the GPU, an IndexError here."""
    idx = packed_idx(T=200, starts=((0, 77, 150), (3,)))
    T.ATTN["name"], name = "flex", T.ATTN["name"]
    try:
        mask = T.attention_layout(idx, True)
    finally:
        T.ATTN["name"] = name
    edge = torch.tensor(T.FLEX_BLOCK * 2 - 1)  # the last position of the last, partial block
    for b in (0, 1):
        assert not mask.mask_mod(torch.tensor(b), torch.tensor(0), edge, torch.tensor(5))  # padding: hidden, no read error
        assert mask.mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(199), torch.tensor(150 if b == 0 else 3))
    assert not mask.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(199), torch.tensor(149))


def test_every_backend_auto_can_pick_scores_the_same_eval(fa4, monkeypatch):
    """The evaluation after export through each kernel ATTENTION=auto can choose (FlashAttention varlen here by the
    stand-in, flex, masked SDPA), document masks on, with a last window shorter than the others and not a multiple of
    flex's block: every backend scores every target, and all agree."""
    from conftest import tiny_hparams
    h = tiny_hparams(DOC_ATTENTION=1, TRAIN_SEQ_LEN=192, EVAL_BATCH_SEQS=4)
    torch.manual_seed(0)
    model = T.GPT(h)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(2, 500, (192 * 5 + 71,), generator=g).numpy()
    tokens[::97] = T.BOS_ID
    luts = (torch.ones(512, dtype=torch.long), torch.zeros(512, dtype=torch.bool), torch.zeros(512, dtype=torch.bool))
    scores = {}
    for name in ("fa4", "flex", "sdpa"):
        monkeypatch.setitem(T.ATTN, "name", name)
        scores[name] = T.evaluate(model, tokens, luts, h, T.Run())
    assert {s["val_tokens"] for s in scores.values()} == {len(tokens) - 1}
    losses = [s["val_loss"] for s in scores.values()]
    assert max(losses) - min(losses) < 1e-5, scores
    # flex scores through the model torch.compile wraps (its whole-model no-grad graph crashed on the GPU)
    compiled = types.SimpleNamespace(_orig_mod=model)
    monkeypatch.setitem(T.ATTN, "name", "flex")
    assert T.evaluate(compiled, tokens, luts, h, T.Run()) == scores["flex"]
