"""Training and evaluation throughput of train_gpt.py on one GPU, one JSON line per configuration.

    python3 scripts/bench.py                                   # run.sh defaults and the Leg3 layout
    python3 scripts/bench.py --configs leg3 leg3:SDPA_BACKEND=cudnn leg3:ATTENTION=fa4 --profile

A configuration is a preset name from presets/ (or `default` for the run.sh defaults) plus optional
`:VAR=value,VAR=value` overrides. Each runs in a fresh process: the real model, optimizers, loader (on a
synthetic shard of random tokens unless --data is given) and Trainer from train_gpt.py, the global batch
of TRAIN_BATCH_TOKENS (786,432) by accumulation of micro-batches (MICRO_BATCH_TOKENS, 98,304 on one GPU). After
compile warm-up it times --steps optimizer steps with the GPU synchronised only at the ends, counting
host-device synchronisations inside the steps (torch.cuda sync debug mode), then times the sliding
evaluation. Reported: ms/step, ms per micro-batch, tokens/s, model TFLOP/s and MFU (matmuls, causal
attention and head, forward + backward = 3x forward), peak memory, compile seconds, graphs compiled during
the timed steps (recompiles), eval tokens/s; with --profile the top CUDA kernels of one step.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preset_env(name):
    """Variables a preset file sets (its `: "${VAR:=value}"` lines)."""
    if name == "default":
        return {}
    path = REPO / "presets" / f"{name}.env"
    if not path.exists():
        sys.exit(f"bench: no preset {name!r} in presets/ (or use 'default')")
    out = subprocess.run(["bash", "-c", f"set -a; source {path}; env -0"], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv and kv.split("=", 1)[0].isupper()
                and kv.split("=", 1)[0] not in ("PATH", "PWD", "SHLVL", "_"))


def parse_config(spec):
    name, _, extra = spec.partition(":")
    env = preset_env(name)
    env.update(kv.split("=", 1) for kv in extra.split(",") if kv)
    return env


def flops_per_token(h):
    """Forward FLOPs per token: every matmul, causal attention (QK^T and AV over (T+1)/2 keys), the head."""
    T = __import__("train_gpt")
    model = T.GPT(h)
    mac = 0
    for j, _, _ in model.schedule:
        mac += sum(m.weight.numel() for m in model.blocks[j].modules() if isinstance(m, T.CastedLinear))
        mac += h.model_dim * (h.train_seq_len + 1)  # scores and weighted values, all heads
    mac += h.vocab_size * h.model_dim + (h.bigram_dim * h.model_dim if h.bigram_vocab_size else 0)
    return 2 * mac


def write_synthetic_shards(folder, vocab, n_train=16_000_000, n_val=2_000_000, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    for name, n in (("fineweb_train_000000.bin", n_train), ("fineweb_val_000000.bin", n_val)):
        tokens = rng.integers(2, vocab, n, dtype=np.uint16)
        tokens[::1500] = 1  # a BOS now and then, as in real shards
        header = np.zeros(256, "<i4")
        header[:3] = 20240520, 1, n
        (folder / name).write_bytes(header.tobytes() + tokens.tobytes())


KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "splitk", "triton_tem")),
    ("nccl", ("nccl",)),
    ("fused (inductor)", ("triton_",)),
    ("optimizer (eager)", ("multi_tensor", "foreach", "adam")),
)


def kernel_kind(name):
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other (eager)")


def import_script(path):
    """train_gpt.py as a module, from the repository or from another copy (to compare implementations)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module
    spec.loader.exec_module(module)
    return module


def set_inductor_options(text):
    """--inductor 'name=value,...': torch._inductor.config knobs to try (values parsed as Python literals)."""
    import ast
    import functools
    import torch._inductor.config as config
    for kv in filter(None, text.split(",")):
        name, value = kv.split("=", 1)
        *parents, leaf = name.split(".")  # e.g. triton.cudagraphs
        obj = functools.reduce(lambda o, part: getattr(o, part, None), parents, config)
        if obj is None or not hasattr(obj, leaf):
            sys.exit(f"bench: torch._inductor.config has no option {name!r}")
        setattr(obj, leaf, ast.literal_eval(value))


