"""Parameter Golf: a flat + crawler GPT trained in 10 minutes, scored in bits per byte.

Unique "flat" blocks form a U-Net; between its halves weight-shared "crawler" blocks run CRAWLER_LOOPS
times, so depth costs no bytes. The model is a list of unique blocks plus a schedule of their
applications; each application may own its control vectors, so the loops of a shared block can differ.
Read top to bottom: hyperparameters, run context, data, model, optimizers, quantization, eval,
training, main. Budget: at most 48 KB lzma-packed (as records ship it): these bytes count against the
16 MB artifact.

Run: torchrun --standalone --nproc_per_node=N train_gpt.py   (or python3 train_gpt.py); see README.md.
"""
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import typing
import uuid

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------------
# HYPERPARAMETERS


class ConfigError(Exception):
    """Bad setting or input: reported as one line (stderr and the run's log), exit code 2."""


class EnvReader:
    """Reads typed environment variables; a value that does not parse or fit says what is allowed.
    Names read while `group` is set are listed in groups[group] (the model shape, the training-only settings)."""

    def __init__(self, environ):
        self.environ, self.names, self.groups, self.group = environ, set(), collections.defaultdict(list), None

    def read(self, name, default, kind, lo=None, hi=None, choices=None):
        self.names.add(name)
        if self.group:
            self.groups[self.group].append(name.lower())
        text = self.environ.get(name, "").strip()
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}") from None
        if kind is float and not math.isfinite(value):  # nan would pass every bound check below
            raise ConfigError(f"{name}={text!r}: must be a finite number")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={text!r}: allowed values are {', '.join(map(str, choices))}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{name}={text!r}: must be between {lo} and {hi}")
        return value


def flag(text):
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def floats(text):
    return tuple(float(t) for t in text.split(","))


class Hyperparameters:
    """Every environment variable the script reads, with its default; README.md documents each."""

    # 0 or empty means "follows other settings": (setting, its value then), resolved in this order
    DERIVED = (("eval_seq_len", lambda h: h.train_seq_len), ("eval_stride", lambda h: h.eval_seq_len),
               ("crawler_quant_bits", lambda h: h.quant_bits), ("ttt_lora_docs", lambda h: 64 * h.world),
               ("gptq_sdclip_k_attn", lambda h: h.gptq_sdclip_k), ("gptq_sdclip_k_mlp", lambda h: h.gptq_sdclip_k),
               ("data_path", lambda h: f"./data/datasets/fineweb10B_sp{h.vocab_size}"),  # the downloader's layout
               ("tokenizer_path", lambda h: f"./data/tokenizers/fineweb_{h.vocab_size}_bpe.model"))

    def __init__(self, environ=os.environ):
        r = EnvReader(environ)
        self.world = int(environ.get("WORLD_SIZE", 1))  # torchrun's rank count: the process group and per-rank batch defaults
        s = lambda n, d, **k: r.read(n, d, str, **k)
        i = lambda n, d, **k: r.read(n, d, int, **k)
        f = lambda n, d, **k: r.read(n, d, float, **k)
        b = lambda n, d: r.read(n, d, flag)
        # Data and run identity
        self.data_path = s("DATA_PATH", "")  # fineweb_{train,val}_NNNNNN.bin; empty = fineweb10B_sp<VOCAB_SIZE>
        self.tokenizer_path = s("TOKENIZER_PATH", "")  # empty = fineweb_<VOCAB_SIZE>_bpe.model
        self.run_id = s("RUN_ID", datetime.datetime.now().strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6])
        self.seed = i("SEED", 1337, lo=0)
        self.warmup_steps = i("WARMUP_STEPS", 5, lo=0)  # compile warm-up on random tokens (also TTT's), then rolled back
        # Training length, batch and schedule
        r.group = "train"
        self.iterations = i("ITERATIONS", 20000, lo=0)  # step cap; the wall clock usually stops first
        self.max_wallclock_seconds = f("MAX_WALLCLOCK_SECONDS", 600.0, lo=0)  # 0 = no cap, schedule by steps
        self.train_batch_tokens = i("TRAIN_BATCH_TOKENS", 786_432, lo=1)  # global tokens per step
        self.micro_batch_tokens = i("MICRO_BATCH_TOKENS", 0, lo=0)  # per rank per forward; 0 = up to 98,304
        self.lr_warmup_steps = i("LR_WARMUP_STEPS", 20, lo=0)  # Adam's first full steps spike the loss
        self.warmdown_frac = f("WARMDOWN_FRAC", 0.7, lo=0, hi=1)  # final share of the budget with linear decay
        self.min_lr_frac = f("MIN_LR_FRAC", 0.1, lo=0, hi=1)  # LR multiplier at the end of warmdown
        self.train_log_every = i("TRAIN_LOG_EVERY", 100, lo=1)
        self.val_loss_every = i("VAL_LOSS_EVERY", 0, lo=0)  # 0 = only the final eval
        # Model shape: checkpoints and artifacts carry these (model_config)
        r.group = "shape"
        self.train_seq_len = i("TRAIN_SEQ_LEN", 2048, lo=2)  # also the default eval window
        self.vocab_size = i("VOCAB_SIZE", 1024, lo=2, hi=65536)
        self.model_dim = i("MODEL_DIM", 512, lo=8)
        self.num_heads = i("NUM_HEADS", 8, lo=1)
        self.num_kv_heads = i("NUM_KV_HEADS", 4, lo=1)
        self.num_flat_layers = i("NUM_FLAT_LAYERS", 4, lo=0)  # unique blocks: encoder flats, then decoder flats
        self.num_encoder_layers = i("NUM_ENCODER_LAYERS", -1, lo=-1)  # flats before the crawler; -1 = half
        self.num_crawler_layers = i("NUM_CRAWLER_LAYERS", 1, lo=1)  # shared blocks run once per loop
        self.crawler_loops = i("CRAWLER_LOOPS", 3, lo=0)  # 0 = plain U-Net GPT of the flat blocks
        self.crawler_loop_rope_scales = r.read("CRAWLER_LOOP_ROPE_SCALES", (), floats)  # per loop RoPE wavelength factor
        self.crawler_carry = s("CRAWLER_CARRY", "")  # learned | frozen:<betas>;<alphas>: later loops' outputs mix loop 0's
        self.control_vectors = s("CONTROL_VECTORS", "application", choices=("application", "block"))  # per application or block
        self.unet_skips = s("UNET_SKIPS", "flat", choices=("flat", "executed"))  # U-Net skip pairs: see route()
        self.skip_gate = b("SKIP_GATE", False)  # skips enter as lerp(w * skip, x, sigmoid(gate))
        self.parallel_last_n = i("PARALLEL_LAST_N", 0, lo=0)  # last N applications: attention and MLP in two lanes
        self.attn_gate = b("ATTN_GATE", False)  # per-head sigmoid gate on attention output
        self.doc_attention = b("DOC_ATTENTION", False)  # attention never crosses a BOS (training and eval)
        self.mlp_mult = f("MLP_MULT", 3.0, lo=0.25)
        self.crawler_mlp_mult = f("CRAWLER_MLP_MULT", 6.0, lo=0.25)
        self.mlp_act = s("MLP_ACT", "leaky_relu_sq", choices=("relu_sq", "leaky_relu_sq"))
        self.mlp_leaky_slope = f("MLP_LEAKY_SLOPE", 0.5, lo=0, hi=1)
        self.rope_base = f("ROPE_BASE", 10000.0, lo=1)
        self.rope_dims = i("ROPE_DIMS", 16, lo=0)  # rotated dims per head (partial RoPE); 0 = no RoPE
        self.xsa_blocks = s("XSA_BLOCKS", "all")  # all | crawler | none | comma list of unique block indices
        self.logit_softcap = f("LOGIT_SOFTCAP", 30.0, lo=0)  # 0 = no softcap
        self.bigram_vocab_size = i("BIGRAM_VOCAB_SIZE", 2048, lo=0)  # hash buckets; 0 = no BigramHash
        self.bigram_dim = i("BIGRAM_DIM", 128, lo=1)
        self.smear_gate = b("SMEAR_GATE", True)
        self.ln_scale = b("LN_SCALE", True)  # scale block inputs by 1/sqrt(schedule position + 1)
        r.group = "train"  # settings an artifact does not carry (EVAL_ONLY reports none of them)
        self.qk_gain_init = f("QK_GAIN_INIT", 4.0, lo=0)
        self.crawler_start_frac = r.read("CRAWLER_START_FRAC", (), floats)  # budget shares where the loop count rises: one, or one per rise
        self.tied_embed_init_std = f("TIED_EMBED_INIT_STD", 0.005, lo=0)
        # Optimizers
        self.matrix_lr = f("MATRIX_LR", 0.03, lo=0)  # Muon, block matrices
        self.embed_lr = f("EMBED_LR", 0.035, lo=0)  # AdamW, tied embedding and bigram table
        self.scalar_lr = f("SCALAR_LR", 0.025, lo=0)  # AdamW, vectors and control tensors
        self.muon_momentum = f("MUON_MOMENTUM", 0.99, lo=0, hi=1)
        self.muon_momentum_warmup_start = f("MUON_MOMENTUM_WARMUP_START", 0.92, lo=0, hi=1)
        self.muon_momentum_warmup_steps = i("MUON_MOMENTUM_WARMUP_STEPS", 1500, lo=0)
        self.muon_backend_steps = i("MUON_BACKEND_STEPS", 5, lo=1)
        self.muon_ns = s("MUON_NS", "classic", choices=("classic", "polar"))  # Newton-Schulz coefficients: see NS_COEFFS
        self.muon_row_norm = b("MUON_ROW_NORM", False)  # MuonEq-R: unit-norm rows before orthogonalising
        self.muon_wd = f("MUON_WD", 0.04, lo=0)
        self.embed_wd = f("EMBED_WD", 0.04, lo=0)
        self.scalar_wd = f("SCALAR_WD", 0.0, lo=0)
        self.beta1 = f("BETA1", 0.9, lo=0, hi=1)
        self.beta2 = f("BETA2", 0.95, lo=0, hi=1)
        self.adam_eps = f("ADAM_EPS", 1e-8, lo=0)
        self.grad_clip_norm = f("GRAD_CLIP_NORM", 0.3, lo=0)  # 0 = no clipping
        self.ema_decay = f("EMA_DECAY", 0.997, lo=0, hi=1)  # 0 = no EMA
        # Export: quantization, compression, artifact budget
        self.quant_method = s("QUANT_METHOD", "loop_gptq", choices=("rtn", "gptq", "loop_gptq"))
        self.quant_bits = i("QUANT_BITS", 6, lo=2, hi=8)  # block matrices
        self.crawler_quant_bits = i("CRAWLER_QUANT_BITS", 0, lo=0, hi=8)  # crawler block matrices; 0 = QUANT_BITS
        self.embed_quant_bits = i("EMBED_QUANT_BITS", 8, lo=2, hi=8)  # embedding tables (round to nearest)
        self.crawler_qat = b("CRAWLER_QAT", False)  # fake-quantize the crawler in training
        self.gptq_damp = f("GPTQ_DAMP", 0.01, lo=0)  # Hessian damping, times the mean diagonal
        self.gptq_sdclip_k = f("GPTQ_SDCLIP_K", 0.0, lo=0)  # row clip = k * row std; 0 = per-row MSE clip search
        self.gptq_sdclip_k_attn = f("GPTQ_SDCLIP_K_ATTN", 0.0, lo=0)  # attention matrices; 0 = GPTQ_SDCLIP_K
        self.gptq_sdclip_k_mlp = f("GPTQ_SDCLIP_K_MLP", 0.0, lo=0)  # MLP matrices; 0 = GPTQ_SDCLIP_K
        self.gptq_sdclip_k_crawler = f("GPTQ_SDCLIP_K_CRAWLER", 0.0, lo=0)  # crawler matrices; 0 = their family's k
        self.embed_sdclip_k = f("EMBED_SDCLIP_K", 0.0, lo=0)  # embedding tables; 0 = per-row MSE clip search
        self.embed_gptq = b("EMBED_GPTQ", False)  # GPTQ the tied embedding on the head's inputs
        self.quant_fit = b("QUANT_FIT", False)  # scale SDClip widths to fill the byte budget
        self.quant_fit_probes = i("QUANT_FIT_PROBES", 6, lo=1)  # exports tried at most
        self.lqer_rank = i("LQER_RANK", 0, lo=0)  # rank of the quantization-error correction A B; 0 = no LQER
        self.lqer_tensors = i("LQER_TENSORS", 3, lo=1)  # tensors corrected: most squared error removed per byte
        self.lqer_bits = i("LQER_BITS", 4, lo=2, hi=8)  # bits of the factors A and B (per row)
        self.gptq_loop_iters = i("GPTQ_LOOP_ITERS", 1, lo=0)  # loop_gptq: extra crawler rounds
        self.gptq_calib_tokens = i("GPTQ_CALIB_TOKENS", 262_144, lo=1)  # training tokens for the Hessians (all ranks)
        self.gptq_reserve_seconds = f("GPTQ_RESERVE_SECONDS", 0.0, lo=0)  # training stops this early for export; 0 = measured
        self.compressor = s("COMPRESSOR", "brotli", choices=("zstd", "brotli", "rans", "auto"))
        r.group = None
        self.max_artifact_bytes = i("MAX_ARTIFACT_BYTES", 16_000_000, lo=0)
        self.eval_only = s("EVAL_ONLY", "")  # path of an artifact: evaluate it, no training
        self.export_from = s("EXPORT_FROM", "")  # path of a saved float checkpoint: re-export it, no training
        # Evaluation and score-first test-time training
        self.eval_seq_len = i("EVAL_SEQ_LEN", 0, lo=0)  # 0 = TRAIN_SEQ_LEN
        self.eval_stride = i("EVAL_STRIDE", 64, lo=0)  # sliding window step; 0 = EVAL_SEQ_LEN (no sliding eval)
        self.eval_batch_seqs = i("EVAL_BATCH_SEQS", 32, lo=1)  # windows per forward per rank
        self.eval_doc_isolation = b("EVAL_DOC_ISOLATION", False)  # no context across a BOS
        self.max_eval_seconds = f("MAX_EVAL_SECONDS", 600.0, lo=0)  # warn when the final eval is projected past it
        self.ttt = s("TTT", "off", choices=("off", "sgd", "lora", "phased"))
        self.ttt_chunk_tokens = i("TTT_CHUNK_TOKENS", 32768, lo=1)  # sgd: score this many, then train on them
        self.ttt_lr = f("TTT_LR", 0.005, lo=0)  # sgd: peak LR, cosine over chunks
        self.ttt_epochs = i("TTT_EPOCHS", 3, lo=1)
        self.ttt_momentum = f("TTT_MOMENTUM", 0.9, lo=0, hi=1)
        self.ttt_grad_clip = f("TTT_GRAD_CLIP", 1.0, lo=0)
        self.ttt_batch_seqs = i("TTT_BATCH_SEQS", 16, lo=1)  # sgd: sequences per step (all ranks)
        self.ttt_lora_rank = i("TTT_LORA_RANK", 8, lo=1)
        self.ttt_lora_lr = f("TTT_LORA_LR", 0.001, lo=0)  # AdamW
        self.ttt_lora_chunk = i("TTT_LORA_CHUNK", 256, lo=1)  # lora: tokens scored per step within a document
        self.ttt_lora_docs = i("TTT_LORA_DOCS", 0, lo=0)  # lora: documents per batch, all ranks together; 0 = 64 a rank
        self.ttt_lora_wd = f("TTT_LORA_WD", 0.0, lo=0)  # lora: AdamW weight decay of the adapters
        self.ttt_lora_beta1 = f("TTT_LORA_BETA1", 0.9, lo=0, hi=1)
        self.ttt_phases = i("TTT_PHASES", 3, lo=0)  # phased: global SGD phases over the documents scored so far
        self.ttt_phase_docs = i("TTT_PHASE_DOCS", 2000, lo=1)  # phased: documents scored when the last phase runs
        self.ttt_phase_lr = f("TTT_PHASE_LR", 0.001, lo=0)  # phased: SGD LR of the first phase, cosine over phases
        # Runtime
        self.stream_dtype = s("STREAM_DTYPE", "bf16", choices=("bf16", "fp32"))  # residual stream on CUDA
        self.attention = s("ATTENTION", "auto", choices=("auto", "sdpa", "fa4", "fa3", "flex"))  # auto: fa3, fa4, flex (docs), SDPA
        self.sdpa_backend = s("SDPA_BACKEND", "auto", choices=("auto", "flash", "cudnn", "efficient", "math"))
        self.compile = b("COMPILE", True)
        self.compile_fullgraph = b("COMPILE_FULLGRAPH", True)
        self.save_checkpoint = b("SAVE_CHECKPOINT", True)  # write logs/<RUN_ID>_model.pt (final float weights)
        self.model_keys, self.train_keys = r.groups["shape"], r.groups["train"]
        self.derived = {k for k, _ in self.DERIVED if not getattr(self, k)}
        self.env = {n: environ[n].strip() for n in sorted(r.names) if environ.get(n, "").strip()}  # for the record
        self.resolve()
        prefixes = {n.split("_")[0] for n in r.names}  # CRAWLER_LOOP, ITERATONS: a shared prefix or a near miss
        near = lambda k, cutoff: (difflib.get_close_matches(k, r.names, 1, cutoff) or [""])[0]
        self.unknown_env = {k: near(k, 0.6) for k in sorted(environ)
                            if k not in r.names and (k.split("_")[0] in prefixes or near(k, 0.85))}

    def resolve(self):
        """Fills the settings whose default depends on others (0 = derived), then checks the whole."""
        for k, value in self.DERIVED:
            if k in self.derived:
                setattr(self, k, value(self))
        if self.num_encoder_layers < 0:
            self.num_encoder_layers = self.num_flat_layers // 2
        self.check()

    def model_config(self):
        return {k: getattr(self, k) for k in self.model_keys}

    # What a checkpoint or artifact written before a shape setting existed was built with.
    LEGACY_SHAPE = dict(num_encoder_layers=-1, control_vectors="application", unet_skips="flat", skip_gate=False,
                        parallel_last_n=0, attn_gate=False, doc_attention=False, crawler_carry="")

    def use_model_config(self, config):
        """The architecture of a checkpoint or artifact replaces the environment's; derived defaults follow it."""
        for k, v in {**self.LEGACY_SHAPE, **config}.items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.resolve()

    def check(self):
        d, h, kv = self.model_dim, self.num_heads, self.num_kv_heads
        if d % h or h % kv or (d // h) % 2:
            raise ConfigError(f"MODEL_DIM={d}, NUM_HEADS={h}, NUM_KV_HEADS={kv}: need heads | dim, kv heads | heads, even head dim")
        if self.rope_dims % 2 or self.rope_dims > d // h:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims}: must be even and at most the head dim {d // h}")
        if self.num_flat_layers + self.crawler_loops == 0:
            raise ConfigError("NUM_FLAT_LAYERS=0 with CRAWLER_LOOPS=0 leaves no blocks; set one of them above 0")
        if self.quant_fit and not (self.gptq_sdclip_k or self.gptq_sdclip_k_attn or self.gptq_sdclip_k_mlp
                                   or self.gptq_sdclip_k_crawler or self.embed_sdclip_k):
            raise ConfigError("QUANT_FIT=1 scales SDClip widths: set GPTQ_SDCLIP_K (e.g. 12), it is 0 (clip search)")
        if self.doc_attention and self.sdpa_backend == "flash":
            raise ConfigError("SDPA_BACKEND=flash takes no mask: DOC_ATTENTION=1 needs auto, efficient, cudnn or math")
        starts, k = self.crawler_start_frac, self.crawler_loops
        if starts and not (self.eval_only or self.export_from) and (  # a training setting: checked when training
                len(starts) not in (1, k - 1) or list(starts) != sorted(starts) or not 0 <= starts[0] <= starts[-1] < 1):
            raise ConfigError(f"CRAWLER_START_FRAC={','.join(map(str, starts))}: give one share of the budget in [0, 1) "
                              "for all later loops" + (f", or {k - 1} ascending ones, one per later loop" if k > 2 else ""))
        if self.muon_ns == "polar" and self.muon_backend_steps != len(NS_COEFFS["polar"]):
            raise ConfigError(f"MUON_BACKEND_STEPS={self.muon_backend_steps}: MUON_NS=polar is tuned for exactly "
                              f"{len(NS_COEFFS['polar'])} steps")
        if self.num_encoder_layers > self.num_flat_layers:
            raise ConfigError(f"NUM_ENCODER_LAYERS={self.num_encoder_layers}: at most NUM_FLAT_LAYERS={self.num_flat_layers}")
        scales = self.crawler_loop_rope_scales
        if scales and (len(scales) != self.crawler_loops or not all(0 < s < math.inf for s in scales)):
            raise ConfigError(f"CRAWLER_LOOP_ROPE_SCALES={','.join(map(str, scales))}: give {self.crawler_loops} positive values, one per loop")
        for name in ("eval_only", "export_from"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name.upper()}={path}: no such file")
        if self.ttt == "sgd" and self.ttt_chunk_tokens % self.train_seq_len:
            raise ConfigError(f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens}: must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        after = self.ttt_phase_batches()
        if self.ttt == "phased" and len(set(after)) < len(after):
            raise ConfigError(f"TTT_PHASE_DOCS={self.ttt_phase_docs}: two of the {self.ttt_phases} phases fall after the same "
                              f"batch of TTT_LORA_DOCS={self.ttt_lora_docs} documents; TTT_PHASES x TTT_LORA_DOCS = "
                              f"{self.ttt_phases * self.ttt_lora_docs} documents always give each its own batch")
        if self.ttt in ("lora", "phased") and self.ttt_lora_chunk > self.eval_seq_len:
            raise ConfigError(f"TTT_LORA_CHUNK={self.ttt_lora_chunk}: must be at most EVAL_SEQ_LEN={self.eval_seq_len} "
                              "(a window scores at most that many targets)")
        if self.eval_stride > self.eval_seq_len:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride}: must be at most EVAL_SEQ_LEN={self.eval_seq_len}")
        self.xsa_flags()
        self.carry_values()

    def carry_values(self):
        """CRAWLER_CARRY as (beta [crawler blocks], alpha [block, block]) tensors (learned: their start), or None."""
        n, spec = self.num_crawler_layers, self.crawler_carry
        if not spec:
            return None
        if spec == "learned":
            return torch.ones(n), torch.zeros(n, n)
        try:
            beta, alpha = (floats(t) for t in spec.removeprefix("frozen:").split(";"))
        except ValueError:
            beta = alpha = ()
        if not spec.startswith("frozen:") or len(beta) != n or len(alpha) != n * n:
            raise ConfigError(f"CRAWLER_CARRY={spec!r}: use learned, or frozen:<{n} betas>;<{n * n} alphas> "
                              "(comma-separated; alpha row by row)")
        return torch.tensor(beta), torch.tensor(alpha).view(n, n)

    def loops_at(self, progress):
        """Crawler loops training runs at this share of the budget: 1, then k+2 from CRAWLER_START_FRAC[k] (one
        value: all of them from there); no value: all loops throughout."""
        starts = self.crawler_start_frac * max(self.crawler_loops - 1, 0) if len(self.crawler_start_frac) == 1 \
            else self.crawler_start_frac
        return 1 + sum(progress >= s for s in starts) if starts else self.crawler_loops

    def loop_counts(self):
        """Every loop count training takes (each one a route and a compiled graph) and the full count."""
        return sorted({self.loops_at(s) for s in (0.0, *self.crawler_start_frac)} | {self.crawler_loops})

    def ttt_phase_batches(self):
        """The batch after which each phased-TTT phase runs: the one that brings the documents scored past
        TTT_PHASE_DOCS x p / TTT_PHASES."""
        return [math.ceil(self.ttt_phase_docs * (p + 1) / self.ttt_phases / self.ttt_lora_docs) - 1
                for p in range(self.ttt_phases)]

    def xsa_flags(self):
        """One flag per unique block (flat blocks first, then crawler blocks)."""
        n_flat, n_crawl = self.num_flat_layers, self.num_crawler_layers if self.crawler_loops else 0
        spec, n = self.xsa_blocks, n_flat + n_crawl
        if spec in ("all", "none", "crawler"):
            return [spec == "all" or (spec == "crawler" and j >= n_flat) for j in range(n)]
        try:
            chosen = {int(t) for t in spec.split(",")}
        except ValueError:
            chosen = {-1}
        if not chosen <= set(range(n)):
            raise ConfigError(f"XSA_BLOCKS={spec!r}: use all, crawler, none or block indices 0..{n - 1}")
        return [j in chosen for j in range(n)]

    def as_dict(self):
        """Every setting; EVAL_ONLY: the artifact's shape and the evaluation's settings, none it was trained with."""
        skip = {"unknown_env", "derived", "env", "model_keys", "train_keys", "world", *(self.train_keys if self.eval_only else ())}
        return {k: v for k, v in vars(self).items() if k not in skip}


