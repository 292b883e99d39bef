"""CaseOps: a lossless case transform applied to text before SentencePiece, and its byte sidecar.

Compatible with upstream Parameter Golf's `lossless_caps_caseops_v1` tokenizer and shards.
Capital letters are moved out of the words into four operator characters from Unicode's private
use area, so "The", "THE" and "the" share the pieces of "the":

    U+E001 TITLE    the next ASCII letter is upper case
    U+E002 ALLCAPS  the following run of ASCII letters is upper case
    U+E003 CAPNEXT  the next ASCII letter is upper case (inside a run)
    U+E004 ESC      the next character is a literal U+E001..U+E004 of the input

Only maximal runs of ASCII letters [A-Za-z] change; every other character (non-ASCII letters
included, and U+E000) passes as it is. Per run w: all lower case -> w; two or more letters, all
upper -> ALLCAPS + lower(w); a capital then lower case (or one capital, "I") -> TITLE + lower(w);
any other mix -> TITLE if the first letter is upper, then the lower-cased letters with CAPNEXT
before each later capital: "iPhone" -> "i\\ue003phone", "McDonald" -> "\\ue001mc\\ue003donald".

Scoring counts the original text's bytes, not the transformed text's, so val shards come with a
sidecar fineweb_val_bytes_NNNNNN.bin (the shard format, uint16 values aligned 1:1 with the val
shard's tokens): BOS 0; otherwise the UTF-8 bytes its piece stands for in the original text.
Operators and ESC count 0, a literal operator after ESC its 3 bytes, the piece marker "▁" (a
space) 1, a byte-fallback piece <0xNN> 1, every other character its UTF-8 length.
"""
from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

_ENCODE = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# Well-formed pieces of transformed text, in the order they must be tried; the last alternative
# only matches an operator that none of the others accepted, i.e. malformed input.
_DECODE = re.compile("\ue004([\ue001-\ue004])|\ue002([A-Za-z]+)|[\ue001\ue003]([A-Za-z])|[\ue001-\ue004]")


def _encode_run(m: re.Match) -> str:
    w = m[0]
    if w in OPERATORS:
        return ESC + w
    if w.islower():
        return w
    low = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + low
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + low
    head = TITLE + low[0] if w[0].isupper() else low[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    return _ENCODE.sub(_encode_run, text)


def _decode_op(m: re.Match) -> str:
    literal, caps_run, letter = m.groups()
    if literal:
        return literal
    if caps_run:
        return caps_run.upper()
    if letter:
        return letter.upper()
    raise ValueError(f"malformed CaseOps text: U+{ord(m[0]):04X} at offset {m.start()} "
                     "is not followed by what it operates on")


def decode(text: str) -> str:
    """The exact inverse of encode. Upper-case ASCII outside the operators (SentencePiece's NFKC turns
    e.g. a fullwidth "Ａ" into "A") passes unchanged; a dangling or misplaced operator raises ValueError."""
    return _DECODE.sub(_decode_op, text)


def piece_bytes(sp) -> np.ndarray:
    """Original-text UTF-8 bytes of each piece of a SentencePiece model, indexed by token id.

    Control (BOS, EOS, pad) and unknown pieces count 0 and byte pieces 1, so the pieces of one
    byte-fallback character add up to its UTF-8 length. An operator piece counts 0 here; sidecar()
    gives a literal one, the piece after ESC, its 3 bytes.
    """
    table = np.zeros(sp.vocab_size(), dtype=np.int32)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            table[i] = 1
            continue
        table[i] = sum(0 if c in OPERATORS else 1 if c == "\u2581" else len(c.encode("utf-8"))
                       for c in sp.id_to_piece(i))
    return table


def operator_ids(sp) -> list[int] | None:
    """Token ids of TITLE, ALLCAPS, CAPNEXT, ESC if the model has them as user-defined symbols, else None.

    SentencePiece's Python API does not tell a piece's type, so this checks what the type guarantees
    and the sidecar relies on: each operator is a piece of its own and no other piece contains one,
    so an operator is always exactly one token.
    """
    ids = [sp.piece_to_id(op) for op in OPERATORS]
    if any(sp.id_to_piece(i) != op or sp.is_control(i) or sp.is_byte(i) for i, op in zip(ids, OPERATORS)):
        return None
    others = (sp.id_to_piece(i) for i in range(sp.vocab_size()) if i not in ids)
    return None if any(op in piece for piece in others for op in OPERATORS) else ids


def sidecar(ids: np.ndarray, table: np.ndarray, esc_id: int) -> np.ndarray:
    """Per-token original-text bytes of a token sequence (a document, BOS included)."""
    ids = np.asarray(ids)
    counts = table[ids]
    literal = -1  # position of the last escaped operator: an ESC there is text, not an escape
    for i in np.flatnonzero(ids == esc_id):
        if i != literal and i + 1 < len(ids):
            literal = i + 1
            counts[literal] = len(OPERATORS[0].encode("utf-8"))  # every operator is 3 bytes in UTF-8
    return counts
