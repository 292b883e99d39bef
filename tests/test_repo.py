"""The user-facing surface stays consistent: run.sh defaults equal train_gpt.py's, README documents every
variable and the test command CI runs, and run.sh explains missing data instead of failing obscurely."""
import json
import os
import re
import shutil
import subprocess

import train_gpt as T
from conftest import REPO

README = (REPO / "README.md").read_text()


def declared_vars():
    reader = T.EnvReader({})
    original, T.EnvReader = T.EnvReader, lambda environ: reader
    try:
        T.Hyperparameters({})
    finally:
        T.EnvReader = original
    return reader.names


def test_readme_documents_every_variable():
    names = declared_vars()
    assert len(names) > 40
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, missing


def test_run_sh_defaults_match_script_defaults():
    defaults = dict(re.findall(r'^: "\$\{(\w+):=(.*)\}"', (REPO / "run.sh").read_text(), re.M))
    h = T.Hyperparameters({})
    assert len(defaults) > 20 and defaults["DATA_PATH"] == "./data/datasets/fineweb10B_sp${VOCAB_SIZE}"
    for name, value in defaults.items():
        if name in ("RUN_ID",):
            continue
        value = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], value)
        ours = getattr(h, name.lower())
        parsed = T.Hyperparameters({name: value}) if value else h
        assert getattr(parsed, name.lower()) == ours, (name, value, ours)


def readme_block(heading):
    """The command lines of the first ```bash block after `heading` in README.md (comments dropped)."""
    block = re.search(re.escape(heading) + r".*?```bash\n(.*?)```", README, re.S)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_cpu_commands():
    commands = readme_block("On a CPU-only machine")
    assert commands[0] == "python3 -m pip install torch==2.13.0"  # first: else pip pulls CUDA torch
    # two workers, a file each at a time: module fixtures are built once, and a 2-core box uses both cores
    assert commands[-1] == "python3 -m pytest -q -n 2 --dist loadfile tests"
    assert any("pytest-xdist" in c and "install" in c for c in commands)
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert [line for line in ci if line.startswith("python3 ")] == commands


def test_run_sh_without_data_says_how_to_fetch(tmp_path):
    env = dict(os.environ, DATA_PATH=str(tmp_path / "nothing"))
    proc = subprocess.run(["bash", str(REPO / "run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "python3 data/cached_challenge_fineweb.py --variant sp1024" in proc.stderr
    assert "Traceback" not in proc.stderr
    env = dict(os.environ, VOCAB_SIZE="8192")  # the default paths and the hint follow the vocabulary
    env.pop("DATA_PATH", None)
    proc = subprocess.run(["bash", str(REPO / "run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--variant sp8192" in proc.stderr and "fineweb10B_sp8192" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "record"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--variant sp8192_lossless_caps_caseops_v1_reserved " in proc.stderr  # its data


def test_run_sh_rejects_unknown_preset():
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "nosuch"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no preset 'nosuch'" in proc.stderr and "leg3" in proc.stderr


def test_presets_parse(tmp_path):
    for preset in ("leg3", "nightcrawler", "ouroboros"):
        out = subprocess.run(["bash", "-c", f"set -eua; source presets/{preset}.env; env"], cwd=REPO,
                             capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        h = T.Hyperparameters(env)  # every value parses
        assert h.crawler_loops in (2, 3) and h.xsa_blocks == "crawler"
    out = subprocess.run(["bash", "-c", "set -eua; source presets/record.env; env"], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    h = T.Hyperparameters(dict(line.split("=", 1) for line in out.splitlines() if "=" in line))
    model = T.GPT(h)
    assert len(model.blocks) == 11 and len(model.schedule) == 17 and h.vocab_size == 8192
    # upstream's CaseOps data, where `cached_challenge_fineweb.py --variant sp8192_caseops` puts it
    assert h.data_path == "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert h.tokenizer_path == "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    assert sum(p.numel() for p in model.parameters()) > 35e6  # the record's 36M, plus our BigramHash and control rows
    # scored by phased TTT with the settings measured best, no sliding eval; the export reserve measured
    assert (h.ttt, h.ttt_lora_rank, h.ttt_lora_lr, h.ttt_lora_chunk, h.ttt_lora_wd, h.ttt_lora_beta1, h.ttt_phase_docs,
            h.eval_stride, h.gptq_reserve_seconds) == ("phased", 96, 1.5e-4, 48, 1.0, 0.0, 1500, h.eval_seq_len, 0.0)


def test_smoke_run_end_to_end(tmp_path):
    """SMOKE=1 bash run.sh in a copy of the repo: corpus, tokenizer, shards, tiny crawler, final JSON."""
    work = tmp_path / "repo"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", "logs", "datasets", "tokenizers", "__pycache__"))
    env = dict(os.environ, SMOKE="1", OMP_NUM_THREADS="1", ITERATIONS="60")
    proc = subprocess.run(["bash", "run.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (log,) = (work / "logs").glob("smoke_*.txt")  # a fresh RUN_ID per smoke run: a rerun never reuses its files
    assert re.fullmatch(r"smoke_\d{8}_\d{6}\.txt", log.name)
    final = log.read_text().strip().splitlines()[-1]
    assert final.startswith('{"event": "final"') and '"steps": 60' in final
    # the record preset at smoke sizes: its layout and switches, the smoke width, vocabulary and data
    env.update(ITERATIONS="4", QUANT_METHOD="rtn", EVAL_STRIDE="0", TTT="off", RUN_ID="smoke_record")  # TTT: test_eval
    proc = subprocess.run(["bash", "run.sh", "record"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    final = json.loads((work / "logs/smoke_record.txt").read_text().strip().splitlines()[-1])
    c = final["config"]
    assert (c["model_dim"], c["vocab_size"], c["num_flat_layers"], c["num_encoder_layers"], c["parallel_last_n"],
            c["unet_skips"], c["muon_ns"]) == (64, 512, 8, 3, 3, "executed", "polar")
