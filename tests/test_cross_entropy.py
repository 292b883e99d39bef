"""CROSS_ENTROPY=triton: the fused softcapped cross-entropy kernels against torch's loss and gradient. On a
machine without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); without triton
the test skips (as in CI, where triton is not installed)."""
import pytest
import torch

import train_gpt as T


@pytest.fixture
def kernels(monkeypatch):
    pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 without a GPU
    T.ce_kernels.cache_clear()
    yield "cuda" if torch.cuda.is_available() else "cpu"
    T.ce_kernels.cache_clear()


@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_fused_ce_matches_torch(kernels, cap):
    """Loss and gradient of bf16 logits, a vocabulary that is not a multiple of the block (the masked tail),
    huge logits (the softcap's saturation) and per-row upstream gradients."""
    g = torch.Generator().manual_seed(0)
    N, V = 6, 2 * T.CE_BLOCK + 37
    logits = (torch.randn(N, V, generator=g) * 8).to(torch.bfloat16)
    logits[0, :3] = torch.tensor([1e4, -1e4, 300.0])
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = 0
    dloss = torch.rand(N, generator=g)
    out = {}
    for fused in (True, False):
        x = logits.to(kernels, copy=True).requires_grad_()
        loss = T.softcapped_nll(x, targets.to(kernels), cap, fused)
        (loss * dloss.to(kernels)).sum().backward()
        out[fused] = loss.detach().cpu(), x.grad.float().cpu()
    (loss, grad), (ref_loss, ref_grad) = out[True], out[False]
    assert torch.allclose(loss, ref_loss, rtol=1e-3, atol=1e-4), (loss - ref_loss).abs().max()
    assert torch.allclose(grad, ref_grad, rtol=2e-2, atol=1e-4), (grad - ref_grad).abs().max()
    assert x.grad.dtype == torch.bfloat16  # the gradient comes back in the logits' dtype


def test_cross_entropy_choice(monkeypatch):
    monkeypatch.setitem(T.CE, "name", T.CE["name"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.select_cross_entropy("auto") == "torch (auto: no CUDA with triton)" and T.CE["name"] == "torch"
    with pytest.raises(T.ConfigError, match="CROSS_ENTROPY=triton needs CUDA and the triton package"):
        T.select_cross_entropy("triton")


def test_fused_ce_holds_a_fullgraph_compile(kernels):
    """The kernels are one opaque op to torch.compile (full graph, forward and backward)."""
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(kernels)
    t = torch.tensor([0, 5, 299, 7], device=kernels)
    fn = lambda x, t: T.softcapped_nll(x, t, 30.0, True).sum()
    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xx = x.clone().requires_grad_()
        f(xx, t).backward()
        grads.append(xx.grad)
    assert torch.equal(*grads)
