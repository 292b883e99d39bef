"""scripts/compare_runs.py on two real tiny runs of train_gpt.py: the table's numbers are the logs' final JSON
values, the plots (files and the figures' data), an unfinished log, and bad input (exit 2, one line)."""
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO, cli, tiny_env

SCRIPT = REPO / "scripts" / "compare_runs.py"
_spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)

PNG = b"\x89PNG\r\n\x1a\n"
STEP_LINE = re.compile(r"^step (\d+) train_loss (\S+) lr \S+ (\S+)ms/step", re.M)


@pytest.fixture(scope="module")
def logs(corpus, tmp_path_factory):
    """Two finished tiny runs that differ: {run id: (log path, final JSON, log text)}. cmp_a: 20 steps under a
    wall-clock cap (so its log says when training data was last read), no sliding eval; cmp_b: 30 steps, another
    MATRIX_LR, no cap, sliding eval."""
    cwd = tmp_path_factory.mktemp("compare")
    runs = {}
    for run_id, extra in (("cmp_a", dict(ITERATIONS=20, TRAIN_LOG_EVERY=5, EVAL_STRIDE=0, MAX_WALLCLOCK_SECONDS=600,
                                         GPTQ_RESERVE_SECONDS=1)),
                          ("cmp_b", dict(ITERATIONS=30, TRAIN_LOG_EVERY=10, MATRIX_LR=0.04, EVAL_STRIDE=64))):
        rc, err, final, log = cli(tiny_env(corpus, RUN_ID=run_id, SAVE_CHECKPOINT=0, **extra), cwd)
        assert rc == 0 and final is not None, err + log[-3000:]
        runs[run_id] = (cwd / "logs" / f"{run_id}.txt", final, log)
    return runs


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def table_rows(stdout):
    """{run id: cells} of the printed table (cells hold no spaces; the header and rule lines are skipped)."""
    lines = stdout.splitlines()
    assert lines[0].startswith("run") and set(lines[1]) == {"-"}
    return {cells[0]: cells for cells in (line.split() for line in lines[2:])}


def test_table_rows_are_the_final_json_values(logs):
    proc = run_script(*(path for path, _, _ in logs.values()))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = table_rows(proc.stdout)
    assert sorted(rows) == ["cmp_a", "cmp_b"]
    for run_id, (_, final, log) in logs.items():
        cells = rows[run_id]
        assert len(cells) == len(cr.COLUMNS)
        assert cells[1] == str(final["steps"]) == str(final["config"]["iterations"])
        assert cells[2] == f"{final['step_avg_ms']:.1f}"
        assert cells[3] == f"{final['tokens_per_s']:,.0f}"
        assert cells[4] == f"{final['prequant_val_bpb']:.5f}"
        assert cells[5] == f"{final['roundtrip_val_bpb']:.5f}"
        assert cells[7] == "-" and "ttt_val_bpb" not in final  # TTT off
        assert cells[8] == f"{final['artifact_bytes']:,}"
        assert cells[9] == f"{final['bits_per_weight']:.3f}"
        assert cells[11] == "done"
    assert rows["cmp_a"][6] == "-" and "sliding_val_bpb" not in logs["cmp_a"][1]
    assert rows["cmp_b"][6] == f"{logs['cmp_b'][1]['sliding_val_bpb']:.5f}"
    read = re.search(r"training data last read at (\S+)s of the (\S+)s budget", logs["cmp_a"][2])
    assert read and read[2] == "600"
    assert rows["cmp_a"][10] == f"{read[1]}/600"
    assert rows["cmp_b"][10] == "-" and "last read" not in logs["cmp_b"][2]


