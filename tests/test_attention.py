"""ATTENTION: backend choice and the FlashAttention-4 wrapper (a torch.library custom op), checked on the CPU
with a stand-in kernel that has FA4's calling convention."""
import sys
import types

import pytest
import torch

import train_gpt as T


def scores_of(q, k):
    """Causal scaled scores [B, H, T, T] in fp32, k's heads repeated for GQA, and q, k, v as [B, H, T, D]."""
    qt, kt = q.float().transpose(1, 2), k.float().transpose(1, 2).repeat_interleave(q.size(2) // k.size(2), 1)
    s = qt @ kt.transpose(-1, -2) / q.size(-1) ** 0.5
    return s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf")), qt, kt


def fa4_fwd(q, k, v, causal, return_lse):  # FA4's _flash_attn_fwd: (out, lse [B, H, T], ...), fresh tensors
    assert causal and return_lse
    s, _, _ = scores_of(q, k)
    vt = v.float().transpose(1, 2).repeat_interleave(q.size(2) // v.size(2), 1)
    return (s.softmax(-1) @ vt).transpose(1, 2).to(q.dtype).contiguous(), s.logsumexp(-1), None, None, None


def fa4_bwd(q, k, v, out, dout, lse, causal):  # FA4's _flash_attn_bwd: (dq, dk, dv), from lse as FA4 does
    s, qt, kt = scores_of(q, k)
    group = q.size(2) // k.size(2)
    vt = v.float().transpose(1, 2).repeat_interleave(group, 1)
    p, do = (s - lse[..., None]).exp(), dout.float().transpose(1, 2)
    dp = do @ vt.transpose(-1, -2)
    ds = p * (dp - (do * out.float().transpose(1, 2)).sum(-1, keepdim=True)) / q.size(-1) ** 0.5
    fold = lambda x: x.unflatten(1, (k.size(2), group)).sum(2).transpose(1, 2).to(k.dtype).contiguous()
    return (ds @ kt).transpose(1, 2).to(q.dtype).contiguous(), fold(ds.transpose(-1, -2) @ qt), fold(p.transpose(-1, -2) @ do)


@pytest.fixture
def fa4(monkeypatch):
    """The stand-in kernels installed as FA4's module and ATTENTION=fa4 selected (all restored afterwards)."""
    stand_in = types.SimpleNamespace(_flash_attn_fwd=fa4_fwd, _flash_attn_bwd=fa4_bwd)
    monkeypatch.setitem(sys.modules, T.ATTN_PACKAGES["fa4"], stand_in)
    for key in ("name", "module"):
        monkeypatch.setitem(T.ATTN, key, T.ATTN[key])
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert T.select_attention("fa4") == "fa4 (ATTENTION=fa4)" and T.ATTN["module"] is stand_in


def qkv(heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, h, 8, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


def grads(fn, q, k, v):
    out = fn(q, k, v)
    out.square().sum().backward()
    return out.detach(), [x.grad.clone() for x in (q, k, v)]


def test_fa4_op_passes_torch_library_checks(fa4):
    """The fake (meta) registration gives the real op's shapes and dtypes, and the autograd registration is
    consistent with the op, under torch.library's own checks (schema, fake tensors, AOT dispatch)."""
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.pgolf.fa4, (q, k, v))
    out, lse = torch.ops.pgolf.fa4(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 4, 16) and lse.dtype == torch.float32


def test_fa4_path_matches_sdpa_forward_and_backward(fa4, monkeypatch):
    out4, g4 = grads(T.attend, *qkv())
    monkeypatch.setitem(T.ATTN, "name", "sdpa")
    out, g = grads(T.attend, *qkv())
    assert torch.allclose(out4, out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g4, g))


def test_fa4_holds_a_fullgraph_compile(fa4):
    """torch.compile(fullgraph=True) raises on a graph break: the op must trace as one node, forward and
    backward, and give the eager result."""
    eager_out, eager_g = grads(T.attend, *qkv(seed=1))
    out, g = grads(torch.compile(T.attend, fullgraph=True, backend="aot_eager"), *qkv(seed=1))
    assert torch.allclose(out, eager_out, atol=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, eager_g))


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


def test_doc_attention_takes_the_masked_sdpa():
    assert T.select_attention("auto", docs=True) == "sdpa (auto: DOC_ATTENTION=1 needs the masked SDPA)"
    with pytest.raises(T.ConfigError, match="DOC_ATTENTION=1 runs on a masked PyTorch SDPA for now, not ATTENTION=fa4"):
        T.select_attention("fa4", docs=True)
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
    idx = torch.randint(2, 9, (2, 16))
    idx[:, [0, 7]] = T.BOS_ID
    masked, plain = T.attend(q, k, v, T.doc_mask(idx)), T.attend(q, k, v)
    assert seen == [(4, False, False), (2, True, True)]
    assert torch.allclose(masked[:, :7], plain[:, :7], atol=1e-6) and not torch.allclose(masked[:, 8:], plain[:, 8:])
