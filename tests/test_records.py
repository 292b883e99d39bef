"""Every frozen record under records/ reruns from its own folder (CPU): its script is the exact bytes its logs
ran, and its README's reproduce command, pointed at the SMOKE corpus instead of the run's shards and cut to a few
steps, trains, exports and scores with the folder's own run.sh, presets and data scripts."""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO

RECORDS = sorted(p.parent for p in (REPO / "records").glob("*/*/submission.json"))
SHORT = dict(SMOKE="1", ITERATIONS="6", MAX_WALLCLOCK_SECONDS="0", TTT="off", RUN_ID="rerun",  # a few steps,
             GPTQ_CALIB_TOKENS="4096")  # and a quarter of SMOKE's calibration: loop GPTQ took 53 of the 92 s
DATA_VARS = ("DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE")  # where the run's shards were: SMOKE's corpus instead


def reproduce_commands(readme):
    """The commands of the README's Reproduce block: [(variables, argv)] per line."""
    block = readme.split("## Reproduce")[1].split("```bash\n")[1].split("```")[0]
    commands = []
    for line in block.splitlines():
        words = shlex.split(line)
        n = next(i for i, w in enumerate(words) if not re.match(r"^\w+=", w))
        commands.append((dict(w.split("=", 1) for w in words[:n]), words[n:]))
    return commands


def test_the_repository_holds_a_record():
    assert RECORDS


@pytest.mark.parametrize("folder", RECORDS, ids=lambda p: p.name)
def test_record_script_is_what_its_logs_ran(folder):
    code = (folder / "train_gpt.unpacked.py") if (folder / "train_gpt.unpacked.py").exists() else folder / "train_gpt.py"
    sha = hashlib.sha256(code.read_bytes()).hexdigest()
    logs = sorted(folder.glob("train_seed*.log"))
    finals = [json.loads(line) for log in logs for line in log.read_text().splitlines() if line.startswith('{"event": "final"')]
    assert logs and len(finals) == len(logs) and {f["code_sha256"] for f in finals} == {sha}
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == sorted(f["seed"] for f in finals)


@pytest.mark.parametrize("folder", RECORDS, ids=lambda p: p.name)
def test_record_reruns_from_its_folder(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / folder.name)
    (variables, argv), *_ = reproduce_commands((copy / "README.md").read_text())
    assert argv[:2] == ["bash", "run.sh"], argv
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: v for k, v in variables.items() if k not in DATA_VARS}, **SHORT)
    proc = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (copy / "logs/rerun.txt").read_text()
    final = json.loads(next(line for line in log.splitlines() if line.startswith('{"event": "final"')))
    assert final["steps"] == 6 and final["roundtrip_val_bpb"] > 0 and final["env"]["SEED"] == variables["SEED"]
    recorded = json.loads((folder / "submission.json").read_text())
    assert final["config"]["num_flat_layers"] == json.loads(
        next(line for line in (folder / f"train_seed{variables['SEED']}.log").read_text().splitlines()
             if line.startswith('{"event": "final"')))["config"]["num_flat_layers"], recorded["name"]
