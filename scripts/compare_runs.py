"""Compare train_gpt.py runs: one table, a row per run log, and optional plots.

    python3 scripts/compare_runs.py logs/*.txt
    python3 scripts/compare_runs.py logs/a.txt logs/b.txt --plots plots/

Reads logs/<RUN_ID>.txt as train_gpt.py writes it. The numbers come from the final JSON line where there is
one; a log without it (a crashed, interrupted or still running run) gives a row from its step and eval lines,
marked `unfinished`. Columns: steps, mean ms/step, tokens/s, prequant / roundtrip / sliding / TTT val_bpb,
artifact bytes (code + model), bits per weight, and when training data was last read (s) of the wall-clock
budget. Missing values print as `-`. With --plots DIR (needs matplotlib) it writes train_loss_vs_step.png,
train_loss_vs_seconds.png (a curve per run; seconds = step x mean ms/step) and val_bpb.png.
Exit code 2, with one line on stderr, when a file is missing or is not a train_gpt.py log.
"""
import argparse
import json
import re
import sys
from pathlib import Path

HEADER = re.compile(r"^run (\S+) \| torch ")
STEP = re.compile(r"^step (\d+) train_loss (\S+) lr \S+ (\S+)ms/step (?:\(now \S+\) )?([\d,]+) tok/s$")
TRAINING = re.compile(r"^training: (\d+) steps in \S+s \((\S+) ms/step\)")
DATA_READ = re.compile(r"training data last read at (\S+)s of the (\S+)s budget")
EVAL = re.compile(r"^(prequant|roundtrip|sliding window|score-first TTT)[^:]*: val_loss \S+ val_bpb (\S+)")
ARTIFACT = re.compile(r"^artifact: .* = ([\d,]+) bytes; (\S+) bits per weight$")
EVAL_KEYS = {"prequant": "prequant", "roundtrip": "roundtrip", "sliding window": "sliding", "score-first TTT": "ttt"}
SCORES = ("prequant", "roundtrip", "sliding", "ttt")


class NotALog(Exception):
    pass


def parse_log(text, name="log"):
    """A run log's text -> dict: run_id, finished, steps, step_ms, tokens_per_s, {score}_val_bpb, artifact_bytes,
    bits_per_weight, data_read_s, budget_s (None where absent) and curve [(step, train_loss, mean ms/step)].
    Raises NotALog when the text has no header, step line or final JSON line of train_gpt.py."""
    run = dict(run_id=None, finished=False, steps=None, step_ms=None, tokens_per_s=None, artifact_bytes=None,
               bits_per_weight=None, data_read_s=None, budget_s=None, curve=[], **{f"{k}_val_bpb": None for k in SCORES})
    final = None
    for line in text.splitlines():
        if m := HEADER.match(line):
            run["run_id"] = m[1]
        elif m := STEP.match(line):
            step, loss, ms, tok = int(m[1]), float(m[2]), float(m[3]), float(m[4].replace(",", ""))
            run["curve"].append((step, loss, ms))
            run.update(steps=step, step_ms=ms, tokens_per_s=tok)
        elif m := TRAINING.match(line):
            run.update(steps=int(m[1]), step_ms=float(m[2]))
        elif m := EVAL.match(line):
            run[f"{EVAL_KEYS[m[1]]}_val_bpb"] = float(m[2])
        elif m := ARTIFACT.match(line):
            run.update(artifact_bytes=int(m[1].replace(",", "")), bits_per_weight=float(m[2]))
        elif line.startswith('{"event": "final"'):
            try:
                final = json.loads(line)
            except json.JSONDecodeError:  # a final line still being written
                pass
        if m := DATA_READ.search(line):
            run.update(data_read_s=float(m[1]), budget_s=float(m[2]))
    if final is None and run["run_id"] is None and not run["curve"]:
        raise NotALog(f"{name}: not a train_gpt.py log (no 'run ... | torch' header, step line or final JSON line)")
    if final is not None:
        run["finished"] = True
        run["run_id"] = final.get("config", {}).get("run_id") or run["run_id"]
        for key, src in (("steps", "steps"), ("step_ms", "step_avg_ms"), ("tokens_per_s", "tokens_per_s"),
                         ("artifact_bytes", "artifact_bytes"), ("bits_per_weight", "bits_per_weight"),
                         *((f"{k}_val_bpb",) * 2 for k in SCORES)):
            if final.get(src) is not None:
                run[key] = final[src]
    run["run_id"] = run["run_id"] or Path(name).stem
    return run


