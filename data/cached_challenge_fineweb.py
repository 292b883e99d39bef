"""Download the pre-tokenized FineWeb challenge shards and their tokenizer.

Fetches, from a Hugging Face dataset repo, the manifest, all validation shards,
the first N training shards and the SentencePiece tokenizer files of one
variant, and lays them out under the output folder (default: this `data/` dir):

    data/manifest.json
    data/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    data/tokenizers/<tokenizer files>

Usage:
    python3 data/cached_challenge_fineweb.py --variant sp1024 [--train-shards 80]
        [--repo-id ID] [--remote-root PREFIX] [--out DIR]

--variant sp8192_caseops (short for sp8192_lossless_caps_caseops_v1_reserved) fetches upstream's
CaseOps export (see data/caseops.py) from romeerp/parameter-golf-caseops-v1: its shards, its
tokenizer and the byte sidecars fineweb_val_bytes_NNNNNN.bin, one per val shard, which val_bpb
needs because the tokens spell the case-transformed text, not the original.

Files already present with a valid shard header / size are skipped, so a rerun
only fetches what is missing. Requires `pip install huggingface_hub`.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
DEFAULT_REPO = "willdepueoai/parameter-golf"
CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"
ALIASES = {"sp8192_caseops": CASEOPS}
# The sp8192 export is only published in this repo, and CaseOps only in its author's.
REPO_BY_VARIANT = {"sp8192": "kevclark/parameter-golf", CASEOPS: "romeerp/parameter-golf-caseops-v1"}


class DownloadError(Exception):
    """An expected failure: reported as one line on stderr, no traceback."""


def hf_hub_download(**kwargs) -> str:
    # Imported lazily so --help and the tests work without huggingface_hub.
    try:
        from huggingface_hub import hf_hub_download as download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed; run: pip install huggingface_hub") from None
    return download(**kwargs)


def shard_tokens(path: Path) -> int | None:
    """Token count of a well-formed shard, or None if the header/size is wrong."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError:
        return None
    if len(header) < HEADER_BYTES:
        return None
    magic, version, count = (int.from_bytes(header[i:i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != SHARD_MAGIC or version != SHARD_VERSION or count < 0 or size != HEADER_BYTES + 2 * count:
        return None
    return count


def fetch(repo_id: str, remote_root: str, rel: str, out: Path, refresh: bool = False) -> Path:
    """Make `out/rel` a complete copy of `<remote_root>/rel` from the hub."""
    dest = out / rel
    is_shard = dest.suffix == ".bin"
    present = shard_tokens(dest) is not None if is_shard else dest.is_file() and dest.stat().st_size > 0
    if present and not refresh:
        print(f"present     {rel}")
        return dest
    remote = f"{remote_root}/{rel}" if remote_root else rel
    try:
        cached = hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=remote)
    except DownloadError:
        raise
    except Exception as e:  # network, auth, missing file: all reported the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DownloadError(f"could not download {remote} from dataset {repo_id} ({type(e).__name__}: {msg}); "
                            "check the network, --repo-id/--remote-root, or HF_TOKEN") from None
    # The HF cache entry is usually a symlink into blobs/: link or copy the real
    # file to a temp name, check it, then rename, so the final name only ever
    # holds a complete file.
    real = os.path.realpath(cached)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(real, tmp)  # no second copy of multi-GB data when on the same filesystem
        except OSError:
            shutil.copyfile(real, tmp)
        if is_shard and shard_tokens(tmp) is None:
            raise DownloadError(f"downloaded shard {remote} is corrupt (bad header or size); "
                                "delete it from the HF cache (~/.cache/huggingface) and rerun")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"downloaded  {rel} ({dest.stat().st_size / 1e6:.1f} MB)")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="sp1024",
                   help="tokenizer variant: sp1024, sp4096, sp8192 or sp8192_caseops (with val byte sidecars)")
    p.add_argument("--train-shards", type=int, default=80, help="number of training shards to fetch")
    p.add_argument("--repo-id", default=None, help="HF dataset repo (env MATCHED_FINEWEB_REPO_ID)")
    p.add_argument("--remote-root", default=None,
                   help="folder inside the repo (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, default 'datasets')")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="local data folder")
    args = p.parse_args(argv)
    args.variant = ALIASES.get(args.variant, args.variant)
    repo_id = args.repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or REPO_BY_VARIANT.get(args.variant, DEFAULT_REPO)
    root = args.remote_root if args.remote_root is not None else os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
    root = root.strip("/")
    try:
        # The manifest is tiny and authoritative, so always refresh it.
        manifest_path = fetch(repo_id, root, "manifest.json", args.out, refresh=True)
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise DownloadError(f"{manifest_path} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise DownloadError(f"{manifest_path} is not a manifest (expected a JSON object)")
        name = f"fineweb10B_{args.variant}"
        datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
        if name not in datasets:
            known = ", ".join(sorted(n.removeprefix("fineweb10B_") for n in datasets if n)) or "none"
            raise DownloadError(f"variant {args.variant!r} is not in the manifest of {repo_id} (available: {known}); "
                                "pick one of those with --variant or another --repo-id")
        ds = datasets[name]
        try:
            n_train, n_val = int(ds["stats"]["files_train"]), int(ds["stats"]["files_val"])
        except (KeyError, TypeError, ValueError):
            raise DownloadError(f"manifest entry for {name} in {repo_id} has no stats.files_train/files_val") from None
        if not 0 <= args.train_shards <= n_train:
            raise DownloadError(f"--train-shards {args.train_shards} is out of range: {name} has {n_train} "
                                f"train shards; use --train-shards between 0 and {n_train}")
        tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == ds.get("tokenizer_name")), None)
        if tok is None:
            raise DownloadError(f"tokenizer {ds.get('tokenizer_name')!r} of {name} is missing from the manifest of {repo_id}")
        tok_files = [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
        if not tok_files:
            raise DownloadError(f"tokenizer {tok['name']!r} in the manifest of {repo_id} lists no files")

        shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
        shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(args.train_shards)]
        tokens = sum(shard_tokens(fetch(repo_id, root, rel, args.out)) for rel in shards)
        # A case-transformed variant must be scored with the original text's bytes, which only its
        # sidecars hold: without them val_bpb would silently count the transformed text.
        n_sidecars = n_val if "caseops" in name else 0
        sidecars = [f"datasets/{name}/fineweb_val_bytes_{i:06d}.bin" for i in range(n_sidecars)]
        for rel, val in zip(sidecars, shards):
            n, want = shard_tokens(fetch(repo_id, root, rel, args.out)), shard_tokens(args.out / val)
            if n != want:  # maybe left from another export: fetch it again before blaming the hub
                n = shard_tokens(fetch(repo_id, root, rel, args.out, refresh=True))
            if n != want:
                raise DownloadError(f"byte sidecar {rel} has {n:,} values but {val} has {want:,} tokens; "
                                    f"the export in {repo_id} is inconsistent")
        for rel in tok_files:
            fetch(repo_id, root, rel, args.out)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = args.out / (tok.get("model_path") or tok_files[0])
    print(f"done: {name}: {args.train_shards} train + {n_val} val shards"
          + (f" + {len(sidecars)} val byte sidecars" if sidecars else "") + f", {tokens:,} tokens. "
          f"Use DATA_PATH={args.out / 'datasets' / name} TOKENIZER_PATH={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