# ----------------------------------------------------------------------------------------------------
# RUN CONTEXT: where this process runs, its log, progress lines for long phases

PROGRESS_SECONDS = 10.0  # long phases log a progress line at most this often


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt once `open` named it; `error` lines also go to stderr
    (every rank's, until the run is set up). Until `commit` (training or export has started) a failure moves the
    log to logs/<RUN_ID>_failed.txt, so the same RUN_ID can run again."""

    def __init__(self):
        self.path, self.quiet, self.committed = None, False, False

    def commit(self):
        self.committed = True

    def fail(self, msg):
        """The error line; an uncommitted log then moves aside (appended to an earlier failure's)."""
        failed = self.path and not self.committed and self.path[:-4] + "_failed.txt"
        self.error(msg + (f" (log: {failed})" if failed else ""))
        if failed and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as src, open(failed, "a", encoding="utf-8") as dst:
                dst.write(src.read())
            os.remove(self.path)

    def open(self, run_id, rank):
        self.quiet = rank > 0
        if not self.quiet:
            os.makedirs("logs", exist_ok=True)
            self.path = os.path.join("logs", f"{run_id}.txt")

    def __call__(self, msg, stream=None):
        if not self.quiet:
            print(msg, file=stream or sys.stdout, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(msg + "\n")

    def error(self, msg):
        self(f"error: {msg}", sys.stderr)


@dataclasses.dataclass
class Run:
    """This process: rank, world size, device, autocast, log, and a CPU (gloo) group for control messages
    that must not wait on the GPU."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    autocast: object = contextlib.nullcontext()
    log: object = lambda msg: None
    ctrl: object = None

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def all_reduce(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def from_rank0(self, x):
        """Rank 0's number, on every rank."""
        if self.world == 1:
            return x
        msg = torch.tensor([float(x)], dtype=torch.float64)
        dist.broadcast(msg, 0, group=self.ctrl)
        return msg.item()

    def most(self, x):
        """The largest of every rank's number."""
        if self.world == 1:
            return x
        msg = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=self.ctrl)
        return msg.item()

    def agree(self, elapsed_ms, stop, signum):
        """Rank 0's elapsed time and stop decision, and any rank's interrupt signal, identical on every rank
        (a CPU all-reduce of max: no GPU sync in the step)."""
        if self.world == 1:
            return elapsed_ms, stop, signum
        mine = [elapsed_ms, float(stop)] if self.rank == 0 else [0.0, 0.0]
        msg = torch.tensor(mine + [float(signum)], dtype=torch.float64)
        dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=self.ctrl)
        return msg[0].item(), bool(msg[1]), int(msg[2])


def cpu_threads(environ=os.environ, quota_file="/sys/fs/cgroup/cpu.max"):
    """Intra-op threads per rank on the CPU, or None to leave torch's choice (OMP_NUM_THREADS set): the cores this
    process may use (affinity, cgroup quota) shared by the ranks on this machine. torch's default counts the host's
    cores and its threads spin-wait: more threads than free cores ran a loaded 2-core machine 4-8x slower."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = open(quota_file).read().split()
        cores = min(cores, math.ceil(int(quota) / int(period))) if quota != "max" else cores
    return max(1, cores // int(environ.get("LOCAL_WORLD_SIZE", 1)))


def start_run(h, log):
    """Process group (NCCL on CUDA, gloo on CPU), device, autocast, and the log of a new RUN_ID."""
    rank, world = int(os.environ.get("RANK", 0)), h.world
    taken = [p for p in (f"{h.run_id}.txt", f"{h.run_id}_model.pt", f"{h.run_id}_model.ptz", f"{h.run_id}_interrupted.pt")
             if os.path.exists(os.path.join("logs", p))]
    if taken:  # before any rank writes: a rerun never overwrites a run
        raise ConfigError(f"RUN_ID={h.run_id} is taken (logs/{taken[0]} exists); pick a new RUN_ID or leave it unset")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif threads := cpu_threads():
        torch.set_num_threads(min(torch.get_num_threads(), threads))
    ctrl = None
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        ctrl = dist.new_group(backend="gloo")
        dist.barrier(group=ctrl)  # every rank has checked RUN_ID before rank 0 creates its log
    log.open(h.run_id, rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    return Run(rank, world, device, autocast, log, ctrl)


class Progress:
    """`label: done/total unit (pct), rate` at most every PROGRESS_SECONDS, so a long loop never looks hung."""

    def __init__(self, log, label, total, unit):
        self.log, self.label, self.total, self.unit = log, label, total, unit
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done):
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS and done < self.total:
            self.last = now
            self.log(f"{self.label}: {done:,}/{self.total:,} {self.unit} ({done / self.total:.0%}), "
                     f"{done / (now - self.t0):,.1f} {self.unit}/s")


@contextlib.contextmanager
def heartbeat(log, label):
    """Logs `label: still running (Ns)` every PROGRESS_SECONDS while one long call runs."""
    done, t0 = threading.Event(), time.perf_counter()

    def beat():
        while not done.wait(PROGRESS_SECONDS):
            log(f"{label}: still running ({time.perf_counter() - t0:.0f}s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ----------------------------------------------------------------------------------------------------
# DATA: challenge shards = 256 little-endian int32 header (magic, version, token count), uint16 tokens

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES, BOS_ID = 20240520, 1, 1024, 1
CASE_OPERATORS = "\ue001\ue002\ue003\ue004"  # CaseOps' capital markers (data/caseops.py), none of the text's bytes


def fetch_hint(path):
    """The fix for a missing DATA_PATH/TOKENIZER_PATH: the downloader's variant when the path is in its layout."""
    m = re.fullmatch(r"fineweb10B_(sp\d+\w*)|fineweb_(\d+)_bpe(\w*)\.model", os.path.basename(os.path.normpath(path)))
    variant = (m[1] or f"sp{m[2]}{m[3]}") if m else "sp1024"
    return (f"fetch FineWeb with `python3 data/cached_challenge_fineweb.py --variant {variant}`"
            f"{'' if m else ' (or sp8192, sp8192_caseops)'} or build shards with data/build_shards.py")


def open_shard(path):
    """Memory-maps a shard's tokens after checking its header against the file size."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_BYTES // 4)
    if header.size < HEADER_BYTES // 4 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: bad shard header (magic/version {header[:2].tolist()}, expected "
                          f"[{SHARD_MAGIC}, {SHARD_VERSION}]); re-download or rebuild this file")
    n, size = int(header[2]), os.path.getsize(path)
    if size != HEADER_BYTES + 2 * n:
        raise ConfigError(f"{path}: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but the file has "
                          f"{size} bytes; it is truncated or corrupt, re-download or rebuild it")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_paths(data_path, split):
    """fineweb_{split}_NNNNNN.bin exactly: sidecars such as fineweb_val_bytes_000000.bin are not shards."""
    if not os.path.isdir(data_path):
        raise ConfigError(f"DATA_PATH={data_path}: no such folder; {fetch_hint(data_path)}")
    paths = sorted(p for p in glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin"))
                   if re.fullmatch(rf"fineweb_{split}_\d{{6}}\.bin", os.path.basename(p)))
    if not paths:
        raise ConfigError(f"DATA_PATH={data_path}: no fineweb_{split}_NNNNNN.bin shards; {fetch_hint(data_path)}")
    return paths


def check_token_ids(path, tokens, vocab_size):
    """Stops at start-up, not mid-run, when a shard holds ids the embedding cannot take."""
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise ConfigError(f"{path}: token id {top} >= VOCAB_SIZE={vocab_size}; these shards come from a larger "
                          "tokenizer: set VOCAB_SIZE and TOKENIZER_PATH to the ones they were made with")


class TrainLoader:
    """Random seq_len+1 token windows without replacement in an epoch (a permutation from SEED and epoch;
    each epoch shifts the grid). Each rank keeps its slice of the same global batch."""

    def __init__(self, paths, seq_len, seed, rank, world, device=torch.device("cpu")):
        self.shards = [open_shard(p) for p in paths]
        self.seq_len, self.seed, self.rank, self.world, self.device = seq_len, seed, rank, world, device
        self.epoch, self.order, self.pos = -1, None, 0
        self._new_epoch()

    def _new_epoch(self):
        self.epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        phase = int(rng.integers(self.seq_len)) if self.epoch else 0
        counts = [max(0, (len(s) - 1 - phase) // self.seq_len) for s in self.shards]
        if sum(counts) == 0:
            raise ConfigError(f"the training shards hold fewer than TRAIN_SEQ_LEN+1={self.seq_len + 1} tokens")
        shard = np.repeat(np.arange(len(counts)), counts)
        start = phase + self.seq_len * np.concatenate([np.arange(c) for c in counts])
        perm = rng.permutation(len(shard))
        self.order, self.pos = np.stack([shard[perm], start[perm]], 1), 0

    def _take(self, n):
        out = []
        while n:
            if self.pos == len(self.order):
                self._new_epoch()
            part = self.order[self.pos:self.pos + n]
            out.append(part)
            self.pos += len(part)
            n -= len(part)
        return np.concatenate(out)

    def next_step(self, micro_seqs, accum):
        """This rank's `accum` micro-batches (int64 x, y of shape [micro_seqs, seq_len]) of one global step."""
        windows = self._take(micro_seqs * self.world * accum).reshape(accum, self.world, micro_seqs, 2)[:, self.rank]
        L = self.seq_len
        for micro in windows:
            buf = torch.from_numpy(np.stack([self.shards[i][s:s + L + 1] for i, s in micro]).astype(np.int64))
            if self.device.type == "cuda":
                buf = buf.pin_memory().to(self.device, non_blocking=True)
            yield buf[:, :-1], buf[:, 1:]


def load_val_tokens(data_path, vocab_size=65536):
    paths = shard_paths(data_path, "val")
    shards = [open_shard(p) for p in paths]
    for p, s in zip(paths, shards):
        check_token_ids(p, s, vocab_size)
    return np.concatenate(shards)


def load_val_bytes(data_path, tokens, sp):
    """The byte sidecars fineweb_val_bytes_NNNNNN.bin beside the val shards (a text transform such as CaseOps
    writes them: each token's bytes of the original text), concatenated like the shards; None without them."""
    paths = [p.replace("fineweb_val_", "fineweb_val_bytes_") for p in shard_paths(data_path, "val")]
    found = [os.path.isfile(p) for p in paths]
    if not any(found):
        if any(sp.piece_to_id(c) != sp.unk_id() for c in CASE_OPERATORS):
            raise ConfigError(f"DATA_PATH={data_path} has no byte sidecars fineweb_val_bytes_*.bin for a CaseOps tokenizer, "
                              "whose pieces count the transformed text; fetch --variant sp8192_caseops or build the "
                              "shards with build_shards.py --caseops")
        return None
    side = np.concatenate([open_shard(p) for p in paths]) if all(found) else None
    if side is None or len(side) != len(tokens):
        raise ConfigError(f"DATA_PATH={data_path}: the byte sidecars fineweb_val_bytes_*.bin do not match the val shards "
                          f"({sum(found)} of {len(paths)} files, {0 if side is None else len(side):,} counts for "
                          f"{len(tokens):,} tokens); rebuild them with the shards")
    return side


def byte_luts(sp, vocab_size):
    """Per token id: UTF-8 bytes it adds to the text (a leading "▁" excluded), whether it has that leading
    space, and whether it is a boundary (control/unknown/unused: no bytes, no space counted after it).
    Byte-fallback pieces add one byte. This is the challenge's byte accounting."""
    base = np.zeros(vocab_size, np.int64)
    space = np.zeros(vocab_size, bool)
    boundary = np.ones(vocab_size, bool)
    for t in range(sp.get_piece_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        space[t] = piece.startswith("\u2581")
        base[t] = len(piece[int(space[t]):].encode("utf-8"))
    return torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary)


def token_bytes(tgt, prev, luts, starts=None):
    """UTF-8 bytes each target token adds: its piece, plus its leading space unless it follows a boundary; with
    a byte sidecar (a 4th entry: bytes per val position) the sidecar's count at the targets' positions, those
    after each row's window start `starts` (past a short window's end: padding, masked out by the caller)."""
    if len(luts) > 3:
        pos = starts[:, None] + torch.arange(1, tgt.size(1) + 1, device=tgt.device)
        return luts[3][pos.clamp_max(len(luts[3]) - 1)]
    base, space, boundary = luts
    return base[tgt] + (space[tgt] & ~boundary[prev])


def load_tokenizer(path, vocab_size):
    if not os.path.isfile(path):
        raise ConfigError(f"TOKENIZER_PATH={path}: no such file; {fetch_hint(path)}")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.get_piece_size() > vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={path} has {sp.get_piece_size()} pieces but VOCAB_SIZE={vocab_size}; raise VOCAB_SIZE")
    return sp


def load_tokenizer_luts(path, vocab_size):
    return byte_luts(load_tokenizer(path, vocab_size), vocab_size)


SAMPLE_DOCS = 16  # val documents re-encoded at start-up to check the tokenizer


def check_tokenizer(sp, tokens, h):
    """The val shards must come from this tokenizer, else every bpb is silently wrong: their ids within its pieces,
    and most sample documents (up to 4,096 tokens) re-encoding to the same ids (another tokenizer's ids do not)."""
    what = f"the shards in {h.data_path} do not come from TOKENIZER_PATH={h.tokenizer_path}"
    fix = "point TOKENIZER_PATH at the model the shards were made with"
    top = int(tokens.max())
    if top >= sp.get_piece_size():
        raise ConfigError(f"{what} (val token id {top}, the tokenizer has {sp.get_piece_size()} pieces); {fix}")
    starts = np.flatnonzero(tokens == BOS_ID)
    docs = [tokens[a + 1:b].tolist() for a, b in zip(starts, starts[1:]) if b - a <= 4096][:SAMPLE_DOCS]
    differ = sum(sp.encode(sp.decode(d)) != d for d in docs)
    if differ * 2 > len(docs):
        raise ConfigError(f"{what}: {differ} of {len(docs)} sample documents re-encode to other ids; {fix}")


# ----------------------------------------------------------------------------------------------------
# MODEL


ATTN = {"name": "sdpa", "module": None}  # the attention kernel in use, set by select_attention
ATTN_PACKAGES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute.interface"}
FLEX = {}  # flex_attention compiled once per process, on first use on CUDA


def select_attention(name, docs=False):
    """ATTENTION: FlashAttention-3/-4 (importable, CUDA), FlexAttention (CUDA) or SDPA; auto: fa3, else fa4, else
    flex on CUDA with `docs` (DOC_ATTENTION), else SDPA. Returns the log's words for the choice."""
    cuda, found = torch.cuda.is_available(), {}
    for key, module in ATTN_PACKAGES.items():
        if name in ("auto", key) and cuda:
            with contextlib.suppress(ImportError):
                found[key] = importlib.import_module(module)
    if name == "auto":
        name = next(iter(found), "flex" if docs and cuda else "sdpa")
        why = ("auto: the first of fa3, fa4 importable" if found else
               f"auto: no FlashAttention 3 or 4 importable on CUDA{', flex for DOC_ATTENTION=1' if docs and cuda else ''}")
    elif name in ATTN_PACKAGES and name not in found:
        raise ConfigError(f"ATTENTION={name}: module {ATTN_PACKAGES[name]} is not importable on a CUDA machine "
                          "(README: FlashAttention); or ATTENTION=sdpa")
    elif name == "flex" and not cuda:
        raise ConfigError("ATTENTION=flex needs CUDA (FlexAttention has no CPU backward); or ATTENTION=sdpa")
    else:
        why = f"ATTENTION={name}"
    ATTN.update(name=name, module=found.get(name))
    return f"{name} ({why})"


if not hasattr(torch.ops.pgolf, "fa4"):  # once per process (scripts/bench.py may load a second copy)
    @torch.library.custom_op("pgolf::fa4", mutates_args=())
    def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: typing.Optional[torch.Tensor],
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FlashAttention-4, causal, one opaque op to torch.compile: [B, T, H, D] -> (out, lse [B, H, T] fp32),
        or with cu (varlen sequence starts, int32) [tokens, H, D] -> (out, lse [H, tokens])."""
        fa4 = importlib.import_module(ATTN_PACKAGES["fa4"])
        return tuple(fa4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len or None,
                                         max_seqlen_k=max_len or None, causal=True, return_lse=True)[:2])

    @torch.library.custom_op("pgolf::fa4_bwd", mutates_args=())
    def fa4_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     lse: torch.Tensor, cu: typing.Optional[torch.Tensor],
                     max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(importlib.import_module(ATTN_PACKAGES["fa4"])._flash_attn_bwd(
            q, k, v, out, dout, lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len or None,
            max_seqlen_k=max_len or None)[:3])

    fa4_forward.register_fake(lambda q, k, v, cu, max_len: (
        q.new_empty(q.shape), q.new_empty(q.shape[:-1]).float().transpose(-1, -2).contiguous()))
    fa4_backward.register_fake(lambda q, k, v, out, dout, lse, cu, max_len: tuple(x.new_empty(x.shape) for x in (q, k, v)))
    fa4_forward.register_autograd(
        lambda ctx, dout, dlse: (*fa4_backward(*ctx.saved_tensors[:4], dout.contiguous(), ctx.saved_tensors[4],
                                               ctx.cu, ctx.max_len), None, None),
        setup_context=lambda ctx, inputs, output: (ctx.save_for_backward(*inputs[:3], *output),
                                                   setattr(ctx, "cu", inputs[3]), setattr(ctx, "max_len", inputs[4])))


def select_sdpa_backend(name):
    """Restricts PyTorch SDPA to one backend (auto: PyTorch's choice), so an unsupported shape fails loudly."""
    if name != "auto" and torch.cuda.is_available():
        for backend in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend == name.replace("efficient", "mem_efficient"))


def configure_torch(h, cuda):
    """A run's process-wide torch settings (scripts/bench.py's too). Returns select_attention's words."""
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # Newton-Schulz compiles once per matrix shape
    # Inductor's mix-order reduction (newer torch) fuses a block's per-channel and scalar gradient sums into one
    # kernel that runs far under bandwidth: off, steps are 6% faster with CRAWLER_CARRY, 4% on the record (README)
    inductor = importlib.import_module("torch._inductor.config").triton
    if hasattr(inductor, "mix_order_reduction"):
        inductor.mix_order_reduction = False
    select_sdpa_backend(h.sdpa_backend)
    return select_attention(h.attention, h.doc_attention)


# FlashAttention varlen: room per row for a document start every 256 tokens (padding costs time, an exact
# count a host sync); a row's surplus documents run as one causal sequence.
VARLEN_DOC_TOKENS = 256
FLEX_BLOCK = 128  # FlexAttention's block size


def attention_layout(idx, docs):
    """What `attend` needs beyond q, k, v, built per forward on the device (no host sync); None without `docs`
    (plain causal). With `docs`: SDPA a mask [B, 1, T, T]; FlashAttention the int32 starts of every BOS and row,
    padded to a fixed count with empty sequences (one compiled shape); flex a block mask within documents."""
    if not docs:
        return None
    B, T = idx.shape
    ids = (idx == BOS_ID).cumsum(1)
    if ATTN["name"] == "flex":  # the kernel may read the mask on whole 128-blocks: ids padded past T
        from torch.nn.attention.flex_attention import create_block_mask
        ids = F.pad(ids, (0, -T % FLEX_BLOCK))
        keep = lambda b, h, q, kv: (q >= kv) & (ids[b, q] == ids[b, kv])
        eager_cuda = idx.is_cuda and not torch.compiler.is_compiling()  # (a compiled model fuses it anyway)
        build = torch.compile(create_block_mask) if eager_cuda else create_block_mask  # (its _compile=True is deprecated)
        return build(keep, B, None, T, T, device=idx.device)
    if ATTN["name"] in ATTN_PACKAGES:
        starts = (idx == BOS_ID) | (torch.arange(T, device=idx.device) == 0)
        starts &= starts.cumsum(1) <= 1 + T // VARLEN_DOC_TOKENS  # a row's surplus documents merge in that row
        cu = torch.nonzero_static(starts.flatten(), size=B * (1 + T // VARLEN_DOC_TOKENS), fill_value=B * T).flatten()
        return torch.cat([cu, cu.new_full((1,), B * T)]).int()
    return (ids[:, None, :, None] == ids[:, None, None, :]).tril()


def attend(q, k, v, layout=None):
    """Causal attention over [B, T, H, D] tensors (GQA: k, v may have fewer heads); `layout`: an
    `attention_layout` (document boundaries, or flex's block mask)."""
    name, (B, T) = ATTN["name"], q.shape[:2]
    if name == "fa4" and layout is not None:  # max length: all tokens, for an overflowing last sequence
        return torch.ops.pgolf.fa4(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), layout, B * T)[0].view_as(q)
    if name == "fa4":
        return torch.ops.pgolf.fa4(q, k, v, None, 0)[0]
    if name == "fa3" and layout is not None:
        y = ATTN["module"].flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), layout, layout,
                                                  B * T, B * T, causal=True)
        return (y[0] if isinstance(y, tuple) else y).view_as(q)
    if name == "fa3":
        y = ATTN["module"].flash_attn_func(q, k, v, causal=True)
        return y[0] if isinstance(y, tuple) else y
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if name == "flex" and layout is not None:  # compiled on CUDA also in eager runs: unfused, it stores T x T scores
        from torch.nn.attention.flex_attention import flex_attention
        eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
        if eager_cuda and "cuda" not in FLEX:
            FLEX["cuda"] = torch.compile(flex_attention)
        flex = FLEX["cuda"] if eager_cuda else flex_attention
        return flex(q, k, v, block_mask=layout, enable_gqa=k.size(1) != q.size(1)).transpose(1, 2)
    if layout is not None and k.size(1) != q.size(1):  # the kernels that take a mask take no GQA (else: math, O(T^2))
        k, v = (x.repeat_interleave(q.size(1) // x.size(1), 1) for x in (k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=layout, is_causal=layout is None, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


def rms_norm(x):
    """RMS norm computed in fp32, returned in the input's dtype (so a bf16 stream stays bf16)."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def fake_quantize(w, bits):
    """Straight-through fake quantization: forward sees per-row symmetric `bits`-bit weights, backward
    passes gradients to the float weights unchanged."""
    step = w.detach().abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
    return w + ((w / step).round() * step - w).detach()


def lora_delta(x, lora):
    """Per-row low-rank update x A^T B^T with adapters A [rows, r, in], B [rows, out, r] (LoRA TTT)."""
    A, B = lora
    return (x.float() @ A.transpose(1, 2)) @ B.transpose(1, 2)


class CastedLinear(nn.Linear):
    """Bias-free linear, fp32 master weight, computed in the input's dtype; `qat_bits`: the forward sees
    the weight fake-quantized; `lora`: adds a per-row low-rank update."""

    def __init__(self, n_in, n_out, zero_init=False):
        super().__init__(n_in, n_out, bias=False)
        self.zero_init, self.qat_bits, self.lora = zero_init, 0, None

    def forward(self, x):
        w = fake_quantize(self.weight, self.qat_bits) if self.qat_bits else self.weight
        y = F.linear(x, w.to(x.dtype))
        return y if self.lora is None else y + lora_delta(x, self.lora).to(y.dtype)


def rotary_tables(rope_dims, seq_len, base, scale):
    """cos/sin [seq_len, rope_dims/2] built for the real length (no NTK rescaling); scale stretches wavelengths."""
    inv_freq = 1.0 / (scale * base ** (torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotates the first 2*cos.size(-1) dims of each head; dim i pairs with dim i + half."""
    half = cos.size(-1)
    if half == 0:
        return x
    cos, sin = cos[None, :x.size(1), None, :].to(x.dtype), sin[None, :x.size(1), None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), -1)


def exclusive(y, v):
    """XSA: remove from each head's output its component along the token's own normalised value."""
    B, T, H, D = y.shape
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    return (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class Attention(nn.Module):
    """GQA with q/k RMS norm, partial RoPE, per-head q gain; optional XSA and a per-head output gate
    sigmoid(W x[:12]) (zero init: every head starts at one half)."""

    def __init__(self, dim, heads, kv_heads, xsa, gate, gate_width=12):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.xsa = heads, kv_heads, dim // heads, xsa
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.gate = nn.Parameter(torch.zeros(heads, min(gate_width, dim))) if gate else None

    def forward(self, x, cos, sin, q_gain, layout):
        B, T, _ = x.shape
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        q = rms_norm(self.c_q(x).view(B, T, self.heads, self.head_dim))
        k = rms_norm(self.c_k(x).view(B, T, self.kv_heads, self.head_dim))
        q = apply_rotary(q, cos, sin) * q_gain[:, None].to(q.dtype)
        k = apply_rotary(k, cos, sin)
        y = attend(q.to(v.dtype), k.to(v.dtype), v, layout)
        if self.xsa:
            y = exclusive(y, v)
        if self.gate is not None:
            g = F.linear(x[..., :self.gate.size(1)].flatten(0, 1), self.gate.to(x.dtype))  # 2-D: no per-row copy of the gate
            y = y * torch.sigmoid(g).view(B, T, -1, 1)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """proj(act(fc x)^2) with act = ReLU (slope 0) or LeakyReLU(slope)."""

    def __init__(self, dim, mult, slope):
        super().__init__()
        self.fc = CastedLinear(dim, int(mult * dim))
        self.proj = CastedLinear(int(mult * dim), dim, zero_init=True)
        self.slope = slope

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


Control = collections.namedtuple("Control", "mix attn_scale mlp_scale q_gain ln cos sin lane_resid lane_post layout")


class Block(nn.Module):
    """The matrices of one unique block; the control vectors (`Control`) come from the schedule position."""

    def __init__(self, h, mlp_mult, xsa):
        super().__init__()
        slope = h.mlp_leaky_slope if h.mlp_act == "leaky_relu_sq" else 0.0
        self.attn = Attention(h.model_dim, h.num_heads, h.num_kv_heads, xsa, h.attn_gate)
        self.mlp = MLP(h.model_dim, mlp_mult, slope)

    def forward(self, x, x0, c):
        """Serial: attention reads the mixed stream, the MLP reads the stream after attention."""
        x = c.mix[0].to(x.dtype) * x + c.mix[1].to(x.dtype) * x0
        x = x + self._attn(x, c)
        return x + c.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * c.ln)

    def _attn(self, x, c):
        return c.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * c.ln, c.cos, c.sin, c.q_gain, c.layout)

    def parallel(self, lanes, x0, c):
        """Two lanes: attention reads lane 0 (mixed with x0), the MLP lane 1, both before either writes; each
        lane keeps resid x itself and gains post[source] x each branch's output."""
        a = self._attn(c.mix[0].to(x0.dtype) * lanes[0] + c.mix[1].to(x0.dtype) * x0, c)
        m = c.mlp_scale.to(x0.dtype) * self.mlp(rms_norm(lanes[1]) * c.ln)
        resid, post = c.lane_resid.to(x0.dtype), c.lane_post.to(x0.dtype)
        return [resid[i] * lanes[i] + post[0, i] * a + post[1, i] * m for i in range(2)]


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token); the first position of a window and every BOS get
    a reserved bucket, so nothing leaks across a document start."""

    def __init__(self, buckets, dim, model_dim):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx):
        prev = F.pad(idx[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1)
        first = torch.arange(idx.size(1), device=idx.device) == 0
        h = torch.where(first | (idx == BOS_ID), self.buckets - 1, h)
        return self.scale * self.proj(self.embed(h))


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(w . x_t[:width]) * x_{t-1}, switched off at BOS so documents never mix."""

    def __init__(self, width=12):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x, idx):
        gate = self.lam * torch.sigmoid(x[..., :self.w.numel()] @ self.w.to(x.dtype)) * (idx != BOS_ID)
        return x + gate[..., None] * F.pad(x[:, :-1], (0, 0, 1, 0))


