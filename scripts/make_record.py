"""Freeze finished train_gpt.py runs into a leaderboard record folder records/track_<track>/<date>_<name>/.

Usage:
  python3 scripts/make_record.py --name crawler_4f1c3 --author "Full Name" --github-id someone \\
      --logs logs/run_seed1337.txt logs/run_seed42.txt logs/run_seed7.txt \\
      [--script train_gpt.py] [--run-sh run.sh] [--hardware "8xH100 SXM"] [--blurb TEXT] [--date YYYY-MM-DD] \\
      [--baseline-loss NATS] [--min-improvement 0.005] [--pack] [--track 10min_16mb] [--out-root DIR] [--force]

Each log's last `{"event": "final", ...}` line is its result. The script must be the exact bytes the logs ran
(sha256 == the log's code_sha256), the seeds must be distinct, and the runs must be one setup and one
configuration: the same hardware and torch version (the final line's gpu/world_size/torch_version, or for older
logs the `run ... | torch ... | N x GPU` line that starts the run) and the same environment apart from SEED and
RUN_ID (the final line's "env"). The folder gets:
  train_gpt.py, run.sh, presets/*.env and every data/*.py, presets/... and scripts/... file run.sh names (taken
    from the repository run.sh lives in), so the folder reruns as its README says;
  train_seed<SEED>.log per log;
  submission.json with the fields of the challenge's records (author, github_id, name, blurb, date, track,
    val_loss/val_bpb means and sample stds, seeds, seed_results, artifact_bytes_mean/max, bytes_total, hardware,
    pytorch_version) plus bytes_code and command;
  README.md: results table, mean and sample std, with --baseline-loss and >= 2 seeds a one-sided t-test that the
    mean val_loss beats baseline - min_improvement with p < 0.01, and each run's real command: the variables of
    its "env" that differ from what `bash run.sh [PRESET]` sets (the preset that leaves the fewest), then SEED and
    NPROC_PER_NODE. Logs without "env" get `SEED=<seed> bash run.sh` and a pointer to the config block.
--pack makes train_gpt.py an lzma+base85 self-extracting one-liner (the readable script is kept as
train_gpt.unpacked.py) and counts its size as the code bytes; with --pack a log may also come from a run of that
packed copy (lzma output is deterministic).
The folder is built in a temp dir next to the target and renamed into place. Exit 0 on success, 1 on error
(one line `make_record: error: ...`). Without --script, --run-sh or --out-root the repository's train_gpt.py,
run.sh and records/track_<track> are used, wherever you run it from; paths you give are relative to the
current directory. --track names what the runs qualify for (submission.json's "track"): the challenge's
10min_16mb (default), or e.g. non_record_proxy for runs on other data or hardware.
"""
import argparse
import base64
import datetime
import hashlib
import json
import lzma
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINAL_PREFIX = '{"event": "final"'
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
WRAPPER = ('import lzma,base64;exec(lzma.decompress(base64.b85decode(b"{payload}"),format=lzma.FORMAT_RAW,'
           'filters=[{{"id":lzma.FILTER_LZMA2}}]))')  # one line, no newline: every byte counts
PROBE_ENV = {"CRAWLER_LOOPS": "not_a_number"}  # train_gpt.py exits 2 with a one-line error before any work
# train_gpt.py's first log line: `run <RUN_ID> | torch <version> | <world> x <gpu or cpu> | attention: ...`
HEADER_RE = re.compile(r"^run \S+ \| torch (\S+) \| (\d+) x (.+?)(?: \| attention:.*)?$")
# The challenge's eval time is what scoring the artifact costs: the roundtrip eval of the artifact and the sliding
# window and TTT evals that follow it (the last is the score). live_eval_s/prequant_eval_s measure the float
# weights before export: diagnostics a submission would not run, so they are not counted.
SCORED_EVAL_KEYS = ("roundtrip_eval_s", "sliding_eval_s", "ttt_eval_s")
# Per-run variables, shown on their own (SEED, NPROC_PER_NODE from world_size) or not at all (RUN_ID).
PER_RUN_VARS = ("RUN_ID", "SEED", "NPROC_PER_NODE")
SHELL_DEFAULT_RE = re.compile(r'"\$\{(\w+):=((?:\$\{\w+\}|[^}])*)\}"')  # one `"${VAR:=value}"` of a `: ...` line
# A repository path in run.sh's text: data/x.py, ./data/x.py, presets/a.env, scripts/b.sh (not `$dir/data/...`).
MENTION_RE = re.compile(r"(?<![\w./$-])(?:\./)?((?:data|presets|scripts)/[\w.-]+(?:/[\w.-]+)*)")


