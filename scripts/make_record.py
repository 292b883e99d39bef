"""Freeze finished train_gpt.py runs into a leaderboard record folder records/track_10min_16mb/<date>_<name>/.

Usage:
  python3 scripts/make_record.py --name crawler_4f1c3 --author "Full Name" --github-id someone \\
      --logs logs/run_seed1337.txt logs/run_seed42.txt logs/run_seed7.txt \\
      [--script train_gpt.py] [--run-sh run.sh] [--hardware "8xH100 SXM"] [--date YYYY-MM-DD] \\
      [--baseline-loss NATS] [--min-improvement 0.005] [--pack] [--out-root records/track_10min_16mb] [--force]

Each log's last `{"event": "final", ...}` line is its result. The script must be the exact bytes the
logs ran (sha256 == the log's code_sha256) and the seeds must be distinct. The folder gets train_gpt.py,
run.sh, train_seed<SEED>.log per log, submission.json and README.md (results table, mean and sample std,
how to reproduce, and with --baseline-loss and >= 2 seeds a one-sided t-test that the mean val_loss beats
baseline - min_improvement with p < 0.01). --pack makes train_gpt.py an lzma+base85 self-extracting
one-liner (the readable script is kept as train_gpt.unpacked.py) and counts its size as the code bytes; with
--pack a log may also come from a run of that packed copy (lzma output is deterministic).
The folder is built in a temp dir next to the target and renamed into place. Exit 0 on success, 1 on error.
Without --script, --run-sh or --out-root the repository's train_gpt.py, run.sh and records/track_10min_16mb
are used, wherever you run it from; paths you give are relative to the current directory.
"""
import argparse
import base64
import datetime
import hashlib
import json
import lzma
import math
import os
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
# Inputs


def read_final(path):
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"log {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith(FINAL_PREFIX)]
    if not lines:
        raise RecordError(f"log {path} has no final line (starting {FINAL_PREFIX}); did the run finish?")
    try:
        rec = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RecordError(f"log {path}: final line is not valid JSON ({e})") from None
    missing = [k for k in ("val_bpb", "val_loss", "artifact_bytes", "code_bytes", "code_sha256", "seed") if k not in rec]
    if missing:
        raise RecordError(f"log {path}: final line lacks {', '.join(missing)}")
    return rec


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


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def readme_text(a, runs, sub, sig, packed):
    seeds = [r["seed"] for r in runs]
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    sliding = any("sliding_val_bpb" in r for r in runs)
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else None
    head = ["seed", "steps", "train time (s)", "prequant bpb", "roundtrip bpb"] + (["sliding bpb"] if sliding else [])
    head += ["val_loss", "val_bpb", "artifact bytes"]
    rows = []
    for r in runs:
        ms = r.get("train_time_ms")
        row = [str(r["seed"]), fmt(r.get("steps"), "d"), fmt(None if ms is None else ms / 1000, ".1f"),
               fmt(r.get("prequant_val_bpb"), ".5f"), fmt(r.get("roundtrip_val_bpb"), ".5f")]
        row += [fmt(r.get("sliding_val_bpb"), ".5f")] if sliding else []
        rows.append(row + [f"{r['val_loss']:.5f}", f"{r['val_bpb']:.5f}", f"{r['artifact_bytes']:,}"])
    out = [f"# {a.name}", "",
           f"**val_bpb {sub['val_bpb']:.5f}** (mean of {len(runs)} seed{'s' * (len(runs) > 1)}) · "
           f"{sub['bytes_total']:,} bytes (max over seeds, code {sub['bytes_code']:,}) · {a.hardware} · {a.date}", "",
           f"Author: {a.author} (@{a.github_id})", "", "## Results", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", f"- val_loss: mean {statistics.fmean(losses):.5f}, sample std {fmt(std(losses), '.5f')} (n={len(runs)})",
            f"- val_bpb: mean {statistics.fmean(bpbs):.5f}, sample std {fmt(std(bpbs), '.5f')} (n={len(runs)})"]
    if packed:
        out.append(f"- bytes_total counts the packed train_gpt.py ({sub['bytes_code']:,} bytes) instead of the "
                   f"{runs[0]['code_bytes']:,} code bytes the logs measured")
    if sig:
        out += ["", "## Significance", "",
                f"One-sided one-sample t-test of the per-seed val_loss against baseline {a.baseline_loss:.5f} − "
                f"{a.min_improvement} = {sig['target']:.5f} nats (H0: mean ≥ {sig['target']:.5f}).", "",
                f"- mean {sig['mean']:.6f}, sample std {sig['std']:.6f}, n {sig['n']}",
                f"- t = {sig['t']:.4f}, df = {sig['df']}, p = {sig['p']:.3g}",
                f"- **{'PASS' if sig['passed'] else 'FAIL'}** (p {'<' if sig['passed'] else '≥'} {sig['alpha']})"]
    out += ["", "## Reproduce", "",
            "From this folder, with the FineWeb sp1024 shards and tokenizer at ./data (or DATA_PATH and TOKENIZER_PATH "
            "set), run once per seed:", "", "```bash", "SEED=<seed> bash run.sh", "```", "",
            f"Seeds: {', '.join(map(str, seeds))}. The logs are train_seed<SEED>.log."]
    if packed:
        out += ["", "train_gpt.py is a self-extracting lzma copy of train_gpt.unpacked.py (the exact bytes the logs "
                "ran, sha256 " + runs[0]["code_sha256"] + "); both behave the same."]
    if "config" in runs[0]:
        out += ["", f"<details><summary>config of the seed {seeds[0]} run</summary>", "", "```json",
                json.dumps(runs[0]["config"], indent=2), "```", "", "</details>"]
    return "\n".join(out) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="record name, used in the folder name")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--logs", nargs="+", required=True, help="logs/<RUN_ID>.txt of finished runs, one per seed")
    p.add_argument("--script", help="the train_gpt.py the logs ran (default: the repository's)")
    p.add_argument("--run-sh", help="default: the repository's run.sh")
    p.add_argument("--hardware", default="8xH100 SXM")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--baseline-loss", type=float, help="previous record's val_loss (nats); enables the t-test")
    p.add_argument("--min-improvement", type=float, default=0.005, help="required improvement in nats")
    p.add_argument("--pack", action="store_true", help="ship train_gpt.py as an lzma self-extracting one-liner")
    p.add_argument("--out-root", help="default: records/track_10min_16mb in the repository")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    return p.parse_args(argv)