def read_run(path):
    """parse_log of a file; NotALog (naming the file) when it is missing, unreadable or not a log."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NotALog(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else 'not UTF-8 text'})")
    return parse_log(text, str(path))


COLUMNS = ("run", "steps", "ms/step", "tok/s", "prequant bpb", "roundtrip bpb", "sliding bpb", "ttt bpb",
           "artifact bytes", "bits/weight", "data last read/budget s", "status")


def row(run):
    """The table cells of one run (strings; `-` where missing)."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    read = "-" if run["data_read_s"] is None else f"{run['data_read_s']:.1f}/{run['budget_s']:.0f}"
    return [run["run_id"], fmt(run["steps"], "d"), fmt(run["step_ms"], ".1f"), fmt(run["tokens_per_s"], ",.0f"),
            *(fmt(run[f"{k}_val_bpb"], ".5f") for k in SCORES), fmt(run["artifact_bytes"], ",d"),
            fmt(run["bits_per_weight"], ".3f"), read, "done" if run["finished"] else "unfinished"]


def table(runs):
    """The comparison table as text: a header, a rule, a row per run."""
    rows = [list(COLUMNS)] + [row(r) for r in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def loss_figure(runs, seconds=False):
    """A matplotlib Figure: train loss per logged step (or vs seconds = step x mean ms/step), a line per run."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for run in runs:
        xs = [s * ms / 1000 if seconds else s for s, _, ms in run["curve"]]
        ax.plot(xs, [loss for _, loss, _ in run["curve"]], marker=".", label=run["run_id"])
    ax.set(xlabel="seconds (step x mean ms/step)" if seconds else "step", ylabel="train loss",
           title="train loss vs " + ("seconds" if seconds else "step"))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def bpb_figure(runs):
    """A matplotlib Figure: grouped bars, a group per run, a bar per val_bpb score it has."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6, 1.5 * len(runs) + 3), 5))
    ax = fig.add_subplot()
    width = 0.8 / len(SCORES)
    for j, key in enumerate(SCORES):
        points = [(i, r[f"{key}_val_bpb"]) for i, r in enumerate(runs) if r[f"{key}_val_bpb"] is not None]
        if points:
            bars = ax.bar([i + (j - 1.5) * width for i, _ in points], [v for _, v in points], width, label=key)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    values = [r[f"{k}_val_bpb"] for r in runs for k in SCORES if r[f"{k}_val_bpb"] is not None]
    if values:  # zoom in: the scores differ in the 2nd-3rd decimal
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.1 * (hi - lo + 0.01), hi + 0.25 * (hi - lo + 0.01))
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_xticks(range(len(runs)), [r["run_id"] for r in runs])
    ax.set(ylabel="val_bpb (lower is better)", title="val_bpb per run")
    return fig


def write_plots(runs, folder):
    """Writes the three PNGs into folder; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"train_loss_vs_step.png": loss_figure(runs), "train_loss_vs_seconds.png": loss_figure(runs, True),
               "val_bpb.png": bpb_figure(runs)}
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
    return [folder / name for name in figures]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+", help="run logs, logs/<RUN_ID>.txt")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.logs]
    except NotALog as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    print(table(runs))
    if args.plots:
        try:
            paths = write_plots(runs, args.plots)
        except ImportError:
            print("compare_runs: --plots needs matplotlib (python3 -m pip install matplotlib)", file=sys.stderr)
            return 2
        print("plots: " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