def build_schedule(n_flat, n_enc, n_crawl, loops):
    """(block index, role, loop) per application: encoder flats, loops x crawler blocks, decoder flats."""
    enc = [(j, "enc", -1) for j in range(n_enc)]
    mid = [(n_flat + c, "mid", k) for k in range(loops) for c in range(n_crawl)]
    dec = [(j, "dec", -1) for j in range(n_enc, n_flat)]
    return enc + mid + dec


Route = collections.namedtuple("Route", "positions receive save lanes_from")
Route.__doc__ = """Positions run, in order; per application the skip weight index it receives (-1: none) and
whether its output is saved; the index from which the stream runs as two lanes."""


def route(schedule, positions, executed_skips, parallel_last_n):
    """U-Net skips, last in first out: flat skips join encoder to decoder flats, executed skips the first
    half of the applications run to the second half (crawler applications too)."""
    n = len(positions)
    roles = [schedule[p][1] for p in positions]
    save = [i < n // 2 for i in range(n)] if executed_skips else [r == "enc" for r in roles]
    dec = [i >= n // 2 for i in range(n)] if executed_skips else [r == "dec" for r in roles]
    n_skip = min(sum(save), sum(dec))
    receive, k = [], 0
    for d in dec:
        receive.append(k if d and k < n_skip else -1)
        k += d
    lanes_from = n - min(parallel_last_n, n)
    if any(save[lanes_from:]):
        raise ConfigError(f"PARALLEL_LAST_N={parallel_last_n}: the lanes must start after the last application whose "
                          f"output feeds a U-Net skip (at most {n - 1 - max(i for i, v in enumerate(save) if v)} here)")
    return Route(positions, receive, save, lanes_from)


class GPT(nn.Module):
    def __init__(self, h):
        super().__init__()
        n_flat, n_crawl = h.num_flat_layers, h.num_crawler_layers if h.crawler_loops else 0
        d = h.model_dim
        xsa = h.xsa_flags()
        self.blocks = nn.ModuleList([Block(h, h.mlp_mult, xsa[j]) for j in range(n_flat)] +
                                    [Block(h, h.crawler_mlp_mult, xsa[n_flat + c]) for c in range(n_crawl)])
        self.schedule = build_schedule(n_flat, h.num_encoder_layers, n_crawl, h.crawler_loops)
        P = len(self.schedule)
        # Routes by crawler loop count: all loops (eval, export, training from CRAWLER_START_FRAC) and fewer before.
        executed = h.unet_skips == "executed"
        self.routes = {n: route(self.schedule, [p for p, (_, _, k) in enumerate(self.schedule) if k < n], executed,
                                h.parallel_last_n) for n in h.loop_counts()}
        self.loops, self.doc_attention = h.crawler_loops, h.doc_attention  # which route the forward takes; BOS masking
        self.softcap, self.head_lora = h.logit_softcap, None
        self.stream_dtype = torch.bfloat16 if h.stream_dtype == "bf16" else torch.float32
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        self.bigram = BigramHash(h.bigram_vocab_size, h.bigram_dim, d) if h.bigram_vocab_size else None
        self.smear = SmearGate() if h.smear_gate else None
        self.head_input = nn.Identity()  # the head's inputs, for embedding GPTQ
        # Control vectors: a row per schedule position (crawler: per loop), or per block.
        self.row = list(range(P)) if h.control_vectors == "application" else [j for j, _, _ in self.schedule]
        R = max(self.row, default=-1) + 1
        self.app_emb = nn.Parameter(torch.zeros(R, d)) if h.control_vectors == "application" else None  # tells loops apart
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(R, d), torch.zeros(R, d)], 1))
        self.attn_scale = nn.Parameter(torch.ones(R, d))
        self.mlp_scale = nn.Parameter(torch.ones(R, d))
        self.q_gain = nn.Parameter(torch.full((R, h.num_heads), h.qk_gain_init))
        lanes = h.parallel_last_n > 0
        self.lane_resid = nn.Parameter(torch.full((R, 2), 1.1)) if lanes else None  # [row, lane]
        self.lane_post = nn.Parameter(torch.ones(R, 2, 2)) if lanes else None  # [row, attn/mlp, lane]
        used = [sum(k >= 0 for k in r.receive) for r in self.routes.values()]
        if 0 in used and max(used):  # DDP needs every parameter in every step's graph
            raise ConfigError("CRAWLER_START_FRAC: with fewer crawler loops this layout has no U-Net skip, so the skip "
                              "weights would get no gradient; use UNET_SKIPS=flat or more blocks")
        self.skip_weights = nn.Parameter(torch.ones(max(used), d)) if max(used) else None
        self.skip_gates = nn.Parameter(torch.zeros(max(used), d)) if max(used) and h.skip_gate else None
        self.ln = [1 / math.sqrt(p + 1) if h.ln_scale else 1.0 for p in range(P)]
        # RoPE: table 0 for flat blocks, table 1+k for crawler loop k when per-loop scales are given.
        scales = (1.0,) + tuple(h.crawler_loop_rope_scales)
        self.rope_index = [1 + k if (role == "mid" and h.crawler_loop_rope_scales) else 0 for _, role, k in self.schedule]
        length = max(h.train_seq_len, h.eval_seq_len)
        tables = [rotary_tables(h.rope_dims, length, h.rope_base, s) for s in scales]
        self.register_buffer("rope_cos", torch.stack([c for c, _ in tables]), persistent=False)
        self.register_buffer("rope_sin", torch.stack([s for _, s in tables]), persistent=False)
        self.crawler_ids = sorted({j for j, role, _ in self.schedule if role == "mid"})
        # Recurrent carry: a later loop's crawler output x -> beta x + sum_m alpha[., m] (loop 0's output of
        # crawler block m, no gradient through it); learned in the scalar group, or frozen as buffers.
        carry = h.carry_values() if self.crawler_ids else None
        if carry and h.crawler_carry == "learned":
            self.carry_beta, self.carry_alpha = (nn.Parameter(t) for t in carry)
        else:
            self.register_buffer("carry_beta", carry and carry[0], persistent=False)
            self.register_buffer("carry_alpha", carry and carry[1], persistent=False)
        lanes_from = self.routes[h.crawler_loops].lanes_from
        if carry and any(role == "mid" for _, role, _ in self.schedule[lanes_from:]):
            raise ConfigError(f"CRAWLER_CARRY with PARALLEL_LAST_N={h.parallel_last_n}: the lanes must start after "
                              "the last crawler application")
        self._init_weights(h.tied_embed_init_std)

    def set_qat(self, bits):
        """Fake-quantizes the crawler's matrices at `bits` in the forward (0 = off). Training only: the
        evaluations score exactly the weights they are given."""
        for j in self.crawler_ids:
            for m in self.blocks[j].modules():
                if isinstance(m, CastedLinear):
                    m.qat_bits = bits

    def control(self, p, dtype, layout):
        """Application p's control vectors (`layout`: the forward's `attention_layout`), and the vector it adds
        to the stream on entry."""
        r, t = self.row[p], self.rope_index[p]
        lane = [None if m is None else m[r] for m in (self.lane_resid, self.lane_post)]
        c = Control(self.resid_mix[r], self.attn_scale[r], self.mlp_scale[r], self.q_gain[r], self.ln[p],
                    self.rope_cos[t], self.rope_sin[t], *lane, layout)
        return c, 0 if self.app_emb is None else self.app_emb[r].to(dtype)

    CONTROL_NAMES = ("app_emb", "resid_mix", "attn_scale", "mlp_scale", "q_gain", "lane_resid", "lane_post")

    @torch.no_grad()
    def start_loops(self, tensors, since, until):
        """At CRAWLER_START_FRAC: the control rows of loops since..until-1 (idle until now but for weight decay)
        restart as copies of loop 0's. `tensors`: {parameter name: tensor}, live or EMA. Returns the loops copied."""
        first = {j: p for p, (j, _, k) in enumerate(self.schedule) if k == 0}
        copied = set()
        for p, (j, _, k) in enumerate(self.schedule):
            if since <= k < until and self.row[p] != self.row[first[j]]:
                copied.add(k)
                for name in self.CONTROL_NAMES:
                    if name in tensors:
                        tensors[name][self.row[p]] = tensors[name][self.row[first[j]]]
        return sorted(copied)

    def skip(self, x, saved, k):
        """x + w * saved, or with SKIP_GATE lerp(w * saved, x, sigmoid(gate)): at init half of each."""
        s = self.skip_weights[k].to(x.dtype) * saved
        return x + s if self.skip_gates is None else torch.lerp(s, x, torch.sigmoid(self.skip_gates[k]).to(x.dtype))

    def carried(self, x, j, loop, carry):
        """Loop 0 keeps crawler block j's output; a later loop's output mixes with those (CRAWLER_CARRY)."""
        k = self.crawler_ids.index(j)
        if loop == 0:
            carry[k] = x.detach()
            return x
        beta, alpha = self.carry_beta.to(x.dtype), self.carry_alpha.to(x.dtype)
        return beta[k] * x + sum(alpha[k, m] * carry[m] for m in range(len(self.crawler_ids)))

    def _init_weights(self, embed_std):
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def forward(self, idx, targets):
        """Per-token NLL in nats, float32 [B, T]."""
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, idx)
        if idx.is_cuda:  # the residual stream's dtype (CPU runs stay fp32)
            x = x.to(self.stream_dtype)
        x0, skips, lanes, carry = x, [], None, {}
        r, layout = self.routes[self.loops], attention_layout(idx, self.doc_attention)
        for i, p in enumerate(r.positions):
            if i == r.lanes_from:
                lanes = [x, x]
            if r.receive[i] >= 0 and lanes:  # a skip enters lane 0
                lanes[0] = self.skip(lanes[0], skips.pop(), r.receive[i])
            elif r.receive[i] >= 0:
                x = self.skip(x, skips.pop(), r.receive[i])
            c, emb, j = *self.control(p, x.dtype, layout), self.schedule[p][0]
            if lanes:
                lanes = self.blocks[j].parallel([t + emb for t in lanes], x0, c)
            else:
                x = self.blocks[j](x + emb, x0, c)
            if self.carry_beta is not None and self.schedule[p][1] == "mid":
                x = self.carried(x, j, self.schedule[p][2], carry)
            if r.save[i]:
                skips.append(x)
        if lanes:
            x = 0.5 * (lanes[0] + lanes[1])
        x = self.head_input(rms_norm(x))
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()
        if self.head_lora is not None:
            logits = logits + lora_delta(x, self.head_lora)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


