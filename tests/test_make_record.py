"""scripts/make_record.py: record folder layout, submission.json values, error paths, the Student t tail
against textbook values and numeric integration, the significance verdict, and --pack (a self-extracting
wrapper that decompresses to the exact bytes and behaves like the original, the real train_gpt.py too)."""
import base64
import hashlib
import importlib.util
import json
import lzma
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_record", REPO / "scripts" / "make_record.py")
mr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mr)

FAKE_SCRIPT = '''"""Fake train_gpt.py: rejects a bad CRAWLER_LOOPS like the real one, else reports its own size."""
import os
import sys


def main():
    text = os.environ.get("CRAWLER_LOOPS", "").strip()
    if text:
        try:
            int(text)
        except ValueError:
            print(f"error: CRAWLER_LOOPS={text!r} is not a valid int", file=sys.stderr)
            return 2
    print(f"code_bytes {len(open(__file__, 'rb').read())} name {__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
CONFIG = {"model_dim": 512, "num_flat_layers": 4, "crawler_loops": 3, "seed": 1337, "quant_method": "loop_gptq"}


def final_record(seed, val_loss, val_bpb, model_bytes, code, **extra):
    rec = {"event": "final", "over_budget": False, "model_params": 17_000_000, "world_size": 8, "seed": seed,
           "attention": "fa3", "code_sha256": hashlib.sha256(code).hexdigest(), "code_bytes": len(code),
           "steps": 6000 + seed % 100, "train_time_ms": 590_123 + seed, "model_bytes": model_bytes,
           "artifact_bytes": model_bytes + len(code), "prequant_val_bpb": val_bpb - 0.01,
           "roundtrip_val_bpb": val_bpb, "val_loss": val_loss, "val_bpb": val_bpb,
           "config": dict(CONFIG, seed=seed)}
    rec.update(extra)
    return rec


def write_log(path, rec, stale=None):
    lines = ["run x | torch 2.x | 8 x H100", "step 100/20000 train_loss 3.2100 train_time 10.0s"]
    if stale is not None:  # an earlier run appended to the same RUN_ID log: only the LAST final line counts
        lines.append(json.dumps(stale))
    lines += ["step 6000/20000 train_loss 2.0500", json.dumps(rec), "done"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def env(tmp_path):
    """Fake script, run.sh and three logs of it (old style: no gpu/torch_version/env in the final line);
    returns a namespace of paths, the CLI args without --hardware (base) and with it (args)."""
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_SCRIPT)
    code = script.read_bytes()
    run_sh = tmp_path / "run.sh"
    run_sh.write_text("#!/usr/bin/env bash\nexec python3 train_gpt.py\n")
    runs = {1337: (2.0010, 1.18510, 15_800_000), 42: (2.0000, 1.18450, 15_900_123), 7: (1.9990, 1.18390, 15_850_000)}
    logs = []
    for seed, (loss, bpb, mb) in runs.items():
        stale = final_record(seed, 9.0, 9.0, 1, code) if seed == 42 else None
        logs.append(write_log(tmp_path / f"run_{seed}.txt", final_record(seed, loss, bpb, mb, code), stale))
    out_root = tmp_path / "records"
    base = ["--name", "crawler_test", "--author", "Ada Lovelace", "--github-id", "ada", "--script", str(script),
            "--run-sh", str(run_sh), "--date", "2026-03-01", "--out-root", str(out_root)]
    target = out_root / "2026-03-01_crawler_test"
    return type("Env", (), dict(tmp=tmp_path, script=script, code=code, run_sh=run_sh, runs=runs, logs=logs,
                                base=base, args=base + ["--hardware", "8xH100 SXM"], target=target, out_root=out_root))


def cli(capsys, *argv):
    rc = mr.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc, err, *needles):
    assert rc == 1
    assert err.startswith("make_record: error:") and err.count("\n") == 1, err  # one line, so no traceback
    for n in needles:
        assert str(n) in err, (n, err)


def test_record_folder_layout_and_submission(env, capsys):
    rc, out, err = cli(capsys, *env.args, "--logs", *env.logs)
    assert rc == 0, err
    assert str(env.target) in out and "val_bpb 1.18450000" in out
    names = sorted(p.name for p in env.target.iterdir())
    assert names == sorted(["train_gpt.py", "run.sh", "submission.json", "README.md",
                            "train_seed1337.log", "train_seed42.log", "train_seed7.log"])
    assert (env.target / "train_gpt.py").read_bytes() == env.code
    assert (env.target / "run.sh").read_bytes() == env.run_sh.read_bytes()
    assert (env.target / "train_seed42.log").read_bytes() == env.logs[1].read_bytes()
    assert not [p for p in env.out_root.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    sub = json.loads((env.target / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx((1.18510 + 1.18450 + 1.18390) / 3, abs=1e-9)  # stale 9.0 line ignored
    assert sub["val_bpb"] == round(sub["val_bpb"], 8)
    assert {k: v["val_bpb"] for k, v in sub["seed_results"].items()} == {"7": 1.18390, "42": 1.18450, "1337": 1.18510}
    assert sub["val_loss"] == pytest.approx(2.0, abs=1e-9)
    assert sub["bytes_total"] == 15_900_123 + len(env.code)
    assert sub["bytes_code"] == len(env.code)
    assert sub["seeds"] == [7, 42, 1337]
    assert (sub["name"], sub["author"], sub["github_id"], sub["hardware"], sub["date"]) == (
        "crawler_test", "Ada Lovelace", "ada", "8xH100 SXM", "2026-03-01")
    readme = (env.target / "README.md").read_text()
    for seed, (loss, bpb, mb) in env.runs.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| {seed} |"))
        assert f"{loss:.5f}" in row and f"{bpb:.5f}" in row and f"{mb + len(env.code):,}" in row
    assert "sliding" not in readme and "## Significance" not in readme
    assert f"val_loss: mean 2.00000, sample std {statistics.stdev([2.001, 2.0, 1.999]):.5f}" in readme
    assert "SEED=<seed> bash run.sh" in readme and '"crawler_loops": 3' in readme and "<details>" in readme
    assert "config" in readme.split("## Reproduce")[1].split("<details>")[0]  # old logs: points at the config block
    assert sub["command"] is None  # old logs do not say how they were launched


def test_sliding_column_when_present(env, capsys):
    log = write_log(env.tmp / "s.txt", final_record(5, 2.0, 1.18, 15_000_000, env.code, sliding_val_bpb=1.1765))
    rc, _, err = cli(capsys, *env.args, "--logs", log)
    assert rc == 0, err
    readme = (env.target / "README.md").read_text()
    assert "sliding bpb" in readme and "1.17650" in readme


def test_hash_mismatch_names_log_and_hashes(env, capsys):
    original = hashlib.sha256(env.code).hexdigest()
    env.script.write_text(FAKE_SCRIPT + "# edited after the run\n")
    rc, _, err = cli(capsys, *env.args, "--logs", *env.logs)
    assert_error(rc, err, env.logs[0], "the script differs from the one this log ran", original,
                 hashlib.sha256(env.script.read_bytes()).hexdigest())
    assert not env.target.exists()


def test_duplicate_seeds_fail(env, capsys):
    dup = write_log(env.tmp / "dup.txt", final_record(42, 1.5, 1.0, 1000, env.code))
    rc, _, err = cli(capsys, *env.args, "--logs", env.logs[1], dup)
    assert_error(rc, err, "seed 42", dup)
    assert not env.target.exists()


def test_missing_log_and_unfinished_log_fail(env, capsys):
    rc, _, err = cli(capsys, *env.args, "--logs", env.tmp / "nope.txt")
    assert_error(rc, err, "nope.txt", "does not exist")
    unfinished = env.tmp / "unfinished.txt"
    unfinished.write_text("step 1/20000 train_loss 6.9\n")
    rc, _, err = cli(capsys, *env.args, "--logs", env.logs[0], unfinished)
    assert_error(rc, err, "unfinished.txt", "no final line")
    assert not env.out_root.exists() or not any(env.out_root.iterdir())


def test_existing_target_refused_unless_force(env, capsys):
    assert cli(capsys, *env.args, "--logs", env.logs[0])[0] == 0
    rc, _, err = cli(capsys, *env.args, "--logs", *env.logs)
    assert_error(rc, err, env.target, "already exists", "--force")
    assert json.loads((env.target / "submission.json").read_text())["seeds"] == [1337]  # untouched
    rc, _, err = cli(capsys, *env.args, "--logs", *env.logs, "--force")
    assert rc == 0, err
    assert json.loads((env.target / "submission.json").read_text())["seeds"] == [7, 42, 1337]
    assert sorted(p.name for p in env.out_root.iterdir()) == [env.target.name]


# ---------------------------------------------------------------------------------------------------
# submission.json: the upstream records' fields, per-seed results, blurb

NEW_SETUP = {"gpu": "NVIDIA H100 80GB HBM3", "world_size": 8, "torch_version": "2.11.0+cu130"}
FULL_CONFIG = dict(CONFIG, num_crawler_layers=1, quant_bits=6, compressor="brotli", eval_seq_len=2048,
                   eval_stride=64, ttt="off")
UPSTREAM_KEYS = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_bpb_std",
                 "val_loss_std", "seeds", "seed_results", "artifact_bytes_mean", "artifact_bytes_max", "bytes_total",
                 "hardware", "pytorch_version"}


def test_track_names_the_submission_and_the_default_folder(env, capsys, monkeypatch, tmp_path):
    """--track non_record_proxy: submission.json says so, and without --out-root the folder goes to
    records/track_non_record_proxy of the repository (here a stand-in REPO); a path-like track is refused."""
    monkeypatch.setattr(mr, "REPO", tmp_path / "repo")
    base = [a for a in env.args if a not in ("--out-root", str(env.out_root))]
    rc, _, err = cli(capsys, *base, "--track", "non_record_proxy", "--logs", *env.logs)
    assert rc == 0, err
    target = tmp_path / "repo/records/track_non_record_proxy/2026-03-01_crawler_test"
    assert json.loads((target / "submission.json").read_text())["track"] == "non_record_proxy"
    reproduce = (target / "README.md").read_text().split("## Reproduce")[1]
    assert "the sp1024 shards and tokenizer the runs read (track non_record_proxy" in reproduce
    assert "FineWeb" not in reproduce
    assert cli(capsys, *env.args, "--logs", *env.logs)[0] == 0  # the challenge's track: its data
    assert "with the FineWeb sp1024 shards" in (env.target / "README.md").read_text()
    rc, _, err = cli(capsys, *env.args, "--track", "../x", "--logs", *env.logs)
    assert_error(rc, err, "--track '../x' must be a plain name")


def test_submission_has_upstream_fields_and_seed_results(env, capsys):
    logs = []
    for seed, (loss, bpb, mb) in env.runs.items():
        rec = final_record(seed, loss, bpb, mb, env.code, **NEW_SETUP, step_avg_ms=98.5 + seed % 10,
                           roundtrip_eval_s=10.0 + seed % 3, sliding_eval_s=80.25, live_eval_s=5.0,
                           prequant_eval_s=6.0, config=dict(FULL_CONFIG, seed=seed))
        logs.append(write_log(env.tmp / f"new_{seed}.txt", rec))
    rc, _, err = cli(capsys, *env.base, "--logs", *logs)
    assert rc == 0, err
    sub = json.loads((env.target / "submission.json").read_text())
    assert UPSTREAM_KEYS <= set(sub) and sub["track"] == "10min_16mb"
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev([2.001, 2.0, 1.999]), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev([1.18510, 1.18450, 1.18390]), abs=1e-8)
    totals = [mb + len(env.code) for _, _, mb in env.runs.values()]
    assert sub["artifact_bytes_max"] == sub["bytes_total"] == max(totals)
    assert sub["artifact_bytes_mean"] == round(statistics.fmean(totals))
    assert sorted(sub["seed_results"], key=int) == ["7", "42", "1337"]
    for seed, (loss, bpb, mb) in env.runs.items():
        r = sub["seed_results"][str(seed)]
        assert (r["val_loss"], r["val_bpb"], r["artifact_bytes"], r["steps"]) == (loss, bpb, mb + len(env.code),
                                                                                 6000 + seed % 100)
        assert r["train_time_s"] == pytest.approx((590_123 + seed) / 1000)
        assert r["step_avg_ms"] == pytest.approx(98.5 + seed % 10)
        assert r["eval_time_s"] == pytest.approx(10.0 + seed % 3 + 80.25)  # live/prequant evals are not scored
    assert (sub["hardware"], sub["pytorch_version"]) == ("8xNVIDIA H100 80GB HBM3", "2.11.0+cu130")
    assert sub["blurb"] == ("Crawler GPT: 4 flat blocks + 1 crawler block x 3 loops, d512, int6 loop_gptq, brotli; "
                            "scored by sliding window stride 64")
    readme = (env.target / "README.md").read_text()
    assert sub["blurb"] in readme and "8xNVIDIA H100 80GB HBM3" in readme and "2.11.0+cu130" in readme


def test_single_seed_std_is_null_and_eval_time_without_evals(env, capsys):
    rc, _, err = cli(capsys, *env.args, "--logs", env.logs[0])
    assert rc == 0, err
    sub = json.loads((env.target / "submission.json").read_text())
    assert sub["val_bpb_std"] is None and sub["val_loss_std"] is None
    assert sub["seed_results"]["1337"]["eval_time_s"] is None  # the log has no *_eval_s keys
    assert sub["seed_results"]["1337"]["step_avg_ms"] == pytest.approx((590_123 + 1337) / (6000 + 37))


@pytest.mark.parametrize("config,expected", [
    (dict(FULL_CONFIG, ttt="sgd", eval_stride=2048, num_crawler_layers=2, crawler_loops=1),
     "Crawler GPT: 4 flat blocks + 2 crawler blocks x 1 loop, d512, int6 loop_gptq, brotli; scored by "
     "non-overlapping windows + score-first TTT (sgd)"),
    (dict(FULL_CONFIG, crawler_loops=0), "GPT: 4 flat blocks, d512, int6 loop_gptq, brotli; scored by sliding "
                                         "window stride 64"),
    ({"model_dim": 384, "ttt": "lora"}, "GPT: d384; scored by score-first TTT (lora)"),
    ({"quant_bits": 5, "eval_stride": 32}, "GPT: int5; scored by sliding window stride 32"),
])
def test_blurb_from_config(config, expected):
    assert mr.auto_blurb(config) == expected


def test_blurb_option_and_missing_config(env, capsys):
    rec = final_record(3, 2.0, 1.2, 15_000_000, env.code)
    del rec["config"]
    log = write_log(env.tmp / "noconfig.txt", rec)
    rc, _, err = cli(capsys, *env.args, "--logs", log)
    assert rc == 0, err
    blurb = json.loads((env.target / "submission.json").read_text())["blurb"]
    assert isinstance(blurb, str) and blurb and "\n" not in blurb
    rc, _, err = cli(capsys, *env.args, "--logs", log, "--blurb", "My own words.", "--force")
    assert rc == 0, err
    assert json.loads((env.target / "submission.json").read_text())["blurb"] == "My own words."


# ---------------------------------------------------------------------------------------------------
# Hardware and torch version from the logs


def test_hardware_from_final_line_and_header_fallback(env, capsys):
    new = write_log(env.tmp / "new.txt", final_record(1, 2.0, 1.2, 15_000_000, env.code, **NEW_SETUP))
    old = env.tmp / "old.txt"  # no gpu/torch_version in the final line: the run's header line says it
    rec = final_record(2, 2.0, 1.2, 15_000_000, env.code)
    old.write_text(f"run r2 | torch 2.11.0+cu130 | 8 x NVIDIA H100 80GB HBM3 | attention: sdpa (flash-attn not "
                   f"installed: PyTorch SDPA)\nstep 1/20000 train_loss 6.9\n{json.dumps(rec)}\n")
    rc, _, err = cli(capsys, *env.base, "--logs", new, old)
    assert rc == 0, err
    sub = json.loads((env.target / "submission.json").read_text())
    assert (sub["hardware"], sub["pytorch_version"]) == ("8xNVIDIA H100 80GB HBM3", "2.11.0+cu130")
    assert "8xNVIDIA H100 80GB HBM3" in (env.target / "README.md").read_text()


def test_header_of_the_last_run_in_an_appended_log_counts(env, capsys):
    rec = final_record(2, 2.0, 1.2, 15_000_000, env.code)
    del rec["world_size"]  # so that the header's count shows too
    log = env.tmp / "appended.txt"
    log.write_text("\n".join([
        "run r | torch 2.9.0 | 1 x cpu | attention: sdpa", json.dumps(dict(rec, val_bpb=9.0)),
        "run r | torch 2.11.0+cu130 | 2 x NVIDIA H200 | attention: fa3", json.dumps(rec)]) + "\n")
    rc, _, err = cli(capsys, *env.base, "--logs", log)
    assert rc == 0, err
    sub = json.loads((env.target / "submission.json").read_text())
    assert (sub["hardware"], sub["pytorch_version"], sub["val_bpb"]) == ("2xNVIDIA H200", "2.11.0+cu130", 1.2)


def test_mixed_hardware_or_torch_is_an_error_unless_overridden(env, capsys):
    h100 = write_log(env.tmp / "h100.txt", final_record(1, 2.0, 1.2, 15_000_000, env.code, **NEW_SETUP))
    h200 = write_log(env.tmp / "h200.txt", final_record(2, 2.0, 1.2, 15_000_000, env.code,
                                                       **dict(NEW_SETUP, gpu="NVIDIA H200")))
    rc, _, err = cli(capsys, *env.base, "--logs", h100, h200)
    assert_error(rc, err, "h100.txt", "h200.txt", "8xNVIDIA H100 80GB HBM3", "8xNVIDIA H200", "--hardware")
    assert not env.target.exists()
    rc, _, err = cli(capsys, *env.base, "--logs", h100, h200, "--hardware", "8xH100-class")
    assert rc == 0, err
    assert json.loads((env.target / "submission.json").read_text())["hardware"] == "8xH100-class"
    torch29 = write_log(env.tmp / "torch29.txt", final_record(3, 2.0, 1.2, 15_000_000, env.code,
                                                             **dict(NEW_SETUP, torch_version="2.9.1+cu128")))
    rc, _, err = cli(capsys, *env.base, "--logs", h100, torch29, "--hardware", "8xH100", "--force")
    assert_error(rc, err, "h100.txt", "torch29.txt", "2.11.0+cu130", "2.9.1+cu128")


def test_unknown_hardware_needs_the_option(env, capsys):
    log = env.tmp / "bare.txt"
    log.write_text(json.dumps(final_record(1, 2.0, 1.2, 15_000_000, env.code)) + "\n")
    rc, _, err = cli(capsys, *env.base, "--logs", log)
    assert_error(rc, err, "bare.txt", "--hardware")
    rc, _, err = cli(capsys, *env.base, "--logs", log, "--hardware", "8xH100 SXM")
    assert rc == 0, err
    assert json.loads((env.target / "submission.json").read_text())["pytorch_version"] is None


# ---------------------------------------------------------------------------------------------------
# The files run.sh needs travel with it

MENTION = re.compile(r"(?<![\w./$-])(?:\./)?((?:data|presets|scripts)/[\w.-]+(?:/[\w.-]+)*)")


def test_record_has_every_file_the_real_run_sh_uses(env, capsys):
    rc, _, err = cli(capsys, *env.args, "--run-sh", REPO / "run.sh", "--logs", *env.logs)
    assert rc == 0, err
    text = (REPO / "run.sh").read_text()
    needed = {m.rstrip(".") for m in MENTION.findall(text)}
    needed = {p for p in needed if not p.startswith("data/") or p.endswith(".py")}  # shards/tokenizers are built
    needed |= {f"presets/{p.name}" for p in (REPO / "presets").glob("*.env")}
    assert "data/build_shards.py" in needed and "data/cached_challenge_fineweb.py" in needed
    for rel in sorted(needed):
        assert (env.target / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    # run.sh finds its presets from inside the record folder
    r = subprocess.run(["bash", "run.sh", "no_such_preset"], cwd=env.target, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "leg3" in r.stderr, r.stderr


def test_run_sh_mentions_are_copied_and_a_missing_one_is_an_error(env, capsys):
    repo = env.tmp / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "scripts").mkdir()
    (repo / "presets").mkdir()
    (repo / "data" / "tool.py").write_text("print('tool')\n")
    (repo / "scripts" / "prep.sh").write_text("echo prep\n")
    (repo / "presets" / "deep.env").write_text(': "${NUM_FLAT_LAYERS:=6}"\n')
    run_sh = repo / "run.sh"
    run_sh.write_text('#!/usr/bin/env bash\n# see scripts/prep.sh.\npython3 ./data/tool.py --out data/datasets/x.bin\n'
                      'source "presets/$1.env"\nexec python3 train_gpt.py\n')
    rc, _, err = cli(capsys, *env.args, "--run-sh", run_sh, "--logs", env.logs[0])
    assert rc == 0, err
    got = sorted(p.relative_to(env.target).as_posix() for p in env.target.rglob("*") if p.is_file())
    assert {"data/tool.py", "scripts/prep.sh", "presets/deep.env"} <= set(got)
    assert not [p for p in got if p.startswith("data/datasets")]
    run_sh.write_text(run_sh.read_text() + "python3 data/missing_tool.py\n")
    rc, _, err = cli(capsys, *env.args, "--run-sh", run_sh, "--logs", env.logs[0], "--force")
    assert_error(rc, err, "data/missing_tool.py", str(run_sh))


# ---------------------------------------------------------------------------------------------------
# Reproduce: each run's real command

RUN_SH = '''#!/usr/bin/env bash
set -a
if [ $# -gt 0 ]; then source "presets/$1.env"; fi
if [ "${SMOKE:-0}" = 1 ]; then
  : "${NUM_FLAT_LAYERS:=2}" "${MODEL_DIM:=64}"
fi
: "${DATA_PATH:=./data/datasets/fineweb10B_sp1024}"
: "${SEED:=1337}"
: "${NUM_FLAT_LAYERS:=4}"
: "${CRAWLER_LOOPS:=3}"
: "${ROPE_SCALES:=}"           # e.g. 9,1,1
: "${RUN_ID:=$(date +%s)_seed${SEED}}"
exec python3 train_gpt.py
'''
DEFAULT_ENV = {"DATA_PATH": "./data/datasets/fineweb10B_sp1024", "NUM_FLAT_LAYERS": "4", "CRAWLER_LOOPS": "3"}


def command_env(tmp):
    """A repository whose run.sh and presets the command is built against."""
    repo = tmp / "cmdrepo"
    (repo / "presets").mkdir(parents=True)
    (repo / "run.sh").write_text(RUN_SH)
    (repo / "presets" / "deep.env").write_text('# deeper\n: "${NUM_FLAT_LAYERS:=6}" "${CRAWLER_LOOPS:=2}"\n'
                                               ': "${ROPE_SCALES:=9,1}"\n')
    return repo / "run.sh"


def env_logs(env, envs, **extra):
    return [write_log(env.tmp / f"env_{seed}.txt", final_record(seed, 2.0, 1.2, 15_000_000, env.code,
                                                                 **{**NEW_SETUP, **extra},
                                                                 env=dict(e, SEED=str(seed), RUN_ID=f"r{seed}")))
            for seed, e in envs.items()]


def reproduce(env):
    readme = (env.target / "README.md").read_text()
    block = readme.split("## Reproduce")[1].split("```bash\n")[1].split("```")[0]
    return block.splitlines(), json.loads((env.target / "submission.json").read_text())["command"]


@pytest.mark.parametrize("run_env,command", [
    (DEFAULT_ENV, "SEED={seed} NPROC_PER_NODE=8 bash run.sh"),
    (dict(DEFAULT_ENV, NUM_FLAT_LAYERS="6", CRAWLER_LOOPS="2", ROPE_SCALES="9,1", MATRIX_LR="0.02"),
     "MATRIX_LR=0.02 SEED={seed} NPROC_PER_NODE=8 bash run.sh deep"),
    # one difference either way: no preset wins the tie
    (dict(DEFAULT_ENV, NUM_FLAT_LAYERS="6"), "NUM_FLAT_LAYERS=6 SEED={seed} NPROC_PER_NODE=8 bash run.sh"),
    (dict(DEFAULT_ENV, XSA_BLOCKS="0,1 2"), "XSA_BLOCKS='0,1 2' SEED={seed} NPROC_PER_NODE=8 bash run.sh"),
])
def test_reproduce_command_from_the_runs_env(env, capsys, run_env, command):
    run_sh = command_env(env.tmp)
    logs = env_logs(env, {7: run_env, 42: run_env})
    rc, _, err = cli(capsys, *env.base, "--run-sh", run_sh, "--logs", *logs)
    assert rc == 0, err
    lines, sub_command = reproduce(env)
    assert lines == [command.format(seed=7), command.format(seed=42)]
    assert sub_command == "\n".join(lines)


def test_reproduce_command_of_a_direct_launch(env, capsys):
    """run.sh would set CRAWLER_LOOPS, which the run did not have: only a direct launch reproduces it."""
    run_sh = command_env(env.tmp)
    logs = env_logs(env, {7: {"NUM_FLAT_LAYERS": "4", "DATA_PATH": "/d"}})
    rc, _, err = cli(capsys, *env.base, "--run-sh", run_sh, "--logs", *logs)
    assert rc == 0, err
    lines, _ = reproduce(env)
    assert lines == ["DATA_PATH=/d NUM_FLAT_LAYERS=4 SEED=7 python3 -m torch.distributed.run --standalone "
                     "--nproc_per_node=8 train_gpt.py"]
    assert "CRAWLER_LOOPS" in (env.target / "README.md").read_text()


def test_runs_with_different_env_are_an_error(env, capsys):
    run_sh = command_env(env.tmp)
    logs = env_logs(env, {7: DEFAULT_ENV, 42: dict(DEFAULT_ENV, MATRIX_LR="0.02")})
    rc, _, err = cli(capsys, *env.base, "--run-sh", run_sh, "--logs", *logs)
    assert_error(rc, err, "MATRIX_LR", "env_7.txt", "env_42.txt")
    assert not env.target.exists()
    logs = env_logs(env, {7: DEFAULT_ENV, 42: dict(DEFAULT_ENV, CRAWLER_LOOPS="2")})
    rc, _, err = cli(capsys, *env.base, "--run-sh", run_sh, "--logs", *logs)
    assert_error(rc, err, "CRAWLER_LOOPS", "env_7.txt", "env_42.txt")


def real_run_sh_env(tmp, *args, **outside):
    """The variables the real run.sh exports before it starts torchrun (its text up to `set +a`, run by bash)."""
    repo = tmp / "real"
    shutil.copytree(REPO / "presets", repo / "presets")
    text = (REPO / "run.sh").read_text()
    assert "\nset +a\n" in text
    (repo / "defaults.sh").write_text(text.split("\nset +a\n")[0] + "\nenv\n")
    r = subprocess.run(["bash", "defaults.sh", *args], cwd=repo, capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], **outside})
    assert r.returncode == 0, r.stderr
    pairs = [line.split("=", 1) for line in r.stdout.splitlines() if "=" in line]
    shell = ("PATH", "PWD", "OLDPWD", "SHLVL")
    return {k: v for k, v in pairs if re.fullmatch(r"[A-Z][A-Z0-9_]*", k) and v and k not in shell}


@pytest.mark.parametrize("preset", [None, "leg3", "ouroboros", "record"])
def test_reproduce_command_against_the_real_run_sh(env, capsys, preset):
    args = [preset] if preset else []
    run_env = real_run_sh_env(env.tmp, *args, MATRIX_LR="0.0275")
    assert run_env["MATRIX_LR"] == "0.0275" and "RUN_ID" in run_env
    logs = env_logs(env, {7: run_env, 42: run_env})
    rc, _, err = cli(capsys, *env.base, "--run-sh", REPO / "run.sh", "--logs", *logs)
    assert rc == 0, err
    lines, _ = reproduce(env)
    tail = " bash run.sh" + (f" {preset}" if preset else "")
    assert lines == [f"MATRIX_LR=0.0275 SEED={s} NPROC_PER_NODE=8{tail}" for s in (7, 42)]


def test_mixing_logs_with_and_without_env_is_an_error(env, capsys):
    run_sh = command_env(env.tmp)
    logs = env_logs(env, {7: DEFAULT_ENV}, torch_version="2.x")  # same torch as the old logs' header line
    rc, _, err = cli(capsys, *env.base, "--run-sh", run_sh, "--hardware", "8xH100", "--logs", logs[0], env.logs[0])
    assert_error(rc, err, "env_7.txt", env.logs[0].name, "environment")



# ---------------------------------------------------------------------------------------------------
# Student t


@pytest.mark.parametrize("t,df,expected", [
    (2.015, 5, 0.05), (3.747, 4, 0.01), (6.965, 2, 0.01), (0.0, 10, 0.5), (12.706, 1, 0.025),
    (2.228, 10, 0.025), (2.764, 10, 0.01), (1.697, 30, 0.05), (-2.015, 5, 0.95)])
def test_t_tail_matches_table(t, df, expected):
    assert mr.t_sf(t, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.3, 1.0, 2.5, 10.0, 80.0])
def test_t_tail_closed_forms(t):
    assert mr.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert mr.t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), abs=1e-12)


@pytest.mark.parametrize("df", [3, 7, 19])
@pytest.mark.parametrize("t", [0.5, 1.8, 3.2])
def test_t_tail_numeric_integration(df, t):
    x = np.linspace(t, t + 400.0, 2_000_001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    integral = float(np.sum((pdf[1:] + pdf[:-1]) * np.diff(x)) / 2)  # trapezoid rule on [t, t + 400]
    beyond = math.exp(logc) * df ** ((df + 1) / 2) / df * x[-1] ** -df  # tail past x[-1], pdf ~ c (x^2/df)^-(df+1)/2
    assert beyond < 1e-7
    assert mr.t_sf(t, df) == pytest.approx(integral + beyond, abs=1e-7)


def test_significance_pass_and_fail_through_cli(env, capsys):
    losses = [2.0010, 2.0000, 1.9990]  # mean 2.0, sample std 0.001, n 3, df 2
    # PASS: baseline 2.010 -> target 2.005, t = 0.005 / (0.001/sqrt 3) = 8.660
    rc, out, err = cli(capsys, *env.args, "--logs", *env.logs, "--baseline-loss", "2.010")
    assert rc == 0, err
    t = (2.005 - 2.0) / (0.001 / math.sqrt(3))
    p = 0.5 * (1 - t / math.sqrt(t * t + 2))
    assert p < 0.01 and "PASS" in out and f"p {p:.3g}" in out
    readme = (env.target / "README.md").read_text()
    assert "## Significance" in readme and "**PASS**" in readme and f"t = {t:.4f}, df = 2, p = {p:.3g}" in readme
    # FAIL: baseline 2.006 -> target 2.001, t = 1.732, p ~ 0.11
    rc, out, err = cli(capsys, *env.args, "--logs", *env.logs, "--baseline-loss", "2.006", "--force")
    assert rc == 0, err
    t = (2.001 - 2.0) / (0.001 / math.sqrt(3))
    p = 0.5 * (1 - t / math.sqrt(t * t + 2))
    assert p > 0.05 and "FAIL" in out and f"p {p:.3g}" in out
    assert "**FAIL**" in (env.target / "README.md").read_text()
    sig = mr.significance(losses, 2.006, 0.005)
    assert (sig["df"], sig["passed"]) == (2, False) and sig["p"] == pytest.approx(p, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# --pack


def payload_bytes(wrapper):
    prefix = b'import lzma,base64;exec(lzma.decompress(base64.b85decode(b"'
    assert wrapper.startswith(prefix) and b"\n" not in wrapper
    assert wrapper.endswith(b'"),format=lzma.FORMAT_RAW,filters=[{"id":lzma.FILTER_LZMA2}]))')
    return lzma.decompress(base64.b85decode(wrapper[len(prefix):wrapper.index(b'"', len(prefix))]),
                           format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])


def run_py(path, **env):
    r = subprocess.run([sys.executable, str(path)], env={**os.environ, **env}, capture_output=True, text=True,
                       cwd=path.parent, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_pack_wrapper_roundtrips_and_behaves_like_original(env, capsys):
    rc, out, err = cli(capsys, *env.args, "--logs", *env.logs, "--pack")
    assert rc == 0, err
    wrapper_path = env.target / "train_gpt.py"
    wrapper = wrapper_path.read_bytes()
    assert payload_bytes(wrapper) == env.code
    assert (env.target / "train_gpt.unpacked.py").read_bytes() == env.code
    bad = run_py(wrapper_path, CRAWLER_LOOPS="not_a_number")
    assert bad == run_py(env.script, CRAWLER_LOOPS="not_a_number")
    assert bad[0] == 2 and bad[2] == "error: CRAWLER_LOOPS='not_a_number' is not a valid int\n"
    # exec runs in the wrapper's globals: __name__ is __main__ and __file__ (the measured code) is the wrapper
    assert run_py(wrapper_path, CRAWLER_LOOPS="3")[1] == f"code_bytes {len(wrapper)} name __main__\n"
    sub = json.loads((env.target / "submission.json").read_text())
    assert sub["bytes_code"] == len(wrapper)
    assert sub["bytes_total"] == 15_900_123 + len(wrapper)  # max over seeds of artifact - code + packed
    assert "train_gpt.unpacked.py" in (env.target / "README.md").read_text()


def test_pack_accepts_logs_of_the_packed_copy(env, capsys):
    """A run of the packed train_gpt.py logs the wrapper's hash and size; --pack accepts it, plain mode not."""
    wrapper = mr.pack(env.code)
    log = write_log(env.tmp / "packed_run.txt", final_record(9, 2.0, 1.2, 15_000_000, wrapper))
    rc, _, err = cli(capsys, *env.args, "--logs", log)
    assert_error(rc, err, "packed_run.txt", "the script differs")
    rc, _, err = cli(capsys, *env.args, "--logs", log, env.logs[0], "--pack")
    assert rc == 0, err
    assert json.loads((env.target / "submission.json").read_text())["bytes_total"] == 15_800_000 + len(wrapper)


def test_pack_refuses_wrapper_that_behaves_differently(env, capsys):
    # An uncaught exception's traceback names the file and source line, which exec'd code cannot reproduce.
    env.script.write_text('import os\nif os.environ.get("CRAWLER_LOOPS"):\n    raise ValueError("bad")\n')
    code = env.script.read_bytes()
    log = write_log(env.tmp / "t.txt", final_record(1, 2.0, 1.2, 15_000_000, code))
    rc, _, err = cli(capsys, *env.args, "--logs", log, "--pack")
    assert_error(rc, err, "behaves differently")
    assert not env.out_root.exists() or not any(env.out_root.iterdir())


def test_pack_real_train_gpt():
    code = (REPO / "train_gpt.py").read_bytes()
    wrapper = mr.pack(code)
    assert payload_bytes(wrapper) == code and len(wrapper) < len(code) * 0.6
    rc, err = mr.check_same_behaviour(code, wrapper)
    assert rc == 2 and err == "error: CRAWLER_LOOPS='not_a_number' is not a valid int\n"
