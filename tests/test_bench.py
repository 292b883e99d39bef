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


def test_profile_summary_splits_communication_into_hidden_and_exposed():
    import profile_steps as P
    events = [("nvjet_sm90_gemm", 0, 10), ("triton_poi_fused_mul", 20, 10),  # compute: [0, 10) and [20, 30)
              ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 5, 20),  # [5, 25): 10 us under compute, 10 alone
              ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 8, 4),  # inside the one above: no extra time
              ("ncclDevKernel_AllGather_RING_LL", 40, 6)]  # alone
    s = P.summarize(events, steps=2)  # per step: halves
    assert s["comm"]["AllReduce"] == dict(calls=1.0, ms=0.01, overlapped_ms=0.005, exposed_ms=0.005)
    assert s["comm"]["AllGather"] == dict(calls=0.5, ms=0.003, overlapped_ms=0.0, exposed_ms=0.003)
    assert (s["comm_ms"], s["comm_exposed_ms"], s["gpu_busy_ms"], s["gpu_span_ms"]) == (0.013, 0.008, 0.018, 0.023)
    assert s["compute_ms_by_kind"] == {"matmul": 0.005, "fused (inductor)": 0.005}


def test_profile_wrapper_records_steps_after_warmup_and_leaves_the_run_unchanged(corpus, tmp_path):
    """PROFILE=1 through run.sh: rank 0 profiles steps 3-4 counted after the compile warm-up, writes the JSON and
    trace, and the run's numbers equal an unprofiled run's."""
    import json
    import os
    import shutil
    import subprocess
    from conftest import read_log, tiny_env
    for name in ("run.sh", "train_gpt.py", "scripts/bench.py", "scripts/profile_steps.py"):  # logs/ land in the copy
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    finals = []
    for profile in ("0", "1"):
        env = dict({k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                   **tiny_env(corpus, RUN_ID=f"prof{profile}", ITERATIONS=6, WARMUP_STEPS=2, EVAL_STRIDE=0),
                   PROFILE=profile, PROFILE_AT="3", PROFILE_STEPS="2", NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(["bash", str(tmp_path / "run.sh")], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        final, log = read_log(tmp_path, f"prof{profile}")
        finals.append(final)
    assert "profile: steps 3-4 on rank 0" in log
    prof = json.loads((tmp_path / "logs" / "prof1_profile.json").read_text())
    assert prof["first_step"] == 3 and prof["steps"] == 2 and prof["world_size"] == 1
    assert (tmp_path / "logs" / "prof1_profile_trace.json.gz").stat().st_size > 0
    assert finals[0]["roundtrip_val_bpb"] == finals[1]["roundtrip_val_bpb"]


def test_run_settings_switch_off_inductors_mix_order_reduction():
    """Its fused gradient sums made CRAWLER_CARRY steps 6% slower on an H100 (README); train_gpt.py's main and
    scripts/bench.py both take the setting from configure_torch."""
    import torch._inductor.config as config
    old = config.triton.mix_order_reduction
    try:
        config.triton.mix_order_reduction = True
        assert T.configure_torch(T.Hyperparameters({}), cuda=False).startswith("sdpa")
        assert config.triton.mix_order_reduction is False
    finally:
        config.triton.mix_order_reduction = old
