"""Text: UTF-8 files with one example per line, tokenised at the character or word level.

A text dataset holds token ids as ``int64`` (N, T), padded with 0 (``PAD``): each line's tokens,
then the end marker ``EOS`` (lines cut at ``max_length`` tokens have no end marker: they did not
end there). ``T`` is the longest encoded line, so ``Dataset.event_shape == (T,)``. The tokeniser
(its kind, vocabulary and limits) travels in ``Dataset.meta["text"]``, and so in every checkpoint:
``turbovae.load`` rebuilds it with ``Tokenizer.from_meta``.

Sources: ``text:PATH`` or a ``.txt`` path (a file, split deterministically; a folder with ``train.txt`` and
``test.txt``; any other folder: its ``*.txt`` files in sorted order, split), ``text:TRAIN,TEST``
(two files), and the built-in ``words`` (the English word list of Debian's ``wamerican``).
"""

from __future__ import annotations

import collections
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .arrays import split_indices
from .dataset import Dataset, check_text_file

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
TOKENIZERS = ("char", "word")
# The built-in corpus: Debian's `wamerican` (apt-get install wamerican), possessives left out
WORDS_FILES = (Path("/usr/share/dict/american-english"), Path("/usr/share/dict/words"))
TEXT_DATASETS = ("words",)
BUCKET_BATCHES = 50  # batches per chunk sorted by length: little padding, batches still well mixed