def test_parse_log_curve_and_values(logs):
    path, final, log = logs["cmp_a"]
    run = cr.parse_log(log, str(path))
    assert run["run_id"] == "cmp_a" and run["finished"]
    assert run["steps"] == 20 and run["step_ms"] == final["step_avg_ms"]
    assert run["roundtrip_val_bpb"] == final["roundtrip_val_bpb"] and run["artifact_bytes"] == final["artifact_bytes"]
    assert [s for s, _, _ in run["curve"]] == [1, 2, 3, 4, 5, 10, 15, 20]  # step <= 5, every 5th, the last
    assert run["curve"] == [(int(s), float(loss), float(ms)) for s, loss, ms in STEP_LINE.findall(log)]
    older = re.sub(r" \(now [\d.]+\)", "", log)  # older logs' step lines lack the current step time
    assert older != log and cr.parse_log(older) == run


def test_plots_files_and_figures(logs, tmp_path):
    out = tmp_path / "plots"
    proc = run_script(*(path for path, _, _ in logs.values()), "--plots", out)
    assert proc.returncode == 0, proc.stderr
    for name in ("train_loss_vs_step.png", "train_loss_vs_seconds.png", "val_bpb.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name

    runs = [cr.parse_log(log, str(path)) for path, _, log in logs.values()]
    for seconds in (False, True):
        ax = cr.loss_figure(runs, seconds=seconds).axes[0]
        assert [line.get_label() for line in ax.lines] == ["cmp_a", "cmp_b"]
        for line, (_, _, log) in zip(ax.lines, logs.values()):
            logged = [(int(s), float(loss), float(ms)) for s, loss, ms in STEP_LINE.findall(log)]
            xs = [s * ms / 1000 if seconds else s for s, _, ms in logged]
            assert list(line.get_xdata()) == pytest.approx(xs)
            assert list(line.get_ydata()) == [loss for _, loss, _ in logged]
    assert [s for s, _, _ in runs[1]["curve"]] == [1, 2, 3, 4, 5, 10, 20, 30]

    ax = cr.bpb_figure(runs).axes[0]
    heights = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
    finals = [final for _, final, _ in logs.values()]
    assert heights["roundtrip"] == [f["roundtrip_val_bpb"] for f in finals]
    assert heights["prequant"] == [f["prequant_val_bpb"] for f in finals]
    assert heights["sliding"] == [finals[1]["sliding_val_bpb"]]  # only cmp_b has one
    assert "ttt" not in heights


def test_unfinished_log_gives_a_marked_row(logs, tmp_path):
    _, final, log = logs["cmp_b"]
    lines = log.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("step 10 train_loss")) + 1
    first_half = tmp_path / "half.txt"
    first_half.write_text("".join(lines[:cut]))
    proc = run_script(first_half)
    assert proc.returncode == 0, proc.stderr
    cells = table_rows(proc.stdout)["cmp_b"]
    step10 = STEP_LINE.findall("".join(lines[:cut]))[-1]
    assert cells[1] == "10" and cells[2] == step10[2]
    assert cells[4:10] == ["-"] * 6 and cells[11] == "unfinished"

    cut_final = tmp_path / "cut_final.txt"  # killed while writing the final JSON line: the evals are logged
    cut_final.write_text(log[: log.index('{"event": "final"') + 40])
    run = cr.read_run(cut_final)
    assert not run["finished"] and run["steps"] == 30 and run["artifact_bytes"] == final["artifact_bytes"]
    assert run["roundtrip_val_bpb"] == pytest.approx(final["roundtrip_val_bpb"], abs=1e-5)
    assert cr.row(run)[-1] == "unfinished"


def test_bad_input_exit_2_one_line(logs, tmp_path):
    good = logs["cmp_a"][0]
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\nstep by step\n")
    missing = tmp_path / "missing.txt"
    for bad in (notes, missing):
        proc = run_script(good, bad)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_table_does_not_import_matplotlib(logs):
    code = ("import runpy, sys; sys.argv = ['compare_runs.py', sys.argv[1]]\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'matplotlib' not in sys.modules" % str(SCRIPT))
    proc = subprocess.run([sys.executable, "-c", code, str(logs["cmp_a"][0])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "cmp_a" in proc.stdout, proc.stderr
