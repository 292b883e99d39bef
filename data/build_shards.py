"""Tokenize local documents into the challenge's binary shard format.

Shard format: 256 little-endian int32 header values ([0]=20240520 magic, [1]=1 version,
[2]=token count, rest 0), then the tokens as little-endian uint16. Each document is
BOS + sp.encode(text) (no EOS); documents may run across train-shard boundaries.
Outputs fineweb_val_000000.bin, fineweb_train_000000.bin, ... plus manifest.json; refuses
an --out-dir that already holds shards unless --overwrite (which also drops stale ones).

--caseops applies data/caseops.py's lossless case transform to every document before the
tokenizer is trained and before it encodes (upstream's lossless_caps_caseops_v1), and writes
a byte sidecar fineweb_val_bytes_NNNNNN.bin beside each val shard: the same header and token
count, one uint16 per token giving the original text's UTF-8 bytes of that token (BOS 0), which
is what val_bpb must divide by. The tokenizer must hold the four operators as user-defined
symbols: --train-tokenizer does that with --caseops; a --tokenizer without them is refused.

Inputs: .jsonl (one JSON object per line, text under --text-key), .jsonl.zst (same,
zstd-compressed; needs `zstandard`), .txt (one or more blank, i.e. empty or whitespace-only,
lines separate documents; a document keeps its other lines as they are), or directories
(all such files under them, sorted). The first --val-docs documents (after the optional
--shuffle-seed document shuffle) form the val split; the rest are train.
All documents are held in memory, so this is meant for corpora of up to a few GB.

    # with an existing tokenizer
    python3 data/build_shards.py --inputs docs.jsonl --val-docs 1000 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --out-dir data/datasets/mine
    # train a BPE tokenizer (challenge settings) on the train docs first
    python3 data/stdlib_corpus.py --out /tmp/stdlib.jsonl
    python3 data/build_shards.py --inputs /tmp/stdlib.jsonl --val-docs 50 --shuffle-seed 0 \\
        --train-tokenizer 1024 --tokenizer-out /tmp/sp/stdlib_1024 --out-dir /tmp/shards
    # the same with CaseOps: a caseops tokenizer, shards and val byte sidecars
    python3 data/build_shards.py --inputs /tmp/stdlib.jsonl --val-docs 50 --shuffle-seed 0 --caseops \\
        --train-tokenizer 1024 --tokenizer-out /tmp/sp/stdlib_1024_caseops --out-dir /tmp/shards_caseops
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data/caseops.py, also when loaded by path
import caseops  # noqa: E402

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
SHARD_NAME = re.compile(r"fineweb_(train|val)_[0-9]{6}\.bin")
SIDECAR_NAME = re.compile(r"fineweb_val_bytes_[0-9]{6}\.bin")


class UsageError(Exception):
    """An expected problem: reported as one line, no traceback."""


def input_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise UsageError(f"unsupported input {p}: expected {', '.join(SUFFIXES)} or a directory")
            files.append(p)
        else:
            raise UsageError(f"input not found: {p} (check the --inputs path)")
    return files


def is_shard(name: str, with_sidecars: bool = False) -> bool:
    """Our own shard names, and the byte sidecars when --caseops writes them; otherwise a sidecar
    such as fineweb_val_bytes_000000.bin is the user's (e.g. downloaded upstream) and left alone."""
    return SHARD_NAME.fullmatch(name) is not None or (with_sidecars and SIDECAR_NAME.fullmatch(name) is not None)


def txt_docs(text: str):
    """Blank (empty or whitespace-only) lines separate documents, so one book can give a val split."""
    lines = []
    for line in text.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def read_docs(path: Path, text_key: str):
    if path.name.endswith(".txt"):
        yield from txt_docs(path.read_text(encoding="utf-8"))
        return
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        f = io.TextIOWrapper(raw, encoding="utf-8")
    else:
        f = open(path, encoding="utf-8")
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{path}:{lineno}: not a JSON object with a string {text_key!r} "
                                 "(fix the file or pass --text-key)") from None
            if not isinstance(text, str):
                raise UsageError(f"{path}:{lineno}: {text_key!r} is not a string")
            yield text


def train_sentences(docs: list[str], max_len: int):
    """SentencePiece trains on sentences: yield the documents' non-blank lines that fit."""
    for doc in docs:
        for line in doc.splitlines():
            if line.strip() and len(line.encode("utf-8")) <= max_len:
                yield line