def build(a):
    try:
        datetime.date.fromisoformat(a.date)
    except ValueError:
        raise RecordError(f"--date {a.date!r} is not YYYY-MM-DD") from None
    if not a.name or any(c in a.name for c in "/\\ ") or a.name.startswith("."):
        raise RecordError(f"--name {a.name!r} must be a plain folder name (no slashes, spaces or leading dot)")
    script = Path(a.script) if a.script else REPO / "train_gpt.py"
    run_sh = Path(a.run_sh) if a.run_sh else REPO / "run.sh"
    out_root = Path(a.out_root) if a.out_root else REPO / "records" / "track_10min_16mb"
    for what, path in (("script", script), ("run.sh", run_sh)):
        if not path.is_file():
            raise RecordError(f"{what} {path} does not exist")
    code = script.read_bytes()
    wrapper = pack(code) if a.pack else None
    sha = hashlib.sha256(code).hexdigest()
    ok = {sha} | ({hashlib.sha256(wrapper).hexdigest()} if wrapper is not None else set())  # a run of the packed copy
    runs = []
    for log in a.logs:
        rec = read_final(log)
        if rec["code_sha256"] not in ok:
            raise RecordError(f"log {log}: the script differs from the one this log ran (sha256 of {script} is "
                              f"{sha}, the log ran {rec['code_sha256']})")
        if any(r["seed"] == rec["seed"] for r in runs):
            raise RecordError(f"log {log}: seed {rec['seed']} appears twice (seeds must be distinct)")
        runs.append(dict(rec, log=Path(log)))
    runs.sort(key=lambda r: r["seed"])
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
    sub = dict(name=a.name, author=a.author, github_id=a.github_id,
               val_bpb=round(statistics.fmean(r["val_bpb"] for r in runs), 8),
               val_bpb_per_seed={str(r["seed"]): r["val_bpb"] for r in runs},
               val_loss=round(statistics.fmean(r["val_loss"] for r in runs), 8),
               bytes_total=max(totals), bytes_code=code_bytes, hardware=a.hardware, date=a.date,
               seeds=[r["seed"] for r in runs])
    files = {"train_gpt.py": wrapper if wrapper is not None else code, "run.sh": run_sh.read_bytes(),
             "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
             "README.md": readme_text(a, runs, sub, sig, wrapper is not None).encode()}
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
