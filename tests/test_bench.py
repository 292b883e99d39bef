"""scripts/bench.py: configurations parse and the FLOP count is the textbook one (the timing needs a GPU)."""
import sys

import train_gpt as T
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402


def test_config_spec_combines_preset_and_overrides():
    env = bench.parse_config("leg3:SDPA_BACKEND=cudnn,STREAM_DTYPE=fp32")
    assert env["XSA_BLOCKS"] == "crawler" and env["SDPA_BACKEND"] == "cudnn" and env["STREAM_DTYPE"] == "fp32"
    assert bench.parse_config("default") == {}


def test_flops_per_token_counts_matmuls_attention_and_head():
    h = T.Hyperparameters(dict(bench.parse_config("leg3")))
    d, T_, V = 512, 2048, 1024
    attn = d * d + 2 * d * 256 + d * d  # q, k, v (4 of 8 heads), out
    flat, crawl = attn + 2 * d * 3 * d, attn + 2 * d * 6 * d
    mac = 4 * flat + 3 * crawl + 7 * d * (T_ + 1) + V * d + 128 * d
    assert bench.flops_per_token(h) == 2 * mac
    assert abs(bench.flops_per_token(h) / 1e6 - 58.3) < 0.1


def test_kernel_kinds_from_real_h100_kernel_names():
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1": "attention",
        "void cudnn::fusion::fmha_reduce_head<true>(void const*, void*, unsigned int": "attention",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "triton_poi_fused__to_copy__unsafe_view_leaky_relu_pow_23": "fused (inductor)",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>": "other (eager)",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "nccl",
    }
    assert {n: bench.kernel_kind(n) for n in names} == names


def test_inductor_options_are_set_and_typos_rejected():
    import pytest
    import torch._inductor.config as config
    old = config.aggressive_fusion
    try:
        bench.set_inductor_options(f"aggressive_fusion={not old}")
        assert config.aggressive_fusion is (not old)
    finally:
        config.aggressive_fusion = old
    with pytest.raises(SystemExit, match="no option 'agressive_fusion'"):
        bench.set_inductor_options("agressive_fusion=True")
    with pytest.raises(SystemExit, match="no option 'tritn.cudagraphs'"):
        bench.set_inductor_options("tritn.cudagraphs=True")


def test_script_option_measures_another_copy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "train_gpt", T)  # import_script replaces it; restored afterwards
    copy = tmp_path / "variant.py"
    copy.write_text((REPO / "train_gpt.py").read_text() + "\nVARIANT = 7\n")
    module = bench.import_script(str(copy))
    assert module.VARIANT == 7 and sys.modules["train_gpt"] is module and module is not T
