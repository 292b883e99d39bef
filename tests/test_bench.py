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