class RecordError(Exception):
    """Reported as one line `make_record: error: ...`, exit code 1."""


# ---------------------------------------------------------------------------------------------------
# Statistics: Student t upper tail through the regularized incomplete beta function


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b), continued fraction (modified Lentz), as in Numerical Recipes."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean; use symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def t_sf(t, df):
    """P(T_df >= t) for Student's t with df > 0 degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    half_tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return half_tail if t >= 0 else 1.0 - half_tail


def significance(losses, baseline_loss, min_improvement, alpha=0.01):
    """One-sided one-sample t-test, H0: mean >= baseline_loss - min_improvement."""
    n, mean, std = len(losses), statistics.fmean(losses), statistics.stdev(losses)
    target = baseline_loss - min_improvement
    if std > 0:
        t = (target - mean) / (std / math.sqrt(n))
    else:  # identical losses: the verdict is certain either way
        t = math.inf if target > mean else -math.inf
    p = t_sf(t, n - 1)
    return dict(n=n, mean=mean, std=std, target=target, t=t, df=n - 1, p=p, alpha=alpha, passed=p < alpha)


# ---------------------------------------------------------------------------------------------------
# Inputs: logs


def read_log(path):
    """The log's last final record as a run: the record plus log, _torch, _world and _hardware.

    Only the LAST final line counts (a reused RUN_ID appends a second run to the same log), and the header line
    that counts is the last one before it, since each run starts with its own."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"log {path} does not exist")
    header = last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(FINAL_PREFIX):
            last = (line, header)
        elif m := HEADER_RE.match(line):
            header = m
    if last is None:
        raise RecordError(f"log {path} has no final line (starting {FINAL_PREFIX}); did the run finish?")
    try:
        rec = json.loads(last[0])
    except json.JSONDecodeError as e:
        raise RecordError(f"log {path}: final line is not valid JSON ({e})") from None
    missing = [k for k in ("val_bpb", "val_loss", "artifact_bytes", "code_bytes", "code_sha256", "seed") if k not in rec]
    if missing:
        raise RecordError(f"log {path}: final line lacks {', '.join(missing)}")
    if "env" in rec and not isinstance(rec["env"], dict):
        raise RecordError(f"log {path}: \"env\" in the final line is not an object")
    # New logs say their setup in the final line; older ones only in the header line.
    torch_version, world, gpu = last[1].groups() if last[1] else (None, None, None)
    world = rec.get("world_size") or (int(world) if world else None)
    gpu = rec.get("gpu") or gpu
    return dict(rec, log=path, _torch=rec.get("torch_version") or torch_version, _world=world,
                _hardware=f"{world}x{gpu}" if world and gpu else None)


def agreed(runs, key, what, hint=""):
    """The value of runs' `key` where known, which must be the same in all of them (None if none knows it)."""
    known = [r for r in runs if r[key] is not None]
    for r in known[1:]:
        if r[key] != known[0][key]:
            raise RecordError(f"logs {known[0]['log']} and {r['log']} ran on different {what} ({known[0][key]} vs "
                              f"{r[key]}); a record is one setup{hint}")
    return known[0][key] if known else None


def one_setup(runs, hardware_override):
    """(hardware, torch version) of the record. --hardware replaces what the logs say (which then need not agree:
    say the same machines under another name, or a count the logs got wrong); the torch versions still must."""
    torch_version = agreed(runs, "_torch", "torch versions")
    if hardware_override:
        return hardware_override, torch_version
    for r in runs:
        if r["_hardware"] is None:
            raise RecordError(f"log {r['log']} does not say its hardware (no gpu/world_size in its final line, no "
                              f"`run ... | torch ... | N x GPU` line before it); pass --hardware")
    return agreed(runs, "_hardware", "hardware", " (pass --hardware if they are the same machines)"), torch_version


# ---------------------------------------------------------------------------------------------------
# Inputs: what run.sh needs and sets