@dataclass
class Tokenizer:
    """Character- or word-level tokeniser with a fixed vocabulary; ids 0-3 are ``SPECIALS``.

    ``encode`` gives the ids of a line (without the end marker); tokens outside the vocabulary
    become ``UNK``. Word level splits on whitespace, so ``decode(encode(line))`` returns the line
    with its whitespace collapsed to single spaces (character level returns the line itself) when
    every token is in the vocabulary.
    """

    kind: str  # char | word
    vocab: list[str]  # id -> token; the first four are SPECIALS
    max_length: int  # tokens kept per line, before the end marker
    min_freq: int = 1
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.kind!r}")
        self.index = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def fit(cls, lines: Iterable[str], kind: str, max_length: int, min_freq: int = 1) -> Tokenizer:
        """The vocabulary of ``lines``: tokens seen at least ``min_freq`` times, most frequent first."""
        probe = cls(kind, list(SPECIALS), max_length, min_freq)
        counts = collections.Counter(t for line in lines for t in probe.split(line))
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
            key=lambda t: (-counts[t], t),
        )
        return cls(kind, [*SPECIALS, *kept], max_length, min_freq)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Tokenizer:
        """The tokeniser a text data set saved in ``Dataset.meta["text"]`` (a checkpoint's ``data_meta``)."""
        try:
            text = meta["text"]
            return cls(text["tokenizer"], list(text["vocab"]), int(text["max_length"]), int(text["min_freq"]))
        except (KeyError, TypeError):
            raise DataError(
                "this run was not trained on text (its data description has no tokeniser)"
            ) from None

    def to_meta(self) -> dict[str, Any]:
        return {
            "tokenizer": self.kind,
            "vocab": list(self.vocab),
            "max_length": self.max_length,
            "min_freq": self.min_freq,
        }

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, line: str) -> list[str]:
        return list(line.strip()) if self.kind == "char" else line.split()

    def encode(self, line: str) -> list[int]:
        """Token ids of ``line``, not truncated and without the end marker."""
        return [self.index.get(t, UNK) for t in self.split(line)]

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """The text of ``ids`` up to the first end marker or padding; unknown tokens as ``<unk>``
        (``�`` at the character level)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor | np.ndarray) else list(ids)
        tokens: list[str] = []
        for i in values:
            if i in (EOS, PAD):
                break
            if i == BOS:
                continue
            if i == UNK or not 0 <= i < len(self.vocab):
                tokens.append("\N{REPLACEMENT CHARACTER}" if self.kind == "char" else "<unk>")
            else:
                tokens.append(self.vocab[i])
        return ("" if self.kind == "char" else " ").join(tokens)

    def encode_lines(self, lines: Sequence[str], length: int | None = None) -> tuple[np.ndarray, int]:
        """(ids (N, T) int64 padded with PAD, number of lines cut at ``max_length``).

        Each row is the line's first ``max_length`` tokens followed by ``EOS`` when the line fits;
        ``T`` is ``length`` or the longest row."""
        rows, cut = [], 0
        for line in lines:
            ids = self.encode(line)
            if len(ids) > self.max_length:
                rows.append(ids[: self.max_length])
                cut += 1
            else:
                rows.append([*ids, EOS])
        width = length if length is not None else max((len(r) for r in rows), default=1)
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : min(len(r), width)] = r[:width]
        return out, cut


def warn(message: str) -> None:
    """A one-line warning on stderr (never a silent change to the user's data)."""
    print(f"turbovae: warning: {message}", file=sys.stderr)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark and ``\\r`` line ends removed)."""
    check_text_file(path, "text")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected a UTF-8 text file, one example per line)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); convert it to UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return [line.rstrip("\r") for line in lines]


def _nonempty(lines: list[str], counts: dict[str, int]) -> list[str]:
    kept = [line for line in lines if line.strip()]
    counts["empty_lines"] += len(lines) - len(kept)
    return kept


def _sources(spec: str, data_dir: str | None) -> tuple[list[Path], list[Path] | None, str]:
    """(training files, test files or None for a split, display name) of a text spec."""
    if spec == "words":
        files = (
            [Path(data_dir) / "words.txt"] if data_dir and (Path(data_dir) / "words.txt").is_file() else []
        )
        files += [p for p in WORDS_FILES if p.is_file()]
        if not files:
            raise DataError(
                "the built-in 'words' corpus needs Debian's word list: apt-get install wamerican "
                "(or use --data text:PATH with a file of your own)"
            )
        return files[:1], None, "words"
    body = spec[len("text:") :] if spec.startswith("text:") else spec
    if not body:
        raise DataError("text: needs a path, e.g. --data text:corpus.txt or text:train.txt,test.txt")
    path = Path(body).expanduser()
    if "," in body and not path.exists():
        train, _, test = body.partition(",")
        return [Path(train).expanduser()], [Path(test).expanduser()], Path(train).stem
    if path.is_dir():
        if (path / "train.txt").is_file() and (path / "test.txt").is_file():
            return [path / "train.txt"], [path / "test.txt"], path.resolve().name
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(
                f"{path}: no .txt files in this folder (expected UTF-8 text, one example per line)"
            )
        return files, None, path.resolve().name
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected a UTF-8 text file, one example per line)")
    return [path], None, path.stem


def is_text_spec(spec: str) -> bool:
    """``text:PATH``, a ``.txt`` file (not ``csv:X.txt``: a table, as it says), or a built-in text corpus."""
    if spec.startswith(("csv:", "parquet:")):
        return False
    return spec.startswith("text:") or spec in TEXT_DATASETS or spec.lower().endswith(".txt")


def resolve_tokenizer(spec: str, tokenizer: str) -> str:
    """``auto``: characters for the built-in word list, words for everything else."""
    if tokenizer == "auto":
        return "char" if spec == "words" else "word"
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer must be auto, char or word, got {tokenizer!r}")
    return tokenizer


def load_text(
    spec: str,
    *,
    tokenizer: str = "auto",
    max_length: int = 64,
    min_freq: int = 1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    data_dir: str | None = None,
    fitted: dict[str, Any] | None = None,
) -> Dataset:
    """A text dataset (see the module docstring) with its tokeniser in ``meta["text"]``.

    Empty lines are skipped and lines longer than ``max_length`` tokens are cut; both are counted in
    ``meta["text"]`` and reported on stderr. The vocabulary comes from the training split only, or
    from ``fitted`` (a trained run's ``meta["text"]``), so that the run sees the ids it was trained on.

    Raises:
        DataError: Missing file, not UTF-8, no text, or too few lines to split.
        ConfigError: An invalid tokeniser, ``max_length`` or ``min_freq``.
    """
    kind = resolve_tokenizer(spec, tokenizer)
    if max_length < 1 or min_freq < 1:
        raise ConfigError(f"data.max_length and data.min_freq must be >= 1, got {max_length} and {min_freq}")
    train_files, test_files, name = _sources(spec, data_dir)
    counts = {"empty_lines": 0}
    train_lines = _nonempty([line for f in train_files for line in read_lines(f)], counts)
    if spec == "words":
        train_lines = [w for w in train_lines if not w.endswith("'s")]  # possessives: one word, twice
    if test_files is None:
        if not train_lines:
            raise DataError(f"{train_files[0]}: no text (the file is empty or every line is blank)")
        train_idx, test_idx = split_indices(len(train_lines), test_fraction, split_seed)
        test_lines = [train_lines[i] for i in test_idx]
        train_lines = [train_lines[i] for i in train_idx]
    else:
        test_lines = _nonempty(read_lines(test_files[0]), counts)
        for lines, f in ((train_lines, train_files[0]), (test_lines, test_files[0])):
            if not lines:
                raise DataError(f"{f}: no text (the file is empty or every line is blank)")
    if fitted is not None:
        tok = Tokenizer.from_meta({"text": fitted})
    else:
        tok = Tokenizer.fit(train_lines, kind, max_length, min_freq)
    train_ids, train_cut = tok.encode_lines(train_lines)
    test_ids, test_cut = tok.encode_lines(test_lines)
    width = max(train_ids.shape[1], test_ids.shape[1])
    train_ids = np.pad(train_ids, ((0, 0), (0, width - train_ids.shape[1])))
    test_ids = np.pad(test_ids, ((0, 0), (0, width - test_ids.shape[1])))
    if counts["empty_lines"]:
        warn(f"{name}: skipped {counts['empty_lines']} empty line(s)")
    if train_cut or test_cut:
        warn(
            f"{name}: {train_cut + test_cut} line(s) longer than data.max_length = {max_length} tokens were "
            f"cut to {max_length} ({train_cut} training, {test_cut} test); raise data.max_length to keep them"
        )
    meta = tok.to_meta()
    meta.update(
        lines={"train": len(train_lines), "test": len(test_lines)},
        truncated={"train": train_cut, "test": test_cut},
        empty_lines=counts["empty_lines"],
        tokens={"train": int((train_ids != PAD).sum()), "test": int((test_ids != PAD).sum())},
        unknown_test_tokens=int((test_ids == UNK).sum()),
    )
    return Dataset(
        name=name,
        x_train=torch.from_numpy(train_ids),
        x_test=torch.from_numpy(test_ids),
        meta={"kind": "text", "text": meta},
    )


# ---- batches -------------------------------------------------------------------------------------------


def lengths_of(x: torch.Tensor) -> torch.Tensor:
    """Tokens per row (including the end marker): rows are left-aligned and padded with 0."""
    return (x != PAD).sum(-1)


def trim(x: torch.Tensor) -> torch.Tensor:
    """The batch without the padding columns its longest row does not need: (B, T_batch).

    Reads the batch's longest length back to the host (one small sync per batch on a GPU)."""
    return x[:, : max(1, int(lengths_of(x).max()))]


def bucketed(
    perm: torch.Tensor,
    lengths: torch.Tensor,
    batch: int,
    generator: torch.Generator | None,
    chunk_batches: int = BUCKET_BATCHES,
) -> torch.Tensor:
    """An epoch's order with little padding per batch: ``perm`` cut into chunks of
    ``chunk_batches · batch`` examples, each sorted by length, cut into batches, and the full batches
    put in a random order (drawn from ``generator``), the smaller last batch (if any) last.

    The result is a permutation of ``perm``: every example exactly once per epoch."""
    chunk = batch * chunk_batches
    keys = lengths[perm]
    parts = [
        perm[i : i + chunk][torch.argsort(keys[i : i + chunk], stable=True)]
        for i in range(0, len(perm), chunk)
    ]
    ordered = torch.cat(parts) if parts else perm
    n_full = len(perm) // batch
    full = ordered[: n_full * batch].view(n_full, batch)
    shuffle = torch.randperm(n_full, generator=generator, device=perm.device)
    return torch.cat([full[shuffle].flatten(), ordered[n_full * batch :]])


# ---- a synthetic corpus for tests ----------------------------------------------------------------------

_SUBJECTS = (
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "a small bird",
    "the old man",
    "our neighbour",
    "a farmer",
)
_VERBS = ("sees", "likes", "finds", "follows", "paints", "calls", "helps", "watches")
_OBJECTS = (
    "the ball",
    "a red car",
    "the house",
    "a green apple",
    "the river",
    "a book",
    "the moon",
    "a boat",
)
_PLACES = (
    "today",
    "at home",
    "in the park",
    "near the river",
    "after school",
    "at night",
    "every day",
    "in winter",
)


def synthetic_grammar(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences "SUBJECT VERB OBJECT PLACE" with each slot drawn uniformly from 8 phrases:
    3 bits per slot, 12 bits per sentence that only a latent code can carry, over a 38-word vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(slot) for slot in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)) for _ in range(n)]