def bench_one(env, args):
    """Runs in a fresh process with the configuration already in os.environ."""
    import torch
    T = import_script(args.script)
    h = T.Hyperparameters()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    T.configure_torch(h, True)
    set_inductor_options(args.inductor)  # after the run's own settings, so that it can undo them
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    micro_seqs, accum = T.batch_layout(h, 1)
    run = T.Run(device=device, autocast=autocast)
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench_"))
    if not args.data:
        write_synthetic_shards(data, h.vocab_size)
    loader = T.TrainLoader(T.shard_paths(str(data), "train"), h.train_seq_len, h.seed, 0, 1, device)
    torch.manual_seed(h.seed)
    model = T.GPT(h).to(device)
    compiled = torch.compile(model, dynamic=False, fullgraph=h.compile_fullgraph, mode=args.compile_mode) if h.compile else model
    zeropower = torch.compile(T.newton_schulz, dynamic=False) if h.compile else T.newton_schulz
    trainer = T.Trainer(model, compiled, T.build_optimizers(model, h, run, zeropower), h, accum, autocast)
    trainer.ema = T.EMA(model, h.ema_decay) if h.ema_decay else None

    t = time.perf_counter()
    for s in range(args.warmup):
        trainer.step(loader.next_step(micro_seqs, accum), *T.schedule(s, 0.0, h))
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    graphs = T.compile_stats()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter()
        for s in range(args.steps):
            trainer.step(loader.next_step(micro_seqs, accum), *T.schedule(s, 0.0, h))
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    step_ms = 1000 * (time.perf_counter() - t) / args.steps
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    tokens_s = h.train_batch_tokens / step_ms * 1000
    tflops = flops_per_token(h) * 3 * tokens_s / 1e12
    out = dict(config=args.one, script=os.path.relpath(args.script, REPO), inductor=args.inductor,
               compile_mode=args.compile_mode or "default", params=sum(p.numel() for p in model.parameters()), attention=T.ATTN["name"], doc_attention=h.doc_attention,
               sdpa_backend=h.sdpa_backend, stream_dtype=h.stream_dtype, gpu=torch.cuda.get_device_name(device),
               torch=torch.__version__, ms_per_step=round(step_ms, 2), ms_per_microbatch=round(step_ms / accum, 2),
               tokens_per_s_per_gpu=round(tokens_s), model_tflops=round(tflops, 1),
               mfu=round(tflops / args.peak_tflops, 4), peak_mem_mib=torch.cuda.max_memory_allocated() // 2**20,
               compile_s=round(compile_s, 1), host_syncs_in_steps=syncs,
               graphs_during_steps=T.compile_stats()[0] - graphs[0], steps=args.steps, accum=accum)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            trainer.step(loader.next_step(micro_seqs, accum), *T.schedule(0, 0.0, h))
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total) for e in prof.key_averages()), key=lambda kv: -kv[1])
        total = sum(v for _, v in kernels) or 1
        kinds = collections.Counter()
        for k, v in kernels:
            kinds[kernel_kind(k)] += v
        out["gpu_ms_by_kind"] = {k: round(v / 1000, 2) for k, v in kinds.most_common()}
        out["top_kernels"] = [[k[:90], round(v / 1000, 2), round(v / total, 3)] for k, v in kernels[:args.top]]

    if args.eval_tokens:
        val = T.load_val_tokens(str(data))[:args.eval_tokens + 1]
        V = h.vocab_size  # one byte per token: only the speed matters here
        luts = [t.to(device) for t in (torch.ones(V, dtype=torch.long), torch.zeros(V, dtype=torch.bool),
                                       torch.ones(V, dtype=torch.bool))]
        short = val[:h.eval_batch_seqs * h.eval_stride + h.eval_seq_len + 1]
        t = time.perf_counter()
        T.evaluate(compiled, short, luts, h, run, h.eval_stride)  # compiles the eval graph
        torch.cuda.synchronize()
        out["eval_compile_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        res = T.evaluate(compiled, val, luts, h, run, h.eval_stride)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
        out.update(eval_stride=h.eval_stride, eval_tokens=res["val_tokens"], eval_s=round(secs, 2),
                   eval_tokens_per_s=round(res["val_tokens"] / secs))
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["default", "leg3"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=1_000_000, help="sliding-eval tokens to time; 0 = skip")
    ap.add_argument("--data", help="folder with shards (default: a synthetic random-token shard)")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of one step")
    ap.add_argument("--top", type=int, default=15, help="kernels listed with --profile")
    ap.add_argument("--script", default=str(REPO / "train_gpt.py"), help="the train_gpt.py to measure")
    ap.add_argument("--inductor", default="", help="torch._inductor.config options to try, 'name=value,...'")
    ap.add_argument("--compile-mode", help="torch.compile mode for the model (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return bench_one(os.environ, args)
    rows = []
    for spec in args.configs:
        env = dict(os.environ, **parse_config(spec), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, __file__, "--one", spec] + sys.argv[1:]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else dict(
            config=spec, error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'config':40} {'ms/step':>8} {'ms/mb':>7} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>5} {'eval tok/s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:40} error: {r['error']}")
            continue
        print(f"{r['config']:40} {r['ms_per_step']:8.1f} {r['ms_per_microbatch']:7.2f} {r['tokens_per_s_per_gpu']:10,} "
              f"{r['model_tflops']:8.1f} {r['mfu']:6.1%} {r['peak_mem_mib'] / 1024:5.1f} {r.get('eval_tokens_per_s', 0):11,}")


if __name__ == "__main__":
    main()