def support_files(run_sh):
    """{relative path: bytes} of what the shipped run.sh needs from its repository: every preset, and each
    data/*.py, presets/... or scripts/... file its text names. Other data/ paths (shards, tokenizers) are
    downloaded or built by those scripts, not shipped."""
    repo = run_sh.parent
    wanted = {p.relative_to(repo).as_posix() for p in (repo / "presets").glob("*.env")}
    for match in MENTION_RE.finditer(run_sh.read_text(encoding="utf-8", errors="replace")):
        rel = match.group(1).rstrip(".")  # a path that ends a sentence
        if rel.startswith("data/") and not rel.endswith(".py"):
            continue
        if ".." in rel.split("/") or not (repo / rel).is_file():
            raise RecordError(f"{run_sh} names {rel}, which is not a file in {repo}; the record could not rerun")
        wanted.add(rel)
    return {rel: (repo / rel).read_bytes() for rel in sorted(wanted)}


def shell_defaults(path):
    """{VAR: value} of the `: "${VAR:=value}"` lines of a bash file (several may share a line, as in presets).
    Indented ones (run.sh's SMOKE block) are conditional and skipped. The first assignment wins, as with bash's
    :=. A command substitution $(...) maps to None: it cannot be compared with a run's value; ${VAR} references
    stay, for `expand` once the preset's and run.sh's settings are merged."""
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(": "):
            for name, value in SHELL_DEFAULT_RE.findall(line):
                out.setdefault(name, None if "$(" in value else value)
    return out


def expand(sets):
    """Substitutes ${VAR} from the same settings (DATA_PATH follows VOCAB_SIZE); what stays unknown maps to None."""
    sub = lambda v: re.sub(r"\$\{(\w+)\}", lambda m: sets.get(m[1]) or "$?", v)
    return {k: None if v is None or "$" in sub(v) else sub(v) for k, v in sets.items()}


def env_differences(env, sets):
    """(the variables of env that a launch setting `sets` gets wrong, the ones it sets that env lacks)."""
    diff = {k: v for k, v in env.items() if k not in PER_RUN_VARS and sets.get(k) != v}
    extra = sorted(k for k, v in sets.items() if v and k not in env and k not in PER_RUN_VARS)
    return diff, extra


def check_one_configuration(runs):
    """All runs carry "env" or none does; envs agree apart from SEED and RUN_ID (and NPROC_PER_NODE, whose world
    size belongs to the hardware, checked by one_setup)."""
    with_env = [r for r in runs if "env" in r]
    if with_env and len(with_env) < len(runs):
        without = next(r for r in runs if "env" not in r)
        raise RecordError(f"log {with_env[0]['log']} records the run's environment (\"env\") and log "
                          f"{without['log']} does not, yet they ran the same script; were the logs edited?")
    first = runs[0]
    for r in with_env[1:]:
        for k in sorted(set(first["env"]) | set(r["env"])):
            a, b = first["env"].get(k, "(unset)"), r["env"].get(k, "(unset)")
            if k not in PER_RUN_VARS and a != b:
                raise RecordError(f"logs {first['log']} and {r['log']} differ in {k} ({a!r} vs {b!r}); a record is one "
                                  f"configuration: only SEED and RUN_ID may differ")


def reproduce(runs, run_sh):
    """How the runs were launched: dict(lines=one command per run, preset, direct=[variables run.sh would have set
    that the runs lacked]), or None for logs without "env"."""
    if "env" not in runs[0]:
        return None
    env = {k: str(v) for k, v in runs[0]["env"].items()}
    base = shell_defaults(run_sh)
    best = None
    for preset in [None] + sorted(p.stem for p in (run_sh.parent / "presets").glob("*.env")):
        sets = dict(shell_defaults(run_sh.parent / "presets" / f"{preset}.env")) if preset else {}
        for k, v in base.items():  # run.sh sources the preset first, so the preset's values win
            sets.setdefault(k, v)
        diff, extra = env_differences(env, expand(sets))
        if best is None or len(diff) + len(extra) < best[0]:  # ties keep the earlier: no preset, then by name
            best = (len(diff) + len(extra), preset, diff, extra)
    _, preset, diff, extra = best
    if extra:  # not launched by run.sh (it would have set these): start train_gpt.py with the run's environment
        diff = {k: v for k, v in env.items() if k not in PER_RUN_VARS}
    lines = []
    for r in runs:
        words = [f"{k}={shlex.quote(v)}" for k, v in sorted(diff.items())] + [f"SEED={r['seed']}"]
        if extra:
            words += ["python3 -m torch.distributed.run --standalone", f"--nproc_per_node={r['_world'] or 1}",
                      "train_gpt.py"]
        else:
            words += [f"NPROC_PER_NODE={r['_world']}"] if r["_world"] else []
            words += ["bash run.sh"] + ([preset] if preset else [])
        lines.append(" ".join(words))
    return dict(lines=lines, preset=preset, direct=extra)