def tokenizer_error(message: str) -> str:
    """SentencePiece's trainer error as one line, its advice given in our flag's terms."""
    line = (message.strip().splitlines() or ["unknown error"])[-1]
    text = re.sub(r"^\w+: \S+\(\d+\) \[[^\]]*\] ", "", line).strip() or line  # drop status, source, check
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return f"Vocabulary size too high ({m[1]}): use --train-tokenizer {m[2]} or less, or add more text"
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text):
        return (f"Vocabulary size is smaller than required_chars ({m[1]} vs {m[2]}): use a larger "
                f"--train-tokenizer (at least {m[2]}: 256 byte-fallback pieces, 4 specials, the text's characters)")
    return f"{text} (SentencePiece's message; check the input text and the --train-tokenizer vocab)"


def train_tokenizer(docs, vocab_size: int, prefix: str, max_sentences: int, seed: int,
                    use_caseops: bool = False, normalization: str = "nmt_nfkc") -> str:
    import sentencepiece as spm

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)  # makes the sentence sampling reproducible
    max_len = 4192
    # CaseOps follows upstream's recipe: the operators as user-defined symbols (ids 4-7, never merged
    # into other pieces), coverage 0.999, and a vocab that may come out below the target.
    extra = (dict(user_defined_symbols=list(caseops.OPERATORS), character_coverage=0.999, hard_vocab_limit=False)
             if use_caseops else dict(character_coverage=0.9995))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=train_sentences(docs, max_len), model_prefix=prefix,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
            normalization_rule_name=normalization, add_dummy_prefix=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, max_sentence_length=max_len,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=1,
            minloglevel=2, **extra)
    except RuntimeError as e:
        raise UsageError(f"tokenizer training failed: {tokenizer_error(str(e))}") from None
    return prefix + ".model"