# ----------------------------------------------------------------------------------------------------
# OPTIMIZERS


# Quintic Newton-Schulz (a, b, c) per iteration, the last repeating: Muon's classic triple, or Polar Express
# (Amsel et al. 2025), tuned per step to push singular values to 1 sooner.
NS_COEFFS = {"classic": ((3.4445, -4.7750, 2.0315),),
             "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                       (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                       (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                       (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                       (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))}


def newton_schulz(G, steps, coeffs=NS_COEFFS["classic"]):
    """Approximate orthogonalisation U V^T of a batch of matrices [n, rows, cols] (Muon's quintic iteration)."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for s in range(steps):
        a, b, c = coeffs[min(s, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, Newton-Schulz (`coeffs`), decoupled weight decay; `row_norm` (MuonEq-R): unit rows
    first. Same-shape matrices batched; each rank orthogonalises a share, then all-gather."""

    def __init__(self, params, lr, momentum, backend_steps, wd, rank=0, world=1, zeropower=newton_schulz,
                 coeffs=NS_COEFFS["classic"], row_norm=False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, wd=wd))
        self.steps, self.rank, self.world, self.zeropower = backend_steps, rank, world, zeropower
        self.coeffs, self.row_norm = coeffs, row_norm
        by_shape = {}
        for p in self.param_groups[0]["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.stacks = list(by_shape.values())

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["wd"]
        for params in self.stacks:
            share = -(-len(params) // self.world)
            mine = params[self.rank * share:(self.rank + 1) * share]
            rows, cols = params[0].shape
            updates = torch.zeros((share, rows, cols), device=params[0].device, dtype=torch.bfloat16)
            if mine:
                grads = []
                for p in mine:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(mom).add_(p.grad)
                    grads.append(p.grad.add(buf, alpha=mom))
                G = torch.stack(grads)
                if self.row_norm:
                    G = G / G.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                updates[:len(mine)] = self.zeropower(G, self.steps, self.coeffs)
            if self.world > 1:
                gathered = torch.empty((share * self.world, rows, cols), device=updates.device, dtype=updates.dtype)
                dist.all_gather_into_tensor(gathered, updates)
                updates = gathered
            scale = max(1.0, rows / cols) ** 0.5
            for p, u in zip(params, updates):
                p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-lr * scale)


def param_groups(model):
    """Muon for every CastedLinear weight, AdamW for embedding tables and for everything else."""
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
    embeds = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    taken = {id(p) for p in matrices + embeds}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    return matrices, embeds, scalars


def check_param_groups(model, groups):
    """Every trainable parameter in exactly one group: an orphan would silently stay at its init."""
    ids = [id(p) for g in groups for p in g]
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing, dup = trainable - set(ids), len(ids) - len(set(ids))
    assert not missing and not dup and set(ids) <= trainable, (
        f"optimizer groups: missing {[names[i] for i in missing]}, {dup} duplicated")


def build_optimizers(model, h, run, zeropower):
    matrices, embeds, scalars = param_groups(model)
    check_param_groups(model, (matrices, embeds, scalars))
    adam = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=next(model.parameters()).is_cuda)
    opts = [Muon(matrices, h.matrix_lr, h.muon_momentum, h.muon_backend_steps, h.muon_wd, run.rank, run.world, zeropower,
                 NS_COEFFS[h.muon_ns], h.muon_row_norm),
            torch.optim.AdamW([dict(params=embeds, lr=h.embed_lr, weight_decay=h.embed_wd),
                               dict(params=scalars, lr=h.scalar_lr, weight_decay=h.scalar_wd)], **adam)]
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def schedule(step, progress, h):
    """(LR multiplier, Muon momentum) at `step`, `progress` in [0, 1] of the budget (wall clock, else ITERATIONS):
    LR warmup, flat, linear to MIN_LR_FRAC over the last WARMDOWN_FRAC; momentum ramped."""
    lr = min(1.0, (step + 1) / h.lr_warmup_steps) if h.lr_warmup_steps else 1.0
    left = 1.0 - progress
    if h.warmdown_frac and left < h.warmdown_frac:
        lr *= h.min_lr_frac + (1 - h.min_lr_frac) * max(left, 0.0) / h.warmdown_frac
    frac = min(1.0, step / h.muon_momentum_warmup_steps) if h.muon_momentum_warmup_steps else 1.0
    return lr, (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


class EMA:
    """fp32 EMA of all parameters; the decay ramps as (1+n)/(10+n) up to EMA_DECAY so the random init fades
    out even in short runs (0.997^600 = 17%)."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model):
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s)


@contextlib.contextmanager
def rolled_back(model, opts):
    """Restores model and optimizer state exactly on exit (compile warm-ups leave no trace)."""
    saved = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts]
    yield
    model.load_state_dict(saved[0])
    for opt, state in zip(opts, saved[1]):
        opt.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# QUANTIZATION AND ARTIFACT: per-row symmetric ints for every matrix, fp16 for the small tensors


def qmax(bits):
    return 2 ** (bits - 1) - 1


def row_scales(W, bits, sdclip_k=0.0, fracs=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    """Per-row step [rows, 1]: clip = k * row std when k > 0, else the fraction of the row's max |w|
    that minimises that row's round-to-nearest error."""
    W, tiny = W.float(), 2.0 ** -24  # the smallest fp16 step: an all-zero row's step must not round to 0
    if sdclip_k:
        return (sdclip_k * W.std(1, keepdim=True) / qmax(bits)).clamp_min(tiny)
    amax = W.abs().amax(1, keepdim=True).clamp_min(tiny)
    best, best_err = None, None
    for frac in fracs:
        step = amax * frac / qmax(bits)
        err = (W - (W / step).round().clamp(-qmax(bits), qmax(bits)) * step).square().sum(1, keepdim=True)
        better = err < best_err if best is not None else torch.ones_like(err, dtype=torch.bool)
        best = torch.where(better, step, best) if best is not None else step
        best_err = torch.where(better, err, best_err) if best_err is not None else err
    return best.clamp_min(tiny)


def quantize_rtn(W, step, bits):
    return (W.float() / step).round().clamp(-qmax(bits), qmax(bits))


def quantize_gptq(W, H, step, bits, damp, block=128):
    """Textbook GPTQ with fixed per-row steps: columns by descending Hessian diagonal, each one's rounding
    error spread over later columns via the upper Cholesky factor of H^-1, in blocks. Returns levels."""
    W, H, q = W.float().clone(), H.float().clone(), qmax(bits)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H, step = W[:, perm], H[perm][:, perm], step.float()[:, 0]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for a in range(0, W.size(1), block):
        b = min(a + block, W.size(1))
        Wb, Eb = W[:, a:b].clone(), torch.zeros(W.size(0), b - a, device=W.device)
        for j in range(b - a):
            Q[:, a + j] = (Wb[:, j] / step).round().clamp(-q, q)
            Eb[:, j] = (Wb[:, j] - Q[:, a + j] * step) / U[a + j, a + j]
            Wb[:, j:] -= Eb[:, j:j + 1] * U[a + j, a + j:b]
        W[:, b:] -= Eb @ U[a:b, b:]
    return Q[:, torch.argsort(perm)]


class StopForward(Exception):
    """Raised by a calibration hook once every target layer has seen its inputs."""


def collect_hessians(model, names, batches, run):
    """H = sum of x^T x over the inputs each named CastedLinear (tok_emb: the head) sees on the calibration
    batches (shared blocks: every application), over all ranks; forwards stop early."""
    mods = dict(model.named_modules(), tok_emb=model.head_input)  # the tied embedding's rows are the head's
    uses = {j: sum(1 for b, _, _ in model.schedule if b == j) for j in range(len(model.blocks))}
    expected = {n: uses[int(n.split(".")[1])] if n.startswith("blocks.") else 1 for n in names}
    H, seen = dict.fromkeys(names), {}

    def hook(name):
        def fn(_, inputs):
            x = inputs[0].detach().flatten(0, -2).float()
            with torch.autocast(x.device.type, enabled=False):  # fp32 sums, whatever the forward runs in
                H[name] = x.T @ x if H[name] is None else H[name].addmm_(x.T, x)
            seen[name] = seen.get(name, 0) + 1
            if all(seen.get(n, 0) == expected[n] for n in names):
                raise StopForward
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad(), run.autocast:
            for x, y in batches:
                seen.clear()
                with contextlib.suppress(StopForward):
                    model(x, y)
    finally:
        for handle in handles:
            handle.remove()
    for n in names:
        run.all_reduce(H[n])
    return H


def input_groups(model):
    """CastedLinear names grouped by shared input, in execution order (bigram projection, then per block
    q/k/v, attention out, MLP in, MLP out), each flagged crawler or not."""
    groups = [(["bigram.proj"], False)] if model.bigram is not None else []
    seen = []
    for j, role, _ in model.schedule:
        if j not in seen:
            seen.append(j)
            p = f"blocks.{j}."
            groups += [([p + "attn.c_q", p + "attn.c_k", p + "attn.c_v"], role == "mid"), ([p + "attn.proj"], role == "mid"),
                       ([p + "mlp.fc"], role == "mid"), ([p + "mlp.proj"], role == "mid")]
    return groups


@dataclasses.dataclass
class ExportPlan:
    """The export, decided once: `rounds` of (CastedLinear names, whether Hessians are collected first on the
    model as quantized so far), (bits, SDClip k) per tensor, and whether it calibrates."""
    rounds: list
    specs: dict
    calibrate: bool


def export_plan(h, model):
    mods = dict(model.named_modules())
    linear = [n for n, m in mods.items() if isinstance(m, CastedLinear)]
    crawler = tuple(f"blocks.{j}." for j in model.crawler_ids)

    def spec(n):  # attention, MLP, other; the crawler's k over either
        k = h.gptq_sdclip_k_attn if ".attn." in n else h.gptq_sdclip_k_mlp if ".mlp." in n else h.gptq_sdclip_k
        return (h.crawler_quant_bits, h.gptq_sdclip_k_crawler or k) if n.startswith(crawler) else (h.quant_bits, k)
    specs = {n + ".weight": spec(n) for n in linear}
    specs.update({n + ".weight": (h.embed_quant_bits, h.embed_sdclip_k) for n, m in mods.items() if isinstance(m, nn.Embedding)})
    if h.quant_method == "rtn":
        rounds = [(linear, False)]
    elif h.quant_method == "gptq":  # one Hessian pass on the float model
        rounds = [(linear, True)]
    else:  # sequential, on inputs from the quantized layers before; the crawler again (from its floats)
        rounds = []  # once its own quantized loops produce its inputs
        for is_crawler, segment in itertools.groupby(input_groups(model), key=lambda g: g[1]):
            segment = [names for names, _ in segment]
            rounds += [(names, True) for _ in range(1 + (h.gptq_loop_iters if is_crawler else 0)) for names in segment]
    if h.embed_gptq:  # last: the head's inputs come from every quantized block
        rounds.append((["tok_emb"], True))
    return ExportPlan(rounds, specs, any(hessian for _, hessian in rounds))


def quantize_model(model, plan, h, batches, run, hessians):
    """Quantizes `plan`'s weights by rounds, other embeddings to nearest, LQER_RANK corrections, small tensors
    fp16; `hessians` {round: H} from `batches` once (QUANT_FIT reuses them). Leaves the model dequantized.
    Returns {name: (levels int8, step fp16, bits) or fp16 tensor}."""
    mods = dict(model.named_modules())
    floats = {n: mods[n].weight.detach().float().clone() for names, _ in plan.rounds for n in names}
    out, progress = {}, Progress(run.log, "quantize", len(plan.rounds), "rounds")
    for r, (names, hessian) in enumerate(plan.rounds):
        if hessian and r not in hessians:
            hessians[r] = collect_hessians(model, names, batches, run)
        H = hessians.get(r)
        for n in names:
            (bits, k), W = plan.specs[n + ".weight"], floats[n]
            step = row_scales(W, bits, k).half().float()  # as the artifact holds it
            q = quantize_gptq(W, H[n], step, bits, h.gptq_damp) if H else quantize_rtn(W, step, bits)
            out[n + ".weight"] = (q.to(torch.int8).cpu(), step.half().cpu(), bits)
            with torch.no_grad():
                mods[n].weight.copy_(q * step)
        progress(r + 1)
    params = dict(model.named_parameters())
    originals = {n + ".weight": W for n, W in floats.items()}
    for name, p in params.items():
        if name in out:
            continue
        if name in plan.specs:  # embedding tables
            bits, k = plan.specs[name]
            originals[name] = p.detach().float().clone()
            step = row_scales(p.detach(), bits, k).half().float()
            out[name] = (quantize_rtn(p.detach(), step, bits).to(torch.int8).cpu(), step.half().cpu(), bits)
        else:
            out[name] = p.detach().half().cpu()
    if h.lqer_rank:
        out.update(lqer_corrections(out, originals, h.lqer_rank, h.lqer_tensors, h.lqer_bits))
        with torch.no_grad():
            for name, W in dequantize(out).items():
                if name + ".lqer_a" in out:
                    params[name].copy_(W)
    return out


LQER_PARTS = (".lqer_a", ".lqer_b")


def lqer_corrections(qstate, originals, rank, count, bits):
    """LQER: a matrix's quantization error E ~ A B (A = U_r S_r, B = V_r^T), factors at `bits` per row, for
    the `count` tensors where it removes the most squared error per stored element. Returns new entries."""
    gains = {}
    for name, W in originals.items():
        if min(W.shape) > rank:
            E = W.cpu() - qstate[name][0].float() * qstate[name][1].float()
            S = torch.linalg.svdvals(E)
            gains[name] = S[:rank].square().sum().item() / (rank * sum(W.shape))
    out = {}
    for name in sorted(gains, key=gains.get, reverse=True)[:count]:
        E = originals[name].cpu() - qstate[name][0].float() * qstate[name][1].float()
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        for part, M in zip(LQER_PARTS, (U[:, :rank] * S[:rank], Vh[:rank])):
            step = row_scales(M, bits).half().float()
            out[name + part] = (quantize_rtn(M, step, bits).to(torch.int8), step.half(), bits)
    return out


def quantized_weights(qstate):
    """How many weights the artifact stores as integer levels (LQER factors not counted)."""
    return sum(v[0].numel() for n, v in qstate.items() if isinstance(v, tuple) and not n.endswith(LQER_PARTS))


QUANT_FIT_SCALES = (0.5, 4.0)  # finer clips real weights


def fit_to_budget(model, floats, plan, h, hessians, run, first, budget):
    """QUANT_FIT: SDClip widths times 2^t until within 1% under `budget` (rank 0's sizes): secant on t, bisection
    once bracketed; `first`: t = 0. Returns (qstate, rank 0's compress result, scale) of the largest fitting
    probe, else of the smallest."""
    weights, (lo, hi) = quantized_weights(first), map(math.log2, QUANT_FIT_SCALES)
    probes, t, qstate = [], 0.0, first
    for i in range(h.quant_fit_probes):
        if i:
            model.load_state_dict(floats)
            specs = {n: (bits, k * 2 ** t) for n, (bits, k) in plan.specs.items()}
            qstate = quantize_model(model, dataclasses.replace(plan, specs=specs), h, [], run, hessians)
        packed = compress(serialize(qstate, h.model_config()), h.compressor) if run.rank == 0 else None
        size = int(run.from_rank0(len(packed[1]) + ARTIFACT_HEADER_BYTES if packed else 0))
        probes.append((size, t, qstate, packed))
        run.log(f"quant fit: probe {i + 1}: SDClip widths x {2 ** t:.4f} -> {size:,} model bytes (budget {budget:,})")
        if 0.99 * budget <= size <= budget:
            break
        over, under = [p[1] for p in probes if p[0] > budget], [p[1] for p in probes if p[0] < budget]
        if over and under:  # sizes fall as t grows
            t = (max(over) + min(under)) / 2
        else:
            prev = probes[-2] if i else (size, t)
            slope = (prev[0] - size) / (t - prev[1]) if t != prev[1] else 0.0  # bytes per doubling
            step = (size - 0.995 * budget) / (slope if slope > 0 else weights / 8)
            t = min(max(t + min(max(step, -1.0), 1.0), lo), hi)
        if any(abs(t - p[1]) < 1e-9 for p in probes):
            run.log(f"quant fit: stops, x {2 ** t:.4f} was probed")
            break
    fitting = [p for p in probes if p[0] <= budget]
    size, t, qstate, packed = max(fitting, key=lambda p: p[0]) if fitting else min(probes, key=lambda p: p[0])
    model.load_state_dict(dict(floats, **dequantize(qstate)))
    return qstate, packed, 2 ** t


def dequantize(qstate):
    """{state_dict name: float tensor}; an LQER-corrected matrix gets its A B added."""
    value = lambda v: v[0].float() * v[1].float() if isinstance(v, tuple) else v.float()
    out = {n: value(v) for n, v in qstate.items() if not n.endswith(LQER_PARTS)}
    for n in out:
        if n + ".lqer_a" in qstate:
            out[n] = out[n] + value(qstate[n + ".lqer_a"]) @ value(qstate[n + ".lqer_b"])
    return out


def level_codes(q, bits):
    """Signed levels -> unsigned codes, one byte each (`from_codes` inverts it)."""
    return (q.numpy().astype(np.int16).ravel() + qmax(bits) + 1).astype(np.uint8)


def from_codes(codes, bits):
    return codes.astype(np.int16) - qmax(bits) - 1


def pack_levels(q, bits):
    """Signed levels -> `bits`-bit codes packed densely (int6: 4 values in 3 bytes)."""
    codes = level_codes(q, bits)
    codes = np.pad(codes, (0, -len(codes) % 8))
    return np.packbits(np.unpackbits(codes[:, None], axis=1)[:, 8 - bits:])


def unpack_levels(buf, bits, count):
    bitrows = np.unpackbits(buf).reshape(-1, bits)[:count]
    return from_codes(np.packbits(np.pad(bitrows, ((0, 0), (8 - bits, 0))), axis=1).ravel(), bits)


def shuffle_bytes(buf, width):
    """Byte k of every `width`-byte group together: bytes with the same role compress better."""
    return np.ascontiguousarray(buf.reshape(-1, width).T).ravel()


def unshuffle_bytes(buf, width):
    return np.ascontiguousarray(buf.reshape(width, -1).T).ravel()


ARTIFACT_MAGIC = b"PGCRAWL2"  # 2: coded in chunks


BYTES_FROM_BITS = 5  # whole bytes code smaller from 5 bits (README)


def level_layout(q, bits):
    """(layout, bytes) of a tensor's levels: one byte per level from BYTES_FROM_BITS, else dense codes,
    byte-shuffled."""
    if bits >= BYTES_FROM_BITS:
        return "bytes", level_codes(q, bits)
    return "packed", shuffle_bytes(pack_levels(q, bits), bits)


def serialize(qstate, config):
    """One blob: header length, JSON header (model config, tensor table), then each tensor's bytes."""
    table, parts = [], []
    for name, v in qstate.items():
        if isinstance(v, tuple):
            q, step, bits = v
            layout, levels = level_layout(q, bits)
            parts += [levels, shuffle_bytes(step.reshape(-1).numpy().view(np.uint8), 2)]
            table.append([name, list(q.shape), bits, len(levels), layout])
        else:
            parts.append(shuffle_bytes(v.reshape(-1).numpy().view(np.uint8), 2))
            table.append([name, list(v.shape), 16, 0])
    header = json.dumps({"config": config, "tensors": table}).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(p.tobytes() for p in parts)


def deserialize(blob):
    n = int.from_bytes(blob[:4], "little")
    header = json.loads(blob[4:4 + n])
    data, pos, qstate = np.frombuffer(blob, np.uint8), 4 + n, {}

    def take(count):
        nonlocal pos
        if pos + count > len(data):
            raise ValueError("data ends early")
        pos += count
        return data[pos - count:pos]

    for name, shape, bits, nbytes, *layout in header["tensors"]:  # fp16 entries: no layout
        count = math.prod(shape)
        if bits == 16:
            qstate[name] = torch.from_numpy(unshuffle_bytes(take(2 * count), 2).view(np.float16).reshape(shape).copy())
            continue
        if layout == ["bytes"]:
            levels = from_codes(take(nbytes), bits)
        elif layout == ["packed"]:
            levels = unpack_levels(unshuffle_bytes(take(nbytes), bits), bits, count)
        else:
            raise ValueError(f"{name}: unknown level layout {layout}")
        step = unshuffle_bytes(take(2 * shape[0]), 2).view(np.float16).reshape(shape[0], 1)
        qstate[name] = (torch.from_numpy(levels.astype(np.int8).reshape(shape)), torch.from_numpy(step.copy()), bits)
    return qstate, header["config"]


CHUNK_BYTES = 1 << 21  # coded in parallel threads (the coders release the GIL)


def chunked(code, blob):
    """A table of the CHUNK_BYTES pieces' coded lengths, then the pieces, coded in parallel."""
    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        parts = list(pool.map(code, [blob[i:i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)]))
    return np.array([len(parts), *map(len, parts)], "<u4").tobytes() + b"".join(parts)


def unchunked(decode, raw):
    n = int.from_bytes(raw[:4], "little")
    ends = np.cumsum(np.frombuffer(raw, "<u4", n, 4), dtype=np.int64) + 4 + 4 * n
    if not n or ends[-1] != len(raw):
        raise ValueError("chunk table does not match the data's length")
    return b"".join(decode(raw[a:b]) for a, b in zip([4 + 4 * n, *ends[:-1]], ends))


# rANS over the whole-byte levels: they are close to independent draws from their tensor's histogram (order-1
# and per-row contexts gain < 0.03%), so a static per-tensor model codes them within 0.1% of that entropy, where
# brotli's Huffman codes stay ~1% above it (README)
RANS_PREC, RANS_LANES, RANS_LOW = 15, 1024, 1 << 16  # probability bits; interleaved states (4 bytes each); renorm


def level_sections(blob):
    """(start, end) of every whole-byte level section of a serialized blob, from its tensor table."""
    n = int.from_bytes(blob[:4], "little")
    pos, out = 4 + n, []
    for name, shape, bits, nbytes, *layout in json.loads(blob[4:4 + n])["tensors"]:
        if bits == 16:
            pos += 2 * math.prod(shape)
            continue
        if layout == ["bytes"]:
            out.append((pos, pos + nbytes))
        pos += nbytes + 2 * shape[0]
    return out


def rans_freqs(counts):
    """Byte counts -> frequencies summing to 2**RANS_PREC, each byte present at least 1."""
    f = np.floor(counts * ((1 << RANS_PREC) / max(counts.sum(), 1))).astype(np.int64)
    f[(counts > 0) & (f == 0)] = 1
    f[np.argmax(f)] += (1 << RANS_PREC) - f.sum()
    return f


def rans_lanes(values, fill):
    """Symbol i to lane i % RANS_LANES of step i // RANS_LANES, the last step filled with `fill`."""
    steps = -(-len(values) // RANS_LANES)
    return np.concatenate([values.astype(np.int64), np.full(steps * RANS_LANES - len(values), fill)]).reshape(
        steps, RANS_LANES)


def rans_encode(symbols, model, freqs):
    """Bytes, each coded under the frequencies freqs[model[i]] -> (final states, 16-bit words). Coded last to
    first, so the decoder reads the words forward; a step's renormalisations are read back at that step."""
    cum = np.cumsum(freqs, 1) - freqs
    s, t = rans_lanes(symbols, -1), rans_lanes(model, 0)
    x, out = np.full(RANS_LANES, RANS_LOW, np.int64), [np.zeros(0, np.uint16)] * (len(s) + 1)
    for k in range(len(s) - 1, -1, -1):
        live = s[k] >= 0  # padding codes nothing (a full-range symbol)
        f = np.where(live, freqs[t[k], s[k]], 1 << RANS_PREC)
        emit = x >= f << (32 - RANS_PREC)
        out[k] = (x[emit] & 0xFFFF).astype(np.uint16)
        x = np.where(emit, x >> 16, x)
        x = (x // f << RANS_PREC) + x % f + np.where(live, cum[t[k], s[k]], 0)
    return x.astype("<u4"), np.concatenate(out).astype("<u2")


def rans_decode(states, words, model, freqs):
    cum, n = np.cumsum(freqs, 1) - freqs, len(model)
    symbol_at = np.stack([np.repeat(np.arange(freqs.shape[1]), f) for f in freqs] or [np.zeros(1, np.int64)])
    t, live = rans_lanes(model, 0), rans_lanes(np.ones(n, np.int64), 0) > 0
    x, words, pos, out = states.astype(np.int64), words.astype(np.int64), 0, np.empty(t.shape, np.uint8)
    for k in range(len(t)):
        slot = x & ((1 << RANS_PREC) - 1)
        out[k] = sym = symbol_at[t[k], slot]
        x = np.where(live[k], freqs[t[k], sym] * (x >> RANS_PREC) + slot - cum[t[k], sym], x)  # padding: identity
        read = x < RANS_LOW
        x[read] = x[read] << 16 | words[pos:pos + int(read.sum())]
        pos += int(read.sum())
    if pos != len(words) or (x != RANS_LOW).any():
        raise ValueError("rANS stream does not end where it should")
    return out.reshape(-1)[:n]


def rans_pack(blob, code):
    """COMPRESSOR=rans: the whole-byte levels rANS-coded under one histogram per tensor; everything else (header,
    steps, fp16 values, packed levels, the histograms) coded by `code` in chunks."""
    cuts = level_sections(blob)
    data, gaps = np.frombuffer(blob, np.uint8), zip([0] + [e for _, e in cuts], [a for a, _ in cuts] + [len(blob)])
    sections = [data[a:b] for a, b in cuts]
    freqs = np.stack([rans_freqs(np.bincount(v, minlength=256)) for v in sections]) if cuts else np.zeros((0, 256))
    model = np.repeat(np.arange(len(cuts)), [len(v) for v in sections])
    states, words = rans_encode(np.concatenate([np.zeros(0, np.uint8), *sections]), model, freqs)
    side = chunked(code, b"".join(blob[a:b] for a, b in gaps) + freqs.astype("<u2").tobytes())
    return len(side).to_bytes(4, "little") + side + states.tobytes() + words.tobytes()


def rans_unpack(raw, decode):
    n = int.from_bytes(raw[:4], "little")
    side = unchunked(decode, raw[4:4 + n])
    cuts = level_sections(side)
    rest_len = len(side) - 512 * len(cuts)
    freqs = np.frombuffer(side, "<u2", 256 * len(cuts), rest_len).reshape(-1, 256).astype(np.int64)
    model = np.repeat(np.arange(len(cuts)), [b - a for a, b in cuts])
    states = np.frombuffer(raw, "<u4", RANS_LANES, 4 + n)
    levels = rans_decode(states, np.frombuffer(raw, "<u2", offset=4 + n + 4 * RANS_LANES), model, freqs).tobytes()
    parts, rest, done, prev = [], 0, 0, 0  # the gaps (from side) and the sections (from levels) in blob order
    for a, b in cuts:
        parts += [side[rest:rest + a - prev], levels[done:done + b - a]]
        rest, done, prev = rest + a - prev, done + b - a, b
    return b"".join(parts) + side[rest:rest_len]


def compress(blob, method):
    """(compressor name, bytes, sizes tried): zstd level 22 or brotli quality 11 in CHUNK_BYTES pieces, rANS for
    the levels with brotli for the rest (rans), or whichever is smallest (auto)."""
    coders = {}
    try:
        if method in ("zstd", "auto"):
            import zstandard
            coders["zstd"] = lambda b: chunked(lambda c: zstandard.ZstdCompressor(level=22).compress(c), b)
        if method in ("brotli", "rans", "auto"):
            import brotli
            code = functools.partial(brotli.compress, quality=11, lgwin=24)
            if method != "rans":
                coders["brotli"] = lambda b: chunked(code, b)
            if method != "brotli":
                coders["rans"] = lambda b: rans_pack(b, code)
    except ImportError as e:
        raise ConfigError(f"COMPRESSOR={method} needs the '{e.name}' package: pip install {e.name}") from None
    out = {name: fn(blob) for name, fn in coders.items()}
    name = min(out, key=lambda k: len(out[k]))
    return name, out[name], {k: len(v) for k, v in out.items()}


ARTIFACT_HEADER_BYTES = 16  # magic + compressor name


def write_artifact(path, qstate, config, method, packed=None):
    """Writes magic + compressor name + compressed blob (`packed`, from `compress`, or made here) via a temp
    file; returns (compressor, sizes tried)."""
    name, payload, sizes = packed or compress(serialize(qstate, config), method)
    with open(path + ".tmp", "wb") as fh:
        fh.write(ARTIFACT_MAGIC + name.encode().ljust(8, b"\0") + payload)
    os.replace(path + ".tmp", path)
    return name, sizes


def read_artifact(path):
    raw = open(path, "rb").read()
    if not raw.startswith(ARTIFACT_MAGIC):
        raise ConfigError(f"{path}: not an artifact written by this version of the script (bad magic); for a float "
                          "checkpoint (logs/<RUN_ID>_model.pt) use EXPORT_FROM")
    name, payload = raw[8:16].rstrip(b"\0").decode(), raw[16:]
    try:
        if name == "zstd":
            import zstandard
            return deserialize(unchunked(zstandard.ZstdDecompressor().decompress, payload))
        import brotli
        return deserialize(rans_unpack(payload, brotli.decompress) if name == "rans" else
                           unchunked(brotli.decompress, payload))
    except ImportError as e:
        raise ConfigError(f"{path} is {name}-compressed: pip install {e.name}") from None
    except Exception as e:
        raise ConfigError(f"{path}: corrupt or truncated artifact ({type(e).__name__}: {e}); re-export it") from None


def float_checkpoint(h, model):
    """What logs/<RUN_ID>_model.pt and _interrupted.pt hold: the model shape and the float weights."""
    return {"config": h.model_config(), "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}


def load_checkpoint(path):
    """(model config, or None for the bare weights an older run saved; weights) of a float checkpoint."""
    with open(path, "rb") as fh:
        if fh.read(7) == ARTIFACT_MAGIC[:7]:  # any version
            raise ConfigError(f"EXPORT_FROM={path} is an artifact, not a float checkpoint: evaluate it with EVAL_ONLY={path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"EXPORT_FROM={path}: unreadable checkpoint ({type(e).__name__}), truncated or not written by "
                          "this script; use logs/<RUN_ID>_model.pt or logs/<RUN_ID>_interrupted.pt") from None
    if isinstance(ckpt, dict) and set(ckpt) == {"config", "model"}:
        return ckpt["config"], ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return None, ckpt
    raise ConfigError(f"EXPORT_FROM={path}: not a checkpoint of this script (no model weights in it)")


def load_weights(model, state, source):
    """load_state_dict, with one clear line when the weights belong to another model shape."""
    ours = model.state_dict()
    bad = sorted(set(ours) ^ set(state)) or [k for k in ours if ours[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        what = (f"{k} is {tuple(state[k].shape)}, this model's {tuple(ours[k].shape)}" if k in ours and k in state
                else f"{k} {'missing' if k in ours else 'unexpected'}")
        raise ConfigError(f"{source} does not fit this model ({what}; {len(bad)} tensors differ): "
                          "set the shape variables it was trained with")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# EVALUATION: every val target scored exactly once; optional score-first test-time training


def eval_windows(a, b, lo, L, stride):
    """(start, first scored offset, length) of windows scoring each target in [a, b) once: one window from
    `lo` (stream, document or context floor) scores all it sees, then each scores `stride` positions."""
    if not 0 < stride <= L:
        raise ValueError(f"window stride {stride} cannot cover the targets: it must be between 1 and {L}")
    wins, p = [], a
    while p < b:
        end = min(lo + L, b) if p - lo < L else min(p + stride, b)
        ws = max(lo, end - L)
        wins.append((ws, p - ws, end - ws))
        p = end
    return wins


def window_plan(tokens, L, stride, isolate, chunk=0):
    """Windows per chunk of target positions (one chunk unless `chunk`); with `isolate` none reaches back
    across a BOS."""
    n = len(tokens) - 1
    starts = np.flatnonzero(tokens[:n] == BOS_ID) if isolate else np.zeros(0, np.int64)
    bounds = list(range(0, n, chunk or n)) + [n]
    plan = []
    for c0, c1 in zip(bounds, bounds[1:]):
        cuts = [c0] + [int(s) for s in starts[(starts > c0) & (starts < c1)]] + [c1]
        wins = []
        for a, b in zip(cuts, cuts[1:]):
            k = np.searchsorted(starts, a, side="right")
            wins += eval_windows(a, b, int(starts[k - 1]) if k else 0, L, stride)
        plan.append((c0, c1, wins))
    return plan


def window_rows(tokens, wins, rows, length, device):
    """Token rows x [rows, length + 1], the mask of scored targets [rows, length] and each row's start in
    `tokens` for windows (start, first scored offset, length); rows past the windows stay padding."""
    x = np.zeros((rows, length + 1), np.int64)
    mask = np.zeros((rows, length), bool)
    starts = np.zeros(rows, np.int64)
    for r, (ws, first, n) in enumerate(wins):
        x[r, :n + 1] = tokens[ws:ws + n + 1]
        mask[r, first:n] = True
        starts[r] = ws
    return tuple(torch.from_numpy(a).to(device) for a in (x, mask, starts))


def score_rows(model, x, mask, starts, luts, autocast, dynamic=False):
    """Per-token NLL of the rows x (starting at `starts` in the val tokens), and float64 per-row sums [rows, (nll,
    tokens, bytes)] of the masked targets; `dynamic`: rows and width are marked as varying (one graph for all)."""
    idx, tgt = x[:, :-1], x[:, 1:]
    for t in (idx, tgt) if dynamic else ():
        torch._dynamo.mark_dynamic(t, (0, 1))
    with autocast:
        nll = model(idx, tgt)
    nbytes = token_bytes(x[:, 1:], x[:, :-1], luts, starts)
    return nll, torch.stack([(nll.detach().double() * mask).sum(1), mask.sum(1).double(),
                             (nbytes * mask).sum(1).double()], 1)


def score_windows(model, tokens, wins, luts, batch, run, progress=None):
    """float64 [nll, tokens, bytes] over the scored positions of `wins`, `batch` windows per forward."""
    sums, done = torch.zeros(3, dtype=torch.float64, device=run.device), 0
    L = max((n for _, _, n in wins), default=1)
    for i in range(0, len(wins), batch):
        x, mask, starts = window_rows(tokens, wins[i:i + batch], batch, L, run.device)
        with torch.no_grad():
            sums += score_rows(model, x, mask, starts, luts, run.autocast)[1].sum(0)
        if progress:
            done += sum(n - first for _, first, n in wins[i:i + batch])
            progress(done)
    return sums


def as_metrics(sums, tokens):
    """val_loss (nats/token) and val_bpb; a count short of the val targets is an error, never a score."""
    nll, n_tok, n_bytes = sums.tolist()
    if int(n_tok) != len(tokens) - 1:
        raise ConfigError(f"scored {int(n_tok):,} of {len(tokens) - 1:,} val targets: these evaluation settings skip tokens")
    return dict(val_loss=nll / n_tok, val_bpb=nll / math.log(2) / n_bytes, val_tokens=int(n_tok), val_bytes=int(n_bytes))


def score_across_ranks(model, tokens, wins, luts, h, run, label=None):
    """Each rank scores its share of `wins` in eval mode (progress under `label`); sums all-reduced. Flex runs in
    the model as written, not compiled whole: there its no-grad graph hit an illegal memory access (torch 2.11)."""
    model = getattr(model, "_orig_mod", model) if ATTN["name"] == "flex" else model
    model.eval()
    mine = wins[run.rank * len(wins) // run.world:(run.rank + 1) * len(wins) // run.world]
    progress = Progress(run.log, label, sum(n - first for _, first, n in mine), "tokens") if label else None
    sums = score_windows(model, tokens, mine, luts, h.eval_batch_seqs, run, progress)
    model.train()
    return run.all_reduce(sums)


def evaluate(model, tokens, luts, h, run, stride=None, label="eval"):
    """val_loss (nats/token) and val_bpb over all val targets; `luts` on the run's device."""
    wins = window_plan(tokens, h.eval_seq_len, stride or h.eval_seq_len, h.eval_doc_isolation)[0][2]
    return as_metrics(score_across_ranks(model, tokens, wins, luts, h, run, label), tokens)


def sgd_epochs(runner, params, opt, seqs, lr, epochs, h, run):
    """`epochs` passes of SGD at `lr` over token rows `seqs` [n, L + 1], TTT_BATCH_SEQS rows per step shared
    out over the ranks (gradients all-reduced: every rank takes the same step); a short last batch wraps
    round to the first rows (one compiled shape)."""
    L, B = seqs.size(1) - 1, h.ttt_batch_seqs
    for g in opt.param_groups:
        g["lr"] = lr
    for i in (i for _ in range(epochs) for i in range(0, len(seqs), B)):
        rows = seqs[torch.arange(i, i + B, device=seqs.device) % len(seqs)][run.rank::run.world]
        if len(rows):
            with run.autocast:
                loss = runner(rows[:, :-1], rows[:, 1:]).sum() / (B * L)
            loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            run.all_reduce(p.grad)
        nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)


def rows_of(tokens, a, b, L, device):
    """The targets [a, b) as contiguous rows of L + 1 tokens (a tail shorter than L is left out)."""
    span = torch.from_numpy(tokens[a:b + 1].astype(np.int64)).to(device)
    return span[:(len(span) - 1) // L * L + 1].unfold(0, L + 1, L).contiguous()  # as compiled: contiguous


def compile_sgd(model, runner, opt, h, run):
    """Compiles the SGD training graph on random tokens, then undoes the step."""
    if h.compile and h.warmup_steps:
        with rolled_back(model, [opt]):
            seqs = torch.randint(0, h.vocab_size, (h.ttt_batch_seqs, h.train_seq_len + 1), device=run.device)
            sgd_epochs(runner, list(model.parameters()), opt, seqs, 0.0, 1, h, run)


def ttt_sgd(model, runner, tokens, luts, h, run):
    """Score-first TTT of the whole model: chunk c is scored (those scores count), then TTT_EPOCHS SGD
    passes over its tokens, before chunk c+1. Returns (metrics, {first target position: sums})."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    plan = window_plan(tokens, h.eval_seq_len, h.eval_stride, h.eval_doc_isolation, h.ttt_chunk_tokens)
    t_warm = time.perf_counter()
    compile_sgd(model, runner, opt, h, run)
    chunk_sums, t0, done = {}, time.perf_counter(), 0
    progress = Progress(run.log, "ttt", len(tokens) - 1, "tokens")
    for c, (c0, c1, wins) in enumerate(plan):
        chunk_sums[c0] = score_across_ranks(runner, tokens, wins, luts, h, run)
        if c + 1 < len(plan):  # the last chunk has nothing left to help
            lr = h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(len(plan) - 1, 1)))
            sgd_epochs(runner, params, opt, rows_of(tokens, c0, c1, h.train_seq_len, run.device), lr, h.ttt_epochs, h, run)
        done = project_eval_time(run.log, t0, done, c1 - c0, plan[-1][1], h, spent=t0 - t_warm)
        progress(done)
    return as_metrics(sum(chunk_sums.values()), tokens), chunk_sums


def ttt_lora(model, runner, tokens, luts, h, run):
    """Score-first per-document LoRA TTT: documents by length in batches of TTT_LORA_DOCS (all ranks), per row
    adapters (B zero: a first chunk sees the artifact), chunks scored in order, each after AdamW steps on the
    earlier ones; base frozen. `lora`: attention and head, A fixed. `phased`: also MLP, A from the previous
    batch's mean, SGD phases over the documents scored so far. Returns (metrics, {first target: sums})."""
    n, L, C, r, phased = len(tokens) - 1, h.eval_seq_len, h.ttt_lora_chunk, h.ttt_lora_rank, h.ttt == "phased"
    starts = [int(s) for s in np.flatnonzero(tokens[:n] == BOS_ID)]
    docs = sorted([(a, b) for a, b in zip([0] + starts, starts + [n]) if b > a], key=lambda d: (d[1] - d[0], d[0]))
    batches = [docs[i:i + h.ttt_lora_docs] for i in range(0, len(docs), h.ttt_lora_docs)]
    phase_after = {j: p for p, j in enumerate(h.ttt_phase_batches() if phased else [])}
    phase_after = {j: p for j, p in phase_after.items() if j < len(batches) - 1}  # a later batch must gain
    # positions each batch runs (windows reach back up to L), for the time projection
    work = [len(bt) * sum(min(L, k + C) for k in range(0, max(b - a for a, b in bt), C)) for bt in batches]
    lin = [m for name, m in model.named_modules()
           if isinstance(m, CastedLinear) and (".attn." in name or phased and ".mlp." in name)]
    gen = torch.Generator().manual_seed(h.seed)  # the first batch's adapters, the same on every rank
    inits = [torch.randn(r, n_in, generator=gen).to(run.device) / math.sqrt(n_in)
             for n_in in [m.in_features for m in lin] + [h.model_dim]]
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=h.ttt_phase_lr, momentum=h.ttt_momentum)
    # one graph for all rows and widths (padded to 2: a 1 would be specialised); only those dims are symbolic
    lora_runner = torch.compile(model, fullgraph=h.compile_fullgraph) if h.compile else model

    def attach(rows, inits):
        """Fresh adapters (A from `inits`, B zero) for `rows` documents on every target, and their AdamW."""
        adapters = []
        for m, A0 in zip(lin + [None], inits):
            A = A0.expand(rows, -1, -1).clone().requires_grad_()
            B = torch.zeros(rows, h.vocab_size if m is None else m.out_features, r, device=run.device, requires_grad=True)
            torch._dynamo.mark_dynamic(A, 0)
            torch._dynamo.mark_dynamic(B, 0)
            adapters.append((A, B))
            if m is None:
                model.head_lora = (A, B)
            else:
                m.lora = (A, B)
        opt = torch.optim.AdamW([t for ab in adapters for t in ab], lr=h.ttt_lora_lr, betas=(h.ttt_lora_beta1, 0.999),
                                weight_decay=h.ttt_lora_wd, fused=run.is_cuda)
        return adapters, opt

    def step(opt, x, mask, starts, learn):
        """Scores the rows (sums returned; grad on: one graph), then if `learn` an AdamW step on those targets."""
        nll, rows = score_rows(lora_runner, x, mask, starts, luts, run.autocast, dynamic=h.compile)
        if learn:
            opt.zero_grad()
            ((nll * mask).sum() / C).backward()
            opt.step()
        return rows

    def detach():
        model.head_lora = None
        for m in lin:
            m.lora = None

    def adapting(on):
        """While adapters train: base frozen, no document masks (a row is one document)."""
        model.doc_attention = h.doc_attention and not on
        for p in params:
            p.requires_grad_(not on)

    t_warm = time.perf_counter()
    with heartbeat(run.log, "ttt: compiling"):
        if phase_after:
            compile_sgd(model, runner, sgd, h, run)
    adapting(True)
    try:
        if h.compile:
            t = time.perf_counter()
            with heartbeat(run.log, "ttt: compiling"):
                x = torch.randint(0, h.vocab_size, (2, C + 2), device=run.device)
                step(attach(2, inits)[1], x, torch.ones_like(x[:, 1:], dtype=torch.bool), x.new_zeros(len(x)), True)
                detach()
            run.log(f"ttt: compiled (random tokens): SGD {t - t_warm:.0f}s, adapters {time.perf_counter() - t:.0f}s")
        graphs, parts, t0, done = compile_stats(), {}, time.perf_counter(), 0
        progress = Progress(run.log, "ttt", sum(work), "positions")
        for j, batch in enumerate(batches):
            mine = batch[run.rank::run.world]
            adapters, opt = attach(max(2, len(mine)), inits)  # padding rows: masked out
            longest = max(b - a for a, b in batch)  # the batch's, not the rank's: the same steps on any world size
            for k in range(0, longest if mine else 0, C):
                wins = []  # per document: the window scoring its chunk
                for a, b in mine:
                    e = min(a + k + C, b)
                    ws = max(a, e - L)
                    wins.append((ws, min(a + k, e) - ws, e - ws))
                x, mask, starts = window_rows(tokens, wins, len(adapters[0][0]), max(2, *(w for _, _, w in wins)), run.device)
                rows = step(opt, x, mask, starts, k + C < longest)
                parts.update({a + k: row for (a, b), row in zip(mine, rows) if a + k < b})  # scored before the step
            if phased:  # the next batch starts from the mean trained A of this one, over all ranks
                inits = [run.all_reduce(A.detach()[:len(mine)].sum(0)) / len(batch) for A, _ in adapters]
            if j in phase_after:
                detach()
                adapting(False)
                seen = sorted(docs[:(j + 1) * h.ttt_lora_docs])  # every rank's documents so far, in stream order
                stream = np.concatenate([tokens[a:b] for a, b in seen])
                lr = h.ttt_phase_lr * 0.5 * (1 + math.cos(math.pi * phase_after[j] / h.ttt_phases))
                if len(stream) > h.train_seq_len:  # else not one full row: skipped, on every rank alike
                    sgd_epochs(runner, params, sgd, rows_of(stream, 0, len(stream) - 1, h.train_seq_len, run.device),
                               lr, 1, h, run)
                run.log(f"ttt: phase {phase_after[j] + 1}/{h.ttt_phases}: SGD over {len(seen):,} scored documents "
                        f"({(len(stream) - 1) // h.train_seq_len:,} rows, lr {lr:.2e})")
                adapting(True)
            done = project_eval_time(run.log, t0, done, work[j], sum(work), h, spent=t0 - t_warm)
            progress(done)
        new = compile_stats()[0] - graphs[0]
        if new:
            run.log(f"warning: {new} graphs compiled during TTT")
    finally:
        detach()
        adapting(False)
    sums = sum(parts.values(), torch.zeros(3, dtype=torch.float64, device=run.device))
    return as_metrics(run.all_reduce(sums), tokens), parts


def project_eval_time(log, t0, done, new, total, h, spent=0.0):
    """Adds `new` units of work (tokens, positions); at 10% logs the projected eval time (plus `spent`, e.g.
    compiling), warning past MAX_EVAL_SECONDS. Returns the new count."""
    if done < total / 10 <= done + new:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's time, not how far the host has queued ahead
        secs = time.perf_counter() - t0
        proj = spent + secs * total / (done + new)
        log(f"ttt: {(done + new) / total:.0%} of the work in {secs:.1f}s, projected {proj:.0f}s for this eval"
            + (f" - over MAX_EVAL_SECONDS={h.max_eval_seconds:.0f}" if proj > h.max_eval_seconds else ""))
    return done + new


# ----------------------------------------------------------------------------------------------------
# TRAINING


def compile_stats():
    """(graphs compiled, graph breaks) so far, from dynamo's counters."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class Trainer:
    """One optimizer step = `accum` micro-batches per rank, loss divided by `accum`."""

    def __init__(self, model, runner, opts, h, accum, autocast):
        self.model, self.runner, self.opts, self.h = model, runner, opts, h
        self.accum, self.autocast, self.ema = accum, autocast, None

    def step(self, batches, lr_mult, momentum):
        total = None
        for m, (x, y) in enumerate(batches):
            sync = m == self.accum - 1 or not isinstance(self.runner, DDP)
            with (contextlib.nullcontext() if sync else self.runner.no_sync()), self.autocast:
                loss = self.runner(x, y).mean() / self.accum
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.h.grad_clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.h.grad_clip_norm)
        self.opts[0].param_groups[0]["momentum"] = momentum
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
            opt.step()
        self.model.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return total

    def warmup(self, steps, micro_seqs, seq_len, vocab, device):
        """`steps` steps on random tokens per route training takes, so every graph compiles before the
        clock starts; model and optimizer state are then restored exactly. Call before creating the EMA."""
        if not steps:
            return
        gen = torch.Generator().manual_seed(0)
        with rolled_back(self.model, self.opts):
            for loops in sorted(self.model.routes):  # each route training takes
                self.model.loops = loops
                for s in range(steps):
                    toks = torch.randint(0, vocab, (self.accum, micro_seqs, seq_len + 1), generator=gen).to(device)
                    self.step([(t[:, :-1], t[:, 1:]) for t in toks], *schedule(s, 0.0, self.h))


def save_atomic(obj, path):
    """torch.save through a temp file and rename: a crash never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def batch_layout(h, world):
    """(sequences per micro-batch, accumulation steps) keeping TRAIN_BATCH_TOKENS global; MICRO_BATCH_TOKENS=0:
    the largest whole-sequence micro-batch of at most 98,304 tokens dividing each rank's share."""
    L, share = h.train_seq_len, h.train_batch_tokens // world
    micro = h.micro_batch_tokens or next((k * L for k in range(min(98_304, share) // L, 0, -1) if share % (k * L) == 0), 0)
    if not micro or micro % L or h.train_batch_tokens % (micro * world):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} must split into {world} ranks x MICRO_BATCH_TOKENS="
                          f"{micro} x accumulation steps, and MICRO_BATCH_TOKENS into TRAIN_SEQ_LEN={L} sequences")
    return micro // L, h.train_batch_tokens // (micro * world)


def train_loader(h, run):
    paths = shard_paths(h.data_path, "train")
    loader = TrainLoader(paths, h.train_seq_len, h.seed, run.rank, run.world, run.device)
    check_token_ids(paths[0], loader.shards[0], h.vocab_size)
    run.log(f"data: {len(paths)} train shards, {sum(len(s) for s in loader.shards):,} train tokens")
    return loader


@contextlib.contextmanager
def deferred_signals():
    """While training, SIGINT/SIGTERM only note the signal: every rank stops after the same step, weights
    saved (torchrun forwards it to every rank, then waits 30 s)."""
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


Trained = collections.namedtuple("Trained", "steps train_ms ema loader signum end", defaults=(0, 0.0))
Trained.__doc__ = "signum: what interrupted training; end: perf_counter() when training stopped"


def train(h, run, model, compiled, val, plan):
    """Compile warm-up, then the timed loop until MAX_WALLCLOCK_SECONDS (less the calibration reserve),
    ITERATIONS or an interrupt. Rank 0's clock decides the elapsed time, hence LR and stop, for every rank."""
    micro_seqs, accum = batch_layout(h, run.world)
    loader = train_loader(h, run)
    run.log(f"step = {run.world} ranks x {accum} x {micro_seqs} x {h.train_seq_len} tokens")
    zeropower = torch.compile(newton_schulz, dynamic=False) if h.compile else newton_schulz
    runner = DDP(compiled, device_ids=[run.device.index] if run.is_cuda else None, broadcast_buffers=False) if run.world > 1 else compiled
    trainer = Trainer(model, runner, build_optimizers(model, h, run, zeropower), h, accum, run.autocast)
    model.set_qat(h.crawler_quant_bits if h.crawler_qat else 0)
    t = time.perf_counter()
    with heartbeat(run.log, "warmup (compiling)"):
        trainer.warmup(h.warmup_steps, micro_seqs, h.train_seq_len, h.vocab_size, run.device)
    ema = trainer.ema = EMA(model, h.ema_decay) if h.ema_decay else None
    graphs = compile_stats()
    run.log(f"warmup: {h.warmup_steps} steps per route (compile) in {time.perf_counter() - t:.1f}s, state restored | "
            f"{graphs[0]} graphs, {graphs[1]} graph breaks")
    reserve = export_reserve(h, run, model, ema, plan)
    budget_ms = 1000 * (h.max_wallclock_seconds - reserve)
    if h.max_wallclock_seconds and budget_ms <= 0:
        raise ConfigError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} leaves no training time after the export's "
                          f"{reserve:.1f}s of calibration and quantization; raise it")
    train_ms, step, elapsed, stop, signum, last = 0.0, 0, 0.0, h.iterations == 0, 0, 0.0
    logged = (0, 0.0)  # (step, elapsed ms) at the last step line: the current step time is measured since it
    graphs = compile_stats()  # (the reserve's eager forward may compile flex)
    run.log.commit()  # the run has started: its log keeps the RUN_ID
    run.sync()
    t0 = time.perf_counter()
    with deferred_signals() as signals:
        while not stop:
            progress = elapsed / budget_ms if h.max_wallclock_seconds else step / h.iterations
            lr_mult, momentum = schedule(step, progress, h)
            if model.loops != (loops := h.loops_at(progress)):
                copied = []
                if loops > model.loops:  # the new loops start from loop 0's control rows, live and EMA
                    names = [n for n, _ in model.named_parameters()]
                    for tensors in [dict(model.named_parameters())] + ([dict(zip(names, ema.shadow))] if ema else []):
                        copied = model.start_loops(tensors, model.loops, loops)
                model.loops = loops
                run.log(f"step {step}: the crawler runs {loops} of {h.crawler_loops} loops "
                        f"(progress {progress:.3f}, CRAWLER_START_FRAC={','.join(map(str, h.crawler_start_frac))})"
                        + "".join(f"; loop {k}'s control rows restart from loop 0's" for k in copied))
            loss = trainer.step(loader.next_step(micro_seqs, accum), lr_mult, momentum)
            step += 1
            own = train_ms + 1000 * (time.perf_counter() - t0)
            if h.max_wallclock_seconds and own + 2 * (own - last) > budget_ms:  # near the end: the GPU's time, not the
                run.sync()  # host's, which may run a step ahead
                own = train_ms + 1000 * (time.perf_counter() - t0)
            full = h.max_wallclock_seconds and own + (own - last) > budget_ms  # a next step would end past the budget
            elapsed, stop, signum = run.agree(own, step >= h.iterations or full, signals[0] if signals else 0)
            last = own
            stop = stop or signum > 0
            if step % h.train_log_every == 0 or stop or step <= 5:
                loss = run.all_reduce(loss) / run.world  # the mean over all ranks' micro-batches
                run.log(f"step {step} train_loss {loss.item():.4f} lr {lr_mult:.3f} {elapsed / step:.1f}ms/step "
                        f"(now {(elapsed - logged[1]) / (step - logged[0]):.1f}) "
                        f"{step * h.train_batch_tokens / elapsed * 1000:,.0f} tok/s")
                logged = (step, elapsed)
            if h.val_loss_every and step % h.val_loss_every == 0 and not stop:
                run.sync()
                train_ms += 1000 * (time.perf_counter() - t0)
                model.loops = h.crawler_loops  # evaluations run every loop
                timed_eval(run, {}, f"step {step}", None, lambda: evaluate(compiled, val.tokens, val.luts, h, run))
                model.loops, t0 = loops, time.perf_counter()
    run.sync()
    end = time.perf_counter()
    train_ms += 1000 * (end - t0)
    model.set_qat(0)
    model.loops = h.crawler_loops  # export and every evaluation run all loops
    run.log(f"training: {step} steps in {train_ms / 1000:.1f}s ({train_ms / max(step, 1):.1f} ms/step)"
            + (f", interrupted by {signal.Signals(signum).name}" if signum else ""))
    new = [b - a for a, b in zip(graphs, compile_stats())]
    if any(new):
        run.log(f"warning: {new[0]} graphs compiled and {new[1]} graph breaks during training (recompiles cost time)")
    return Trained(step, train_ms, ema, loader, signum, end)


def ranks_identical(run, model, ema):
    """Whether every rank holds the same live weights and EMA (sha256s)."""
    if run.world == 1:
        return True
    digest = hashlib.sha256()
    for t in list(model.state_dict().values()) + (ema.shadow if ema is not None else []):
        digest.update(t.detach().float().cpu().numpy().tobytes())
    digests = [None] * run.world
    dist.all_gather_object(digests, digest.hexdigest(), group=run.ctrl)
    return len(set(digests)) == 1


def calibration_layout(h, world):
    """(sequences per batch, batches) per rank: GPTQ_CALIB_TOKENS split across ranks, in micro-batches at most."""
    seqs = max(1, h.gptq_calib_tokens // (h.train_seq_len * world))
    per_batch = max(1, min(seqs, batch_layout(h, world)[0]))
    return per_batch, -(-seqs // per_batch)


def quantize_for_export(h, run, model, ema, plan, batches, path):
    """From the end of training to the last use of training data: EMA weights in, the float checkpoint saved to
    `path` (first: a failure later keeps the weights), calibration windows `batches()`, quantization. Returns
    (float weights on the CPU, qstate, Hessians)."""
    if ema is not None:
        ema.copy_to(model)
    ckpt = float_checkpoint(h, model)
    if run.rank == 0 and path:
        save_atomic(ckpt, path)
    qstate = quantize_model(model, plan, h, batches() if plan.calibrate else [], run, hessians := {})
    run.sync()
    return ckpt["model"], qstate, hessians


RESERVE_MARGIN = 1.1  # the measurement runs cold (first launches and allocations); the export after training is faster


def export_reserve(h, run, model, ema, plan):
    """Seconds training leaves for the export's use of training data: GPTQ_RESERVE_SECONDS, or measured here on the
    real shapes (rank check, checkpoint, calibration on random tokens, quantization; the slowest rank) x
    RESERVE_MARGIN. 0 when nothing calibrates or no wall clock caps training."""
    if not (plan.calibrate and h.max_wallclock_seconds):
        return 0.0
    if h.gptq_reserve_seconds:
        run.log(f"export reserve: {h.gptq_reserve_seconds:.1f}s (GPTQ_RESERVE_SECONDS)")
        return h.gptq_reserve_seconds
    per_batch, count = calibration_layout(h, run.world)
    tokens = torch.randint(0, h.vocab_size, (count, per_batch, h.train_seq_len + 1), generator=torch.Generator().manual_seed(1))
    batches = lambda: [(t[:, :-1].to(run.device), t[:, 1:].to(run.device)) for t in tokens]
    path = os.path.join("logs", f"{h.run_id}_reserve.pt") if h.save_checkpoint else None
    with rolled_back(model, []), heartbeat(run.log, "export reserve: measuring"):
        with torch.no_grad(), run.autocast:
            model(*batches()[0])  # the eager model's first-call costs (flex compiles there) are not the export's
        run.sync()
        t = time.perf_counter()
        ranks_identical(run, model, ema)
        quantize_for_export(h, run, model, ema, plan, batches, path)
        secs = run.most(time.perf_counter() - t)
    if path and run.rank == 0:
        os.remove(path)
    reserve = RESERVE_MARGIN * secs
    run.log(f"export reserve: {reserve:.1f}s = {secs:.1f}s measured (checkpoint, calibration, {h.quant_method}) "
            f"x {RESERVE_MARGIN}; training stops by {h.max_wallclock_seconds - reserve:.1f}s")
    return reserve


def calibration_batches(h, loader, world):
    """GPTQ_CALIB_TOKENS of fresh training windows, split across ranks."""
    return list(loader.next_step(*calibration_layout(h, world)))


# ----------------------------------------------------------------------------------------------------
# MAIN: read inputs -> set up -> train (or load) -> export -> score


ValData = collections.namedtuple("ValData", "tokens luts")  # val tokens, byte tables on the device


def read_inputs(h):
    """The artifact (EVAL_ONLY) or float checkpoint (EXPORT_FROM) to start from; its model shape replaces
    the environment's."""
    if h.eval_only:
        qstate, config = read_artifact(h.eval_only)
        h.use_model_config(config)
        return qstate
    if h.export_from:
        config, state = load_checkpoint(h.export_from)
        if config is not None:
            h.use_model_config(config)
        return state
    return None


def prepare(h, run):
    """Header lines, torch settings, val data (ids checked against the vocab), the model and its compiled
    runner, and the start of the final JSON record."""
    code = open(__file__, "rb").read()
    gpu = torch.cuda.get_device_name(run.device) if run.is_cuda else "cpu"
    attention = configure_torch(h, run.is_cuda)
    threads = "" if run.is_cuda else f" ({torch.get_num_threads()} threads)"
    run.log(f"run {h.run_id} | torch {torch.__version__} | {run.world} x {gpu}{threads} | attention: {attention}")
    if h.unknown_env:
        run.log("warning: unknown environment variables (typos?) ignored: " +
                ", ".join(k + (f" (did you mean {m}?)" if m else "") for k, m in h.unknown_env.items()))
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    sp, tokens = load_tokenizer(h.tokenizer_path, h.vocab_size), load_val_tokens(h.data_path, h.vocab_size)
    check_tokenizer(sp, tokens, h)
    luts, side = byte_luts(sp, h.vocab_size), load_val_bytes(h.data_path, tokens, sp)
    if side is not None:
        tgt, prev = (torch.from_numpy(tokens[a:len(tokens) - 1 + a].astype(np.int64)) for a in (1, 0))
        run.log(f"val bytes: from the byte sidecars fineweb_val_bytes_*.bin, {int(side[1:].sum()):,} for the targets "
                f"(the tokenizer's pieces would count {int(token_bytes(tgt, prev, luts).sum()):,})")
        luts += (torch.from_numpy(side.astype(np.int64)),)
    val = ValData(tokens, [t.to(run.device) for t in luts])
    run.log(f"val: {len(val.tokens):,} tokens from {h.data_path}")
    model = GPT(h).to(run.device)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model: {n_params:,} params | schedule {' '.join(f'{j}{role[0]}' for j, role, _ in model.schedule)}"
            f" | xsa {h.xsa_flags()}")
    for loops, r in model.routes.items():
        run.log(f"route, {loops} crawler loops (block: * saved for a skip, + receives one, = in "
                "two lanes): " + " ".join("+" * (r.receive[i] >= 0) + str(model.schedule[p][0]) + "*" * r.save[i]
                                          + "=" * (i >= r.lanes_from) for i, p in enumerate(r.positions)))
    flops = 6 * n_params * h.train_batch_tokens
    if not run.is_cuda and not (h.eval_only or h.export_from) and flops > 1e12:
        run.log(f"warning: training on the CPU at about {flops:.0e} FLOPs per step takes minutes per step; this "
                "configuration is meant for GPUs (SMOKE=1 bash run.sh is a CPU-sized run)")
    compiled = torch.compile(model, dynamic=False, fullgraph=h.compile_fullgraph) if h.compile else model
    result = dict(model_params=n_params, world_size=run.world, gpu=gpu, torch_version=torch.__version__, seed=h.seed,
                  attention=ATTN["name"], code_sha256=hashlib.sha256(code).hexdigest(), code_bytes=len(code))
    if not h.eval_only:
        result["quant_method"] = h.quant_method
    return val, model, compiled, result


def timed_eval(run, result, label, key, fn):
    """Runs one evaluation, logs it, and records it under `key` in the final JSON."""
    t = time.perf_counter()
    res = fn()
    secs = time.perf_counter() - t
    run.log(f"{label}: val_loss {res['val_loss']:.5f} val_bpb {res['val_bpb']:.5f} ({secs:.1f}s)")
    if key:
        result.update({f"{key}_val_loss": res["val_loss"], f"{key}_val_bpb": res["val_bpb"], f"{key}_eval_s": secs})
    return res


def train_or_load(h, run, model, compiled, val, plan, state, result):
    """Trains, or loads the EXPORT_FROM weights; checks that every rank holds the same weights."""
    if h.export_from:
        load_weights(model, state, f"EXPORT_FROM={h.export_from}")
        run.log.commit()
        run.log(f"export from {h.export_from} (no training)")
        trained = Trained(0, 0.0, None, train_loader(h, run))
    else:
        trained = train(h, run, model, compiled, val, plan)
    if not trained.signum:
        same = ranks_identical(run, model, trained.ema)
        result.update(rank_weights_identical=same, steps=trained.steps, train_time_ms=round(trained.train_ms),
                      step_avg_ms=trained.train_ms / max(trained.steps, 1),
                      tokens_per_s=trained.steps * h.train_batch_tokens / max(trained.train_ms, 1e-9) * 1000)
        if not same:
            run.log.error(f"the {run.world} ranks ended training with different weights; the artifact holds rank 0's")
    return trained


def save_interrupted(h, run, model, trained):
    """Keeps what an interrupted run trained (EMA applied, as a finished run's checkpoint) and says how to
    export it. Returns the exit code 128 + signal."""
    if trained.ema is not None:
        trained.ema.copy_to(model)
    path = os.path.join("logs", f"{h.run_id}_interrupted.pt")
    if run.rank == 0:
        save_atomic(float_checkpoint(h, model), path)
        run.log(f"interrupted after step {trained.steps}: weights saved to {path}; export them with "
                f"EXPORT_FROM={path} python3 train_gpt.py")
    if run.world > 1:
        dist.barrier(group=run.ctrl)  # no rank exits before the save
    return 128 + trained.signum


def artifact_sizes(path, code_bytes):
    model_bytes = os.path.getsize(path)
    return dict(model_bytes=model_bytes, artifact_bytes=model_bytes + code_bytes, artifact_path=path)


def export(h, run, model, trained, plan, result):
    """EMA weights in; checkpoint, calibration and quantization inside the training budget; artifact via a temp
    file. A failure or interrupt after the checkpoint says how to export it. Returns (artifact path, live weights
    or None, float weights)."""
    live = {k: v.detach().clone() for k, v in model.state_dict().items()} if trained.ema is not None else None
    path = os.path.join("logs", f"{h.run_id}_model.pt") if h.save_checkpoint else None
    try:
        t = time.perf_counter()
        floats, qstate, hessians = quantize_for_export(h, run, model, trained.ema, plan,
                                                       lambda: calibration_batches(h, trained.loader, run.world), path)
        result["quant_s"] = quant_s = time.perf_counter() - t
        data_s = trained.train_ms / 1000 + run.most(time.perf_counter() - trained.end) if trained.steps else None
        run.log(f"quantize: {h.quant_method} in {quant_s:.1f}s" + (f"; training data last read at {data_s:.1f}s of the "
                f"{h.max_wallclock_seconds:.0f}s budget" if data_s is not None and h.max_wallclock_seconds else ""))
        if data_s is not None and 0 < h.max_wallclock_seconds < data_s:
            run.log(f"warning: training + export read training data until {data_s:.1f}s > MAX_WALLCLOCK_SECONDS")
        return write_export(h, run, model, floats, qstate, hessians, plan, result) + (live, floats)
    except BaseException as e:
        if path and os.path.exists(path):
            run.log(f"export stopped ({type(e).__name__}); the trained weights are saved: export them with "
                    f"EXPORT_FROM={path} python3 train_gpt.py")
        raise


def write_export(h, run, model, floats, qstate, hessians, plan, result):
    """QUANT_FIT, then the compressed artifact. Returns (artifact path,)."""
    artifact, packed = os.path.join("logs", f"{h.run_id}_model.ptz"), None
    if h.quant_fit:
        t = time.perf_counter()
        budget = h.max_artifact_bytes - result["code_bytes"]
        qstate, packed, result["quant_fit_scale"] = fit_to_budget(model, floats, plan, h, hessians, run, qstate, budget)
        result["quant_fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if run.rank == 0:
        with heartbeat(run.log, f"compress ({h.compressor})"):
            result["compressor"], result["compressed_bytes"] = write_artifact(artifact, qstate, h.model_config(),
                                                                              h.compressor, packed)
    if run.world > 1:
        dist.barrier(group=run.ctrl)
    result.update(compress_s=time.perf_counter() - t, **artifact_sizes(artifact, result["code_bytes"]))
    result["bits_per_weight"] = 8 * result["model_bytes"] / quantized_weights(qstate)
    run.log(f"artifact: {artifact} {result['model_bytes']:,} bytes ({result.get('compressed_bytes', h.compressor)}) + code "
            f"{result['code_bytes']:,} = {result['artifact_bytes']:,} bytes; {result['bits_per_weight']:.3f} bits per weight")
    return (artifact,)


def score(h, run, model, compiled, val, result, label):
    """Non-overlapping eval of the artifact's weights, then the sliding eval and TTT when enabled; the
    last one is the run's score."""
    final = timed_eval(run, result, label, "roundtrip", lambda: evaluate(compiled, val.tokens, val.luts, h, run))
    if h.eval_stride < h.eval_seq_len:
        final = timed_eval(run, result, f"sliding window, stride {h.eval_stride}", "sliding", lambda: evaluate(
            compiled, val.tokens, val.luts, h, run, h.eval_stride, "sliding eval"))
    if h.ttt == "sgd":
        final = timed_eval(run, result, "score-first TTT (sgd)", "ttt",
                           lambda: ttt_sgd(model, compiled, val.tokens, val.luts, h, run)[0])
    elif h.ttt in ("lora", "phased"):
        final = timed_eval(run, result, f"score-first TTT ({h.ttt})", "ttt",
                           lambda: ttt_lora(model, compiled, val.tokens, val.luts, h, run)[0])
    return final


def finish(h, run, result, final):
    """Final JSON line. Exit code 3 when code + artifact exceed MAX_ARTIFACT_BYTES (everything is kept), 4 when
    the ranks ended training with different weights."""
    result.update(final, peak_mem_mib=torch.cuda.max_memory_allocated(run.device) // 2**20 if run.is_cuda else None,
                  config=h.as_dict(), env=h.env)
    over = result["artifact_bytes"] - h.max_artifact_bytes
    if over > 0:
        run.log.error(f"artifact {result['artifact_bytes']:,} bytes is {over:,} bytes over MAX_ARTIFACT_BYTES="
                      f"{h.max_artifact_bytes:,}; kept at {result['artifact_path']}. Shrink the model or lower QUANT_BITS")
    run.log(json.dumps(dict(event="final", over_budget=over > 0, **result)))
    return 3 if over > 0 else 4 if result.get("rank_weights_identical") is False else 0


def train_export_score(h, run, model, compiled, val, start, result):
    """Train (or load), export, score the float weights and then the artifact's. Returns the exit code."""
    plan = export_plan(h, model)
    trained = train_or_load(h, run, model, compiled, val, plan, start, result)
    if trained.signum:
        return save_interrupted(h, run, model, trained)
    artifact, live, final_float = export(h, run, model, trained, plan, result)
    for key, label, weights in (("live", "live weights (before EMA)", live),
                                ("prequant", "prequant" + (" (EMA)" if live else ""), final_float)):
        if weights is not None:
            model.load_state_dict(weights)
            timed_eval(run, result, label, key, lambda: evaluate(compiled, val.tokens, val.luts, h, run))
    load_weights(model, dequantize(read_artifact(artifact)[0]), artifact)
    return finish(h, run, result, score(h, run, model, compiled, val, result, "roundtrip (from the artifact file)"))


def main(environ, log):
    h = Hyperparameters(environ)
    start = read_inputs(h)
    run = start_run(h, log)
    val, model, compiled, result = prepare(h, run)
    if h.eval_only:
        load_weights(model, dequantize(start), f"EVAL_ONLY={h.eval_only}")
        run.log.commit()
        result.update(artifact_sizes(h.eval_only, result["code_bytes"]))
        code = finish(h, run, result, score(h, run, model, compiled, val, result, f"artifact {h.eval_only}"))
    else:
        code = train_export_score(h, run, model, compiled, val, start, result)
    if run.world > 1:
        dist.destroy_process_group()
    return code


def cli(environ=os.environ):
    """Runs main. Expected failures end as one `error:` line on stderr and in the run's log (exit 2);
    unexpected ones are logged too, then raised. Exit codes: see `finish` and `save_interrupted`."""
    log = Logger()
    try:
        return main(environ, log)
    except ConfigError as e:
        log.fail(str(e))
        return 2
    except KeyboardInterrupt:
        log.fail("interrupted outside the training loop; files already written under logs/ are complete")
        return 130
    except Exception as e:
        log.fail(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} (traceback below)")
        raise


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # (torchrun's stop) outside training: as Ctrl-C
    sys.exit(cli())