# ---------------------------------------------------------------------------------------------------
# --pack


def pack(code):
    """(wrapper bytes) after checking that its payload decompresses to `code` exactly."""
    payload = base64.b85encode(lzma.compress(code, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    wrapper = WRAPPER.format(payload=payload.decode("ascii")).encode("ascii")
    start = wrapper.index(b'b85decode(b"') + len(b'b85decode(b"')
    got = lzma.decompress(base64.b85decode(wrapper[start:wrapper.index(b'"', start)]), format=lzma.FORMAT_RAW,
                          filters=[{"id": lzma.FILTER_LZMA2}])
    if got != code:
        raise RecordError("packed wrapper does not decompress to the original script bytes")
    return wrapper


def check_same_behaviour(code, wrapper):
    """Run the original and the wrapper with CRAWLER_LOOPS=not_a_number; exit codes and stderr must match."""
    results = []
    with tempfile.TemporaryDirectory(prefix="make_record_probe_") as tmp:
        for kind, data in (("original", code), ("packed", wrapper)):
            d = Path(tmp) / kind
            d.mkdir()
            (d / "train_gpt.py").write_bytes(data)
            try:
                r = subprocess.run([sys.executable, "train_gpt.py"], cwd=d, env={**os.environ, **PROBE_ENV},
                                   capture_output=True, timeout=300)
            except subprocess.TimeoutExpired:
                raise RecordError(f"the {kind} script did not exit within 300 s with CRAWLER_LOOPS=not_a_number") from None
            results.append((r.returncode, r.stderr.decode("utf-8", "replace")))
    (rc0, err0), (rc1, err1) = results
    if (rc0, err0) != (rc1, err1):
        raise RecordError(f"packed script behaves differently with CRAWLER_LOOPS=not_a_number: original exit {rc0} "
                          f"stderr {err0.strip()[-300:]!r}, packed exit {rc1} stderr {err1.strip()[-300:]!r}")
    return rc0, err0


# ---------------------------------------------------------------------------------------------------
# Outputs


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def auto_blurb(config):
    """One sentence on the model from a run's config; a missing key just leaves its part out."""
    c = config or {}
    flat, crawler, loops = c.get("num_flat_layers"), c.get("num_crawler_layers"), c.get("crawler_loops")
    layout = [plural(flat, "flat block")] if flat is not None else []
    if loops:  # 0 = no crawler
        shared = plural(crawler, "crawler block") if crawler is not None else "crawler"
        layout.append(f"{shared} x {plural(loops, 'loop')}")
    quant = " ".join(filter(None, [f"int{c['quant_bits']}" if c.get("quant_bits") else "", c.get("quant_method")]))
    parts = [" + ".join(layout), f"d{c['model_dim']}" if c.get("model_dim") else "", quant, c.get("compressor")]
    scoring = []
    stride, seq_len = c.get("eval_stride"), c.get("eval_seq_len")
    if stride:  # train_gpt.py resolves EVAL_STRIDE=0 to EVAL_SEQ_LEN: windows that do not overlap
        scoring.append(f"sliding window stride {stride}" if seq_len is None or stride < seq_len
                       else "non-overlapping windows")
    if c.get("ttt") not in (None, "", "off", False, 0):
        scoring.append("score-first TTT" + (f" ({c['ttt']})" if isinstance(c["ttt"], str) else ""))
    parts = [str(p) for p in parts if p]
    if not parts and not scoring:
        return "GPT trained by train_gpt.py (its logs carry no config)"
    return (("Crawler GPT" if loops else "GPT") + (": " + ", ".join(parts) if parts else "")
            + ("; scored by " + " + ".join(scoring) if scoring else ""))


def seed_result(r, artifact_bytes):
    """One seed's entry of submission.json's seed_results."""
    steps, ms = r.get("steps"), r.get("train_time_ms")
    avg = r.get("step_avg_ms")
    if avg is None and ms is not None and steps:
        avg = ms / steps
    evals = [r[k] for k in SCORED_EVAL_KEYS if r.get(k) is not None]
    return dict(val_loss=r["val_loss"], val_bpb=r["val_bpb"], artifact_bytes=artifact_bytes, steps=steps,
                train_time_s=None if ms is None else ms / 1000, step_avg_ms=avg,
                eval_time_s=round(sum(evals), 3) if evals else None)


def sample_std(xs):
    return round(statistics.stdev(xs), 8) if len(xs) > 1 else None


def submission(a, runs, totals, code_bytes, hardware, torch_version, repro):
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    config = dict(runs[0].get("config") or {})
    if config.get("compressor") == "auto" and runs[0].get("compressor"):
        config["compressor"] = runs[0]["compressor"]  # the one the run chose
    return dict(author=a.author, github_id=a.github_id, name=a.name, blurb=a.blurb or auto_blurb(config),
                date=a.date, track=a.track, val_loss=round(statistics.fmean(losses), 8),
                val_bpb=round(statistics.fmean(bpbs), 8), val_bpb_std=sample_std(bpbs), val_loss_std=sample_std(losses),
                seeds=[r["seed"] for r in runs],
                seed_results={str(r["seed"]): seed_result(r, t) for r, t in zip(runs, totals)},
                artifact_bytes_mean=round(statistics.fmean(totals)), artifact_bytes_max=max(totals),
                bytes_total=max(totals), bytes_code=code_bytes, hardware=hardware, pytorch_version=torch_version,
                command="\n".join(repro["lines"]) if repro else None)


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def results_lines(runs, sub, packed):
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    sliding = any("sliding_val_bpb" in r for r in runs)
    head = ["seed", "steps", "train time (s)", "prequant bpb", "roundtrip bpb"] + (["sliding bpb"] if sliding else [])
    head += ["val_loss", "val_bpb", "artifact bytes"]
    out = ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        ms = r.get("train_time_ms")
        row = [str(r["seed"]), fmt(r.get("steps"), "d"), fmt(None if ms is None else ms / 1000, ".1f"),
               fmt(r.get("prequant_val_bpb"), ".5f"), fmt(r.get("roundtrip_val_bpb"), ".5f")]
        row += [fmt(r.get("sliding_val_bpb"), ".5f")] if sliding else []
        artifact_bytes = sub["seed_results"][str(r["seed"])]["artifact_bytes"]  # the packed code's with --pack
        row += [f"{r['val_loss']:.5f}", f"{r['val_bpb']:.5f}", f"{artifact_bytes:,}"]
        out.append("| " + " | ".join(row) + " |")
    n = len(runs)
    out += ["", f"- val_loss: mean {statistics.fmean(losses):.5f}, sample std {fmt(sub['val_loss_std'], '.5f')} (n={n})",
            f"- val_bpb: mean {statistics.fmean(bpbs):.5f}, sample std {fmt(sub['val_bpb_std'], '.5f')} (n={n})"]
    if packed:
        out.append(f"- bytes_total counts the packed train_gpt.py ({sub['bytes_code']:,} bytes) instead of the "
                   f"{runs[0]['code_bytes']:,} code bytes the logs measured")
    return out


def significance_lines(a, sig):
    return ["## Significance", "",
            f"One-sided one-sample t-test of the per-seed val_loss against baseline {a.baseline_loss:.5f} − "
            f"{a.min_improvement} = {sig['target']:.5f} nats (H0: mean ≥ {sig['target']:.5f}).", "",
            f"- mean {sig['mean']:.6f}, sample std {sig['std']:.6f}, n {sig['n']}",
            f"- t = {sig['t']:.4f}, df = {sig['df']}, p = {sig['p']:.3g}",
            f"- **{'PASS' if sig['passed'] else 'FAIL'}** (p {'<' if sig['passed'] else '≥'} {sig['alpha']})"]


def reproduce_lines(runs, repro, support, packed, track):
    seeds = [r["seed"] for r in runs]
    variant = f"sp{runs[0].get('config', {}).get('vocab_size', 1024)}"
    data = (f"the FineWeb {variant} shards and tokenizer under ./data (`python3 data/cached_challenge_fineweb.py "
            f"--variant {variant}`, or DATA_PATH and TOKENIZER_PATH set)" if track == "10min_16mb" else
            f"the {variant} shards and tokenizer the runs read (track {track}: not the challenge's data or machines; "
            "DATA_PATH and TOKENIZER_PATH below say where they were)")
    out = ["## Reproduce", "", f"From this folder, with {data},"]
    if repro is None:
        out[-1] += " run once per seed:"
        out += ["", "```bash", "SEED=<seed> bash run.sh", "```", "",
                "These logs predate the recorded environment, so that is run.sh's defaults: compare them with the "
                f"config block below (the settings of the seed {seeds[0]} run) and set whatever differs."]
    elif repro["direct"]:
        names = repro["direct"]
        unset = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        out[-1] += (" these are the runs' commands. They were not launched by run.sh (it would have set "
                    f"{unset}, which the runs did not have), so they start train_gpt.py with the runs' environment:")
        out += ["", "```bash", *repro["lines"], "```"]
    else:
        out[-1] += " these are the runs' commands, one per seed:"
        sets = "run.sh's defaults" + (f" and presets/{repro['preset']}.env" if repro["preset"] else "")
        out += ["", "```bash", *repro["lines"], "```", "", f"Variables not shown are {sets}."]
    out += ["", f"Seeds: {', '.join(map(str, seeds))}. The logs are train_seed<SEED>.log."]
    if support:
        out += ["", f"run.sh uses {', '.join(support)}: shipped here as in the repository."]
    if packed:
        out += ["", "train_gpt.py is a self-extracting lzma copy of train_gpt.unpacked.py (the exact bytes the logs "
                "ran, sha256 " + runs[0]["code_sha256"] + "); both behave the same."]
    return out


def readme_text(a, runs, sub, sig, packed, repro, support):
    n = len(runs)
    setup = sub["hardware"] + (f" · torch {sub['pytorch_version']}" if sub["pytorch_version"] else "")
    out = [f"# {a.name}", "", sub["blurb"], "",
           f"**val_bpb {sub['val_bpb']:.5f}** (mean of {n} seed{'s' * (n > 1)}) · "
           f"{sub['bytes_total']:,} bytes (max over seeds, code {sub['bytes_code']:,}) · {setup} · {a.date}", "",
           f"Author: {a.author} (@{a.github_id})", ""]
    out += results_lines(runs, sub, packed)
    if sig:
        out += [""] + significance_lines(a, sig)
    out += [""] + reproduce_lines(runs, repro, support, packed, a.track)
    if "config" in runs[0]:
        out += ["", f"<details><summary>config of the seed {runs[0]['seed']} run</summary>", "", "```json",
                json.dumps(runs[0]["config"], indent=2), "```", "", "</details>"]
    return "\n".join(out) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="record name, used in the folder name")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--logs", nargs="+", required=True, help="logs/<RUN_ID>.txt of finished runs, one per seed")
    p.add_argument("--script", help="the train_gpt.py the logs ran (default: the repository's)")
    p.add_argument("--run-sh", help="default: the repository's run.sh; the presets and data/scripts files it names "
                                    "are taken from its folder")
    p.add_argument("--hardware", help="hardware for submission.json, e.g. '8xH100 80GB SXM'. Default: "
                                      "'<world_size>x<gpu>' read from the logs, which must all agree. Given, it "
                                      "replaces what the logs say, which then need not agree (the same machines "
                                      "named differently); their torch versions still must")
    p.add_argument("--blurb", help="one-sentence summary for submission.json (default: generated from the config)")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--baseline-loss", type=float, help="previous record's val_loss (nats); enables the t-test")
    p.add_argument("--min-improvement", type=float, default=0.005, help="required improvement in nats")
    p.add_argument("--pack", action="store_true", help="ship train_gpt.py as an lzma self-extracting one-liner")
    p.add_argument("--track", default="10min_16mb", help="submission.json's track; e.g. non_record_proxy for runs "
                                                         "that are not on FineWeb or 8xH100")
    p.add_argument("--out-root", help="default: records/track_<track> in the repository")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    return p.parse_args(argv)


def read_runs(logs, script, ok, sha):
    runs = []
    for log in logs:
        run = read_log(log)
        if run["code_sha256"] not in ok:
            raise RecordError(f"log {log}: the script differs from the one this log ran (sha256 of {script} is "
                              f"{sha}, the log ran {run['code_sha256']})")
        if any(r["seed"] == run["seed"] for r in runs):
            raise RecordError(f"log {log}: seed {run['seed']} appears twice (seeds must be distinct)")
        runs.append(run)
    return sorted(runs, key=lambda r: r["seed"])


def build(a):
    try:
        datetime.date.fromisoformat(a.date)
    except ValueError:
        raise RecordError(f"--date {a.date!r} is not YYYY-MM-DD") from None
    if not a.name or any(c in a.name for c in "/\\ ") or a.name.startswith("."):
        raise RecordError(f"--name {a.name!r} must be a plain folder name (no slashes, spaces or leading dot)")
    script = Path(a.script) if a.script else REPO / "train_gpt.py"
    run_sh = Path(a.run_sh) if a.run_sh else REPO / "run.sh"
    if not re.fullmatch(r"[\w.-]+", a.track):
        raise RecordError(f"--track {a.track!r} must be a plain name (letters, digits, '_', '.', '-')")
    out_root = Path(a.out_root) if a.out_root else REPO / "records" / f"track_{a.track}"
    for what, path in (("script", script), ("run.sh", run_sh)):
        if not path.is_file():
            raise RecordError(f"{what} {path} does not exist")
    code = script.read_bytes()
    wrapper = pack(code) if a.pack else None
    sha = hashlib.sha256(code).hexdigest()
    ok = {sha} | ({hashlib.sha256(wrapper).hexdigest()} if wrapper is not None else set())  # a run of the packed copy
    runs = read_runs(a.logs, script, ok, sha)
    hardware, torch_version = one_setup(runs, a.hardware)
    check_one_configuration(runs)
    support = support_files(run_sh)
    repro = reproduce(runs, run_sh)
    target = out_root / f"{a.date}_{a.name}"
    if target.exists() and not a.force:
        raise RecordError(f"{target} already exists (use --force to replace it)")

    if wrapper is not None:
        check_same_behaviour(code, wrapper)
    code_bytes = len(wrapper) if wrapper is not None else len(code)
    totals = [r["artifact_bytes"] - r["code_bytes"] + code_bytes if wrapper is not None else r["artifact_bytes"]
              for r in runs]
    sig = None
    if a.baseline_loss is not None and len(runs) >= 2:
        sig = significance([r["val_loss"] for r in runs], a.baseline_loss, a.min_improvement)
    elif a.baseline_loss is not None:
        print("make_record: warning: the significance test needs at least 2 seeds; skipped", file=sys.stderr)
    sub = submission(a, runs, totals, code_bytes, hardware, torch_version, repro)
    files = dict(support)
    files.update({"train_gpt.py": wrapper if wrapper is not None else code, "run.sh": run_sh.read_bytes(),
                  "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
                  "README.md": readme_text(a, runs, sub, sig, wrapper is not None, repro, list(support)).encode()})
    if wrapper is not None:
        files["train_gpt.unpacked.py"] = code
    for r in runs:
        files[f"train_seed{r['seed']}.log"] = r["log"].read_bytes()
    write_atomic(target, files, a.force)
    return target, sub, sig


def write_atomic(target, files, force):
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # presets/, data/, scripts/
            (tmp / name).write_bytes(data)
        if (tmp / "run.sh").exists():
            os.chmod(tmp / "run.sh", 0o755)
        os.chmod(tmp, 0o755)
        old = None
        if target.exists() and force:
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None):
    a = parse_args(argv)
    try:
        target, sub, sig = build(a)
    except (RecordError, OSError) as e:
        print(f"make_record: error: {e}", file=sys.stderr)
        return 1
    print(target)
    line = f"val_bpb {sub['val_bpb']:.8f} (mean of {len(sub['seeds'])}) | bytes_total {sub['bytes_total']:,}"
    if sig:
        line += (f" | mean val_loss {sig['mean']:.6f} std {sig['std']:.6f} t {sig['t']:.4f} df {sig['df']}"
                 f" p {sig['p']:.3g} {'PASS' if sig['passed'] else 'FAIL'}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
