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
    """Fake script, run.sh and three logs of it; returns a namespace of paths and the base CLI args."""
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
    args = ["--name", "crawler_test", "--author", "Ada Lovelace", "--github-id", "ada", "--script", str(script),
            "--run-sh", str(run_sh), "--date", "2026-03-01", "--out-root", str(out_root), "--hardware", "8xH100 SXM"]
    target = out_root / "2026-03-01_crawler_test"
    return type("Env", (), dict(tmp=tmp_path, script=script, code=code, run_sh=run_sh, runs=runs, logs=logs,
                                args=args, target=target, out_root=out_root))


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
    assert sub["val_bpb_per_seed"] == {"7": 1.18390, "42": 1.18450, "1337": 1.18510}
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
