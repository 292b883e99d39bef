"""Build a small offline English corpus from the installed Python stdlib's docstrings.

Every machine with Python has a few MB of well-edited English prose in the standard
library's docstrings. This walks the stdlib source folder in sorted order, parses each
.py file with `ast` (nothing is imported), and writes one JSONL document per module:
its module, class and function docstrings (cleaned with inspect.cleandoc) joined with
blank lines. Output is deterministic for a given Python version.

    python3 data/stdlib_corpus.py --out /tmp/stdlib.jsonl
    python3 data/stdlib_corpus.py --out /tmp/small.jsonl --max-bytes 1000000
    python3 data/build_shards.py --inputs /tmp/stdlib.jsonl --val-docs 50 \\
        --train-tokenizer 1024 --tokenizer-out /tmp/sp/stdlib_1024 --out-dir /tmp/shards
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_text(path: str) -> str | None:
    """Docstrings of one source file joined by blank lines, or None if it can't be parsed."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)  # honours PEP 263 coding cookies
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, DOC_NODES)),
                   key=lambda n: (n.lineno, n.col_offset))
    docs = [ast.get_docstring(n, clean=True) for n in [tree, *nodes]]  # clean=True -> cleandoc
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def iter_documents(root: str, min_chars: int):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                text = module_text(os.path.join(dirpath, name))
                if text and len(text) >= min_chars:
                    yield text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .jsonl file")
    ap.add_argument("--max-bytes", type=int, default=8_000_000, help="stop before the file exceeds this")
    ap.add_argument("--min-chars", type=int, default=200, help="skip modules with less docstring text")
    args = ap.parse_args(argv)
    root = sysconfig.get_paths()["stdlib"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp, n_docs, n_bytes = args.out + ".tmp", 0, 0
    with open(tmp, "wb") as f:
        for text in iter_documents(root, args.min_chars):
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            if n_bytes + len(line) > args.max_bytes:
                break
            f.write(line)
            n_docs, n_bytes = n_docs + 1, n_bytes + len(line)
    os.replace(tmp, args.out)
    print(f"stdlib_corpus: wrote {n_docs} docs, {n_bytes:,} bytes from {root} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
