"""CPU tests for data/cached_challenge_fineweb.py against a fake, local HF hub (no network)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "cached_challenge_fineweb.py"
DS = "datasets/fineweb10B_sp1024"


def load_module():
    spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_shard(path: Path, tokens: np.ndarray, magic: int = 20240520) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, 1, len(tokens)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def build_hub(root: Path) -> Path:
    """A folder laid out like the hub repo: <root>/datasets/{manifest.json,datasets/...,tokenizers/...}."""
    base = root / "datasets"
    write_shard(base / DS / "fineweb_val_000000.bin", np.arange(10))
    write_shard(base / DS / "fineweb_train_000000.bin", np.arange(20) * 3)
    write_shard(base / DS / "fineweb_train_000001.bin", np.arange(30) + 1000)
    (base / "tokenizers").mkdir(parents=True)
    (base / "tokenizers/fineweb_1024_bpe.model").write_bytes(b"\x00fake sentencepiece model\xff")
    (base / "tokenizers/fineweb_1024_bpe.vocab").write_text("<unk>\t0\n")
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 2, "files_val": 1, "tokens_train": 50}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


# A stand-in for huggingface_hub.hf_hub_download: serves <hub>/<filename> through a
# symlink in a separate fake cache (as the real one does: snapshots/... -> blobs/...).
FAKE_HF = '''
import os, shutil
from pathlib import Path
calls = []
def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, cache_dir=None, **kwargs):
    assert repo_type == "dataset", repo_type
    calls.append((repo_id, filename))
    src = Path(HUB) / filename
    if not src.is_file():
        raise FileNotFoundError(f"404 Client Error: entry not found: {filename}")
    blob = Path(CACHE) / "blobs" / f"{len(calls)}-{src.name}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, blob)
    link = Path(CACHE) / "snapshots" / repo_id / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(blob)
    return str(link)
'''


def serve(hub, tmp_path, monkeypatch):
    """(module, hub_root, out_dir, calls): main() downloads from the fake hub at `hub` into out_dir."""
    ns = {"HUB": str(hub), "CACHE": str(tmp_path / "cache")}
    exec(FAKE_HF, ns)
    mod = load_module()
    monkeypatch.setattr(mod, "hf_hub_download", ns["hf_hub_download"])
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    return mod, hub, tmp_path / "out", ns["calls"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    return serve(build_hub(tmp_path / "hub"), tmp_path, monkeypatch)


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if ".tmp" in p.name]


def test_full_download_lands_identical_files(env, capsys):
    mod, hub, out, calls = env
    assert mod.main(["--train-shards", "2", "--out", str(out)]) == 0
    expected = ["manifest.json", f"{DS}/fineweb_val_000000.bin", f"{DS}/fineweb_train_000000.bin",
                f"{DS}/fineweb_train_000001.bin", "tokenizers/fineweb_1024_bpe.model",
                "tokenizers/fineweb_1024_bpe.vocab"]
    for rel in expected:
        local = out / rel
        assert local.is_file() and not local.is_symlink(), rel
        assert local.read_bytes() == (hub / "datasets" / rel).read_bytes(), rel
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(expected)
    assert [f for _, f in calls] == [f"datasets/{rel}" for rel in expected]
    assert {r for r, _ in calls} == {"willdepueoai/parameter-golf"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(expected) + 1 and all(l.startswith("downloaded") for l in lines[:-1])
    assert "60 tokens" in lines[-1]  # 10 val + 20 + 30 train
    assert f"DATA_PATH={out / DS}" in lines[-1]
    assert f"TOKENIZER_PATH={out / 'tokenizers/fineweb_1024_bpe.model'}" in lines[-1]


def test_train_shards_limits_download_and_rerun_downloads_nothing(env, capsys):
    mod, hub, out, calls = env
    assert mod.main(["--train-shards", "1", "--out", str(out)]) == 0
    assert (out / DS / "fineweb_train_000000.bin").is_file()
    assert not (out / DS / "fineweb_train_000001.bin").exists()
    assert not any("train_000001" in f for _, f in calls)
    capsys.readouterr()
    calls.clear()
    assert mod.main(["--train-shards", "1", "--out", str(out)]) == 0
    assert [f for _, f in calls] == ["datasets/manifest.json"]  # only the manifest is refreshed
    assert capsys.readouterr().out.count("present") == 4


def test_invalid_local_shard_is_downloaded_again(env):
    mod, hub, out, calls = env
    assert mod.main(["--train-shards", "1", "--out", str(out)]) == 0
    shard = out / DS / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # e.g. a copy interrupted by an older tool
    calls.clear()
    assert mod.main(["--train-shards", "1", "--out", str(out)]) == 0
    assert [f for _, f in calls] == ["datasets/manifest.json", f"datasets/{DS}/fineweb_train_000000.bin"]
    assert shard.read_bytes() == (hub / "datasets" / DS / "fineweb_train_000000.bin").read_bytes()


def test_too_many_train_shards_names_the_limit(env, capsys):
    mod, hub, out, calls = env
    assert mod.main(["--train-shards", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--train-shards 3" in err and "has 2 train shards" in err
    assert not (out / "datasets").exists()


@pytest.mark.parametrize("corruption", ["bad_magic", "truncated"])
def test_corrupt_hub_shard_fails_and_leaves_nothing(env, capsys, corruption):
    mod, hub, out, calls = env
    bad = hub / "datasets" / DS / "fineweb_train_000001.bin"
    if corruption == "bad_magic":
        write_shard(bad, np.arange(30), magic=12345)
    else:
        bad.write_bytes(bad.read_bytes()[:-7])
    assert mod.main(["--train-shards", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin" in err and "corrupt" in err
    assert not (out / DS / "fineweb_train_000001.bin").exists()
    assert (out / DS / "fineweb_train_000000.bin").is_file()  # earlier good shards are kept
    assert leftovers(out) == []


def test_missing_variant_fails_clearly(env, capsys):
    mod, hub, out, calls = env
    assert mod.main(["--variant", "sp4096", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "'sp4096' is not in the manifest" in err and "available: sp1024" in err


def test_network_failure_is_one_clear_line(env, capsys):
    mod, hub, out, calls = env
    (hub / "datasets" / "tokenizers/fineweb_1024_bpe.vocab").unlink()
    assert mod.main(["--train-shards", "0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizers/fineweb_1024_bpe.vocab" in err and "404" in err
    assert not (out / "tokenizers/fineweb_1024_bpe.vocab").exists()


def test_repo_and_root_defaults(env, monkeypatch, capsys):
    mod, hub, out, calls = env
    mod.main(["--variant", "sp8192", "--out", str(out)])
    assert calls[-1] == ("kevclark/parameter-golf", "datasets/manifest.json")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/golf")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "v2/")
    mod.main(["--variant", "sp8192", "--out", str(out)])
    assert calls[-1] == ("me/golf", "v2/manifest.json")


def run_script(tmp_path, package_src: str, *args):
    """Run the script as a subprocess with a fake `huggingface_hub` package on PYTHONPATH."""
    pkg = tmp_path / "site" / "huggingface_hub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(package_src)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("MATCHED_FINEWEB_REPO_ID", None)
    env.pop("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)


def test_subprocess_exit_code_and_one_line_error(tmp_path):
    hub = build_hub(tmp_path / "hub")
    src = f"HUB = {str(hub)!r}\nCACHE = {str(tmp_path / 'cache')!r}\n" + FAKE_HF
    r = run_script(tmp_path, src, "--train-shards", "5", "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --train-shards 5") and "has 2 train shards" in r.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()  # the manifest came through the real lazy import


def test_subprocess_without_huggingface_hub(tmp_path):
    r = run_script(tmp_path, "raise ImportError('not installed')\n", "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "pip install huggingface_hub" in r.stderr


CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_DS = f"datasets/{CASEOPS}"
CASEOPS_TOK = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def build_caseops_hub(root: Path) -> Path:
    """Upstream's CaseOps repo as it is laid out: two val shards, each with its byte sidecar."""
    base = root / "datasets"
    for i, n in enumerate([12, 5]):
        write_shard(base / CASEOPS_DS / f"fineweb_val_{i:06d}.bin", np.arange(n) + 4)
        write_shard(base / CASEOPS_DS / f"fineweb_val_bytes_{i:06d}.bin", np.arange(n) % 4)
    write_shard(base / CASEOPS_DS / "fineweb_train_000000.bin", np.arange(40))
    write_shard(base / CASEOPS_DS / "fineweb_train_000001.bin", np.arange(40))
    (base / "tokenizers").mkdir(parents=True)
    (base / f"{CASEOPS_TOK}.model").write_bytes(b"\x00fake caseops model\xff")
    (base / f"{CASEOPS_TOK}.vocab").write_text("<pad>\t0\n")
    tok_name = "sp_bpe_8192_lossless_caps_caseops_v1_reserved"
    manifest = {
        "datasets": [{"name": CASEOPS, "tokenizer_name": tok_name,
                      "val_bytes_glob": f"{CASEOPS_DS}/fineweb_val_bytes_*.bin",
                      "stats": {"files_train": 2, "files_val": 2}}],
        "tokenizers": [{"name": tok_name, "text_transform": "lossless_caps_caseops_v1",
                        "model_path": f"{CASEOPS_TOK}.model", "vocab_path": f"{CASEOPS_TOK}.vocab"}],
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def caseops_env(tmp_path, monkeypatch):
    """Like env, with the fake hub serving the CaseOps repo."""
    return serve(build_caseops_hub(tmp_path / "hub"), tmp_path, monkeypatch)


@pytest.mark.parametrize("variant", ["sp8192_caseops", "sp8192_lossless_caps_caseops_v1_reserved"])
def test_caseops_variant_fetches_shards_sidecars_and_tokenizer(caseops_env, capsys, variant):
    mod, hub, out, calls = caseops_env
    assert mod.main(["--variant", variant, "--train-shards", "1", "--out", str(out)]) == 0
    expected = ["manifest.json", f"{CASEOPS_DS}/fineweb_val_000000.bin", f"{CASEOPS_DS}/fineweb_val_000001.bin",
                f"{CASEOPS_DS}/fineweb_train_000000.bin", f"{CASEOPS_DS}/fineweb_val_bytes_000000.bin",
                f"{CASEOPS_DS}/fineweb_val_bytes_000001.bin", f"{CASEOPS_TOK}.model", f"{CASEOPS_TOK}.vocab"]
    assert calls == [("romeerp/parameter-golf-caseops-v1", f"datasets/{rel}") for rel in expected]
    for rel in expected:
        assert (out / rel).read_bytes() == (hub / "datasets" / rel).read_bytes(), rel
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(expected)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 val byte sidecars" in last and "57 tokens" in last  # 12 + 5 val + 40 train
    assert f"DATA_PATH={out / CASEOPS_DS}" in last and f"TOKENIZER_PATH={out / CASEOPS_TOK}.model" in last


def test_plain_variants_fetch_no_sidecars(env):
    mod, hub, out, calls = env
    assert mod.main(["--train-shards", "0", "--out", str(out)]) == 0
    assert not any("bytes" in f for _, f in calls)


@pytest.mark.parametrize("case", ["missing", "wrong_count"])
def test_caseops_sidecar_missing_or_misaligned_fails(caseops_env, capsys, case):
    mod, hub, out, calls = caseops_env
    sidecar = hub / "datasets" / CASEOPS_DS / "fineweb_val_bytes_000001.bin"
    if case == "missing":
        sidecar.unlink()
    else:
        write_shard(sidecar, np.arange(6))  # one value more than the val shard has tokens
    assert mod.main(["--variant", "sp8192_caseops", "--train-shards", "0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fineweb_val_bytes_000001.bin" in err
    assert ("404" in err) if case == "missing" else ("has 6 values" in err and "has 5 tokens" in err)


def test_stale_local_sidecar_is_fetched_again(caseops_env):
    mod, hub, out, calls = caseops_env
    args = ["--variant", "sp8192_caseops", "--train-shards", "0", "--out", str(out)]
    assert mod.main(args) == 0
    local = out / CASEOPS_DS / "fineweb_val_bytes_000001.bin"
    write_shard(local, np.arange(9))  # well-formed, but from another export: 9 values for 5 tokens
    calls.clear()
    assert mod.main(args) == 0
    assert [f for _, f in calls] == ["datasets/manifest.json", f"datasets/{CASEOPS_DS}/fineweb_val_bytes_000001.bin"]
    assert local.read_bytes() == (hub / "datasets" / CASEOPS_DS / local.name).read_bytes()