class ShardWriter:
    """Packs token streams into fixed-size shards named fineweb_{split}_{i:06d}.bin (split "val_bytes"
    for the CaseOps sidecars: fed the same lengths as the val writer, it cuts at the same places)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.buf = out_dir, split, np.empty(shard_tokens, dtype="<u2")
        self.fill, self.files, self.tokens = 0, [], 0

    def add(self, toks: np.ndarray) -> None:
        while len(toks):
            n = min(len(toks), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = toks[:n]
            self.fill, toks, self.tokens = self.fill + n, toks[n:], self.tokens + n
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = MAGIC, VERSION, self.fill
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(self.buf[:self.fill].tobytes())
        os.replace(tmp, path)
        self.files.append(path.name)
        self.fill = 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--inputs", nargs="+", required=True,
                    help=".jsonl/.jsonl.zst files, .txt files (blank lines separate documents) or dirs")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--val-docs", type=int, required=True, help="first N docs go to val")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle documents before the split")
    ap.add_argument("--train-docs", type=int, default=None,
                    help="keep only the first N train documents (the tokenizer is trained on those too)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="existing SentencePiece .model")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a BPE model first")
    ap.add_argument("--tokenizer-out", metavar="PREFIX", help="writes PREFIX.model/.vocab")
    ap.add_argument("--tokenizer-sentences", type=int, default=2_000_000, help="training sentence cap")
    ap.add_argument("--tokenizer-seed", type=int, default=1337)
    ap.add_argument("--normalization", choices=("nmt_nfkc", "identity"), default="nmt_nfkc",
                    help="of a trained tokenizer: nmt_nfkc (the sp1024 recipe: NFKC, line breaks become spaces) "
                         "or identity (the sp8192 model's: text kept as it is, runs of spaces collapsed)")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in --out-dir")
    ap.add_argument("--caseops", action="store_true",
                    help="lossless case transform before tokenizing, plus val byte sidecars (see above)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    if args.train_tokenizer is not None and not args.tokenizer_out:
        raise UsageError("--train-tokenizer needs --tokenizer-out PREFIX (where to write the model)")
    if args.train_tokenizer is not None and args.train_tokenizer > 2**16:
        raise UsageError(f"vocab {args.train_tokenizer} does not fit uint16 shards: use at most 65536")
    if args.val_docs < 0 or args.shard_tokens <= 0 or (args.train_docs is not None and args.train_docs < 1):
        raise UsageError("--val-docs must be >= 0, --shard-tokens and --train-docs > 0")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UsageError(f"tokenizer not found: {args.tokenizer} (check --tokenizer)")
    out_dir = Path(args.out_dir)
    old = sorted(p for p in out_dir.glob("fineweb_*.bin") if is_shard(p.name, args.caseops)) if out_dir.is_dir() else []
    if old and not args.overwrite:
        raise UsageError(f"{out_dir} already holds {len(old)} shards: pass --overwrite or pick an empty --out-dir")
    files = input_files(args.inputs)
    docs = [d for f in files for d in read_docs(f, args.text_key) if d.strip()]
    if not docs:
        raise UsageError(f"no documents found in {' '.join(args.inputs)} ({', '.join(SUFFIXES)} files)")
    if args.val_docs >= len(docs):
        raise UsageError(f"--val-docs {args.val_docs} needs more documents than that, found {len(docs)}: "
                         "lower --val-docs or add inputs")
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(docs)
    splits = {"val": docs[:args.val_docs], "train": docs[args.val_docs:][:args.train_docs]}

    model = args.tokenizer
    transform = caseops.encode if args.caseops else (lambda text: text)
    if args.train_tokenizer is not None:  # train docs only: val must stay unseen
        model = train_tokenizer(map(transform, splits["train"]), args.train_tokenizer, args.tokenizer_out,
                                args.tokenizer_sentences, args.tokenizer_seed, args.caseops, args.normalization)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as e:
        raise UsageError(f"cannot load tokenizer {model}: {e}") from None
    if sp.vocab_size() > 2**16:
        raise UsageError(f"tokenizer vocab {sp.vocab_size()} does not fit uint16 shards: use at most 65536")
    bos = sp.bos_id()
    if bos < 0:
        raise UsageError(f"tokenizer {model} has no BOS piece: use one trained with bos_id set")
    ops = caseops.operator_ids(sp)
    if args.caseops and ops is None:
        raise UsageError(f"--caseops needs a tokenizer with the operators U+E001..U+E004 as user-defined "
                         f"symbols, which {model} lacks: use a CaseOps tokenizer or --train-tokenizer")
    if ops is not None and not args.caseops:  # its vocab has no capitals: they would all go to byte pieces
        raise UsageError(f"{model} is a CaseOps tokenizer (operators U+E001..U+E004): add --caseops")
    if args.caseops:
        table, esc_id = caseops.piece_bytes(sp), ops[3]

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"tokenizer": str(Path(model).resolve()), "vocab_size": sp.vocab_size(), "bos_id": bos,
                "shard_tokens": args.shard_tokens, "caseops": args.caseops,
                "inputs": [str(f) for f in files], "splits": {}}
    written = set()
    for split, split_docs in splits.items():
        w, n_bytes, side_bytes = ShardWriter(out_dir, split, args.shard_tokens), 0, 0
        side = ShardWriter(out_dir, "val_bytes", args.shard_tokens) if args.caseops and split == "val" else None
        for i in range(0, len(split_docs), 1024):
            batch = split_docs[i:i + 1024]
            for ids in sp.encode([transform(d) for d in batch], out_type=int, num_threads=os.cpu_count() or 1):
                toks = np.array([bos, *ids], dtype="<u2")
                w.add(toks)
                if side is not None:
                    counts = caseops.sidecar(toks, table, esc_id)
                    side.add(counts.astype("<u2"))
                    side_bytes += int(counts.sum())
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)  # the input text, before any transform
        w.flush()
        written.update(w.files)
        non_bos = w.tokens - len(split_docs)
        manifest["splits"][split] = {"docs": len(split_docs), "tokens": w.tokens, "shards": len(w.files),
                                     "utf8_bytes": n_bytes, "bytes_per_token": round(n_bytes / max(non_bos, 1), 4),
                                     "files": w.files}
        if side is not None:
            side.flush()
            written.update(side.files)
            manifest["splits"][split].update(byte_files=side.files, sidecar_bytes=side_bytes)
        sidecars = f", {len(side.files)} byte sidecars" if side is not None else ""
        print(f"{split:>5}: {len(split_docs):,} docs, {w.tokens:,} tokens (incl. BOS), {len(w.files)} shards, "
              f"{n_bytes / max(non_bos, 1):.3f} bytes/token{sidecars}")
    stale = [p for p in old if p.name not in written]
    for p in stale:  # --overwrite: leftovers of an earlier, larger run would otherwise be read as data
        p.unlink()
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "manifest.json")
    print(f"wrote {len(written)} shards to {out_dir} with {model}" + (" (CaseOps)" if args.caseops else "")
          + (f" (removed {len(stale)} stale)" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
