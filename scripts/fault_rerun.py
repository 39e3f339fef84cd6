"""Replay the reproducible records of the reliability audit's fault list (issue 33) and count what holds.

    PYTHONPATH=src python scripts/fault_rerun.py [--tsv ../shared/audits/reliability-faults.tsv]
        [--only REGEX] [--timeout 300] [--json OUT.json]

Each record of the TSV has a shell command over files the auditor prepared under ``t/`` and ``tpl/``.
This script rebuilds the ones it knows how to make (a builder per path: small template runs on
``digits``, a hub export and its forged ``config.json`` files, label files, a file where a folder is
expected ...) in a temporary directory, runs the commands that need nothing else in that directory in
the TSV's order (a record may read what an earlier one wrote), and judges each outcome:

- ``turbovae`` commands hold when they end with exit code 0 or 2 (130 after a signal), print no
  traceback and no raw warning or log line of a library on stderr; a record the audit found broken must also
  end differently from what the audit recorded (its exit code and last stderr line);
- ``python -c`` commands hold when they end with a ``turbovae.errors`` exception, or exit 0 where the
  audit found that right.

Records whose setup cannot be scripted here (tmpfs disks, HTTP test servers, SIGKILL timing, torchrun,
2 GB files, records without a command) are counted as not replayed. Prints one line per record and a
table per severity: tried, held, broke.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TSV = ROOT.parent / "shared" / "audits" / "reliability-faults.tsv"
SMALL = ["--epochs", "1", "--hidden", "32", "--latent", "4", "--progress", "off", "eval.iwae_k=5",
         "train.threads=1"]  # fmt: skip

Builder = Callable[[Path], None]
BUILDERS: dict[str, Builder] = {}


def turbovae(root: Path, *argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore", "PWD": str(root)}
    done = subprocess.run([sys.executable, "-m", "turbovae", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"setup failed: turbovae {' '.join(argv)}: {done.stderr.strip()[-300:]}")


def builder(*paths: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        for p in paths:
            BUILDERS[p] = fn
        return fn

    return register


def _template(name: str, *args: str) -> Builder:
    def build(root: Path) -> None:
        if "t/_d8.npy" in args:
            _d8(root)
        turbovae(root, "train", *args, "--out", f"tpl/{name}")

    return build


DIGITS = ["--data", "digits", *SMALL]
D8 = ["--data", "t/_d8.npy", *SMALL]  # 8-bit grey: what the 256-level likelihoods model
CONV = ["--model", "conv", "model.channels=[8,8]", "--latent", "4", "--epochs", "1", "--progress", "off",
        "eval.iwae_k=5", "train.threads=1"]  # fmt: skip
HVAE = ["--model", "hvae", "--epochs", "1", "--progress", "off", "eval.iwae_k=5", "train.max_steps=5"]
DL = ["--likelihood", "discretized-logistic"]
TEMPLATES = {
    "mlp_bern": DIGITS,
    "mlp_dl": [*D8, *DL],
    "mlp_gl": [*DIGITS, "--likelihood", "gaussian-learned"],
    "mlp_cb": [*DIGITS, "--likelihood", "continuous-bernoulli"],
    "mlp_c256": [*D8, "--likelihood", "categorical-256"],
    "conv_bern": ["--data", "digits", *CONV],
    "conv_dl": ["--data", "t/_d8.npy", *CONV, *DL],
    "hvae_bern": ["--data", "digits", *HVAE],
    "hvae_dl": ["--data", "t/_d8.npy", *HVAE, *DL],
    "cond": [*DIGITS, "--condition", "label"],
}
for _name, _args in TEMPLATES.items():
    BUILDERS[f"tpl/{_name}"] = _template(_name, *_args)


@builder("tpl/tables/wine.csv")
def wine(root: Path) -> None:
    from sklearn.datasets import load_wine

    w = load_wine()
    path = root / "tpl/tables/wine.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*w.feature_names, "cultivar"])
        for row, y in zip(w.data, w.target, strict=True):
            out.writerow([*(f"{v:.6g}" for v in row), f"class_{y}"])


@builder("tpl/table")
def table(root: Path) -> None:
    build(root, "tpl/tables/wine.csv")
    turbovae(
        root, "train", "--data", "csv:tpl/tables/wine.csv", "--batch-size", "32", *SMALL, "--out", "tpl/table"
    )


@builder("tpl/corpus.txt")
def corpus(root: Path) -> None:
    words = ["the cat sat", "a dog ran far", "birds sing at dawn", "rain on the roof", "one two three"]
    (root / "tpl").mkdir(exist_ok=True)
    (root / "tpl/corpus.txt").write_text("\n".join(words[i % 5] + f" {i % 7}" for i in range(400)) + "\n")


@builder("tpl/text")
def text(root: Path) -> None:
    build(root, "tpl/corpus.txt")
    turbovae(root, "train", "--data", "text:tpl/corpus.txt", "--batch-size", "32", "--epochs", "1",
             "--progress", "off", "eval.iwae_k=5", "train.max_steps=5", "--out", "tpl/text")  # fmt: skip


@builder("t/jdata/afile")
def afile(root: Path) -> None:
    (root / "t/jdata").mkdir(parents=True, exist_ok=True)
    (root / "t/jdata/afile").write_text("a file where a folder is expected\n")


@builder("t/jdata/afile/ml")
def under_afile(root: Path) -> None:  # a store under a file: the file is all it takes
    build(root, "t/jdata/afile")


@builder("t/mdata/ml.db")
def mdata(root: Path) -> None:  # a new sqlite store in an existing folder
    (root / "t/mdata").mkdir(parents=True, exist_ok=True)


MOUNTS: list[Path] = []  # read-only filesystems mounted here, unmounted at the end


def _mount_tmpfs(where: Path, options: str) -> bool:
    """A tmpfs at ``where`` where this runs as root and `mount` works; False otherwise."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        return False
    MOUNTS.append(where)
    atexit.register(subprocess.run, ["umount", str(where)], capture_output=True)  # even on an error
    return True


@builder("t/jdata/ro/ml")
@builder("t/jdata/ro/ml.db")
def read_only(root: Path) -> None:
    """A read-only folder, as the audit's: a read-only tmpfs where this runs as root and `mount` works
    (root writes through a 0o555 mode); otherwise mode 0o555, which only binds a user that is not root."""
    ro = root / "t/jdata/ro"
    if ro.is_dir():
        return
    ro.mkdir(parents=True)
    if not _mount_tmpfs(ro, "ro,size=1m"):
        if os.geteuid() == 0:
            raise RuntimeError("root, and no read-only tmpfs")
        ro.chmod(0o555)


def _small_disk(root: Path, folder: str) -> None:
    """A disk that fills mid-run, as the audit's small tmpfs: 16 KiB (four pages); without `mount` as
    root, a setup error (RLIMIT_FSIZE would bound the whole run's writes, not this folder's)."""
    small = root / folder
    if small.is_dir():
        return
    small.mkdir(parents=True)
    if not _mount_tmpfs(small, "size=16k"):
        raise RuntimeError("no tmpfs (needs root and mount)")


for _small, _paths in {"t/jdata/small": ("ml", "tb2", "ml2"), "t/mdata/small": ("ml.db",)}.items():
    for _p in _paths:
        BUILDERS[f"{_small}/{_p}"] = lambda root, folder=_small: _small_disk(root, folder)


def _digits_x(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:n].astype(np.uint8)


@builder("t/idata/enc.npy")
def enc(root: Path) -> None:
    (root / "t/idata").mkdir(parents=True, exist_ok=True)
    np.save(root / "t/idata/enc.npy", _digits_x(6))


LABEL_FILES: dict[str, Callable[[Path], None]] = {
    "lab_short.npy": lambda p: np.save(p, np.array([1, 2])),
    "lab_neg.npy": lambda p: np.save(p, np.array([0, -1, 2, 3, 4, 5])),
    "lab_float.npy": lambda p: np.save(p, np.array([0.5, 1.5, 2.0, 3.0, 4.0, 5.0])),
    "lab_names.txt": lambda p: p.write_text("\n".join(["0", "1", "2", "3", "4", "5"]) + "\n"),
    "lab_bin.txt": lambda p: p.write_bytes(bytes(range(256)) * 4),
}
for _file, _make in LABEL_FILES.items():

    def _label_builder(root: Path, file: str = _file, make: Callable[[Path], None] = _make) -> None:
        (root / "t/idata").mkdir(parents=True, exist_ok=True)
        make(root / "t/idata" / file)

    BUILDERS[f"t/idata/{_file}"] = _label_builder


def _hub(root: Path) -> Path:
    hub = root / "t/gdata/_hub"
    if not hub.exists():
        build(root, "tpl/mlp_bern")
        turbovae(root, "export", "tpl/mlp_bern", "--format", "hub", "--out", "t/gdata/_hub")
    return hub


HUB_EDITS: dict[str, Callable[[dict], object]] = {
    "absurd_shape": lambda c: c.update(event_shape=[1, 100_000, 100_000]),
    "absurd_latent": lambda c: c["config"]["model"].update(latent=10**9),
    "absurd_hidden": lambda c: c["config"]["model"].update(hidden=[10**8]),
    "shape_str": lambda c: c.update(event_shape="8x8"),
    "shape_neg": lambda c: c.update(event_shape=[1, -8, 8]),
    "no_config_key": lambda c: c.pop("config"),
    "no_event_shape": lambda c: c.pop("event_shape"),
    "config_list": lambda c: c.update(config=[1]),
    "maxvalue_str": lambda c: c.update(max_value="abc"),
    "maxvalue_nan": lambda c: c.update(max_value=float("nan")),
    "maxvalue_zero": lambda c: c.update(max_value=0),
    "datameta_list": lambda c: c.update(data_meta=[1]),
    "codepath_model": lambda c: c["config"]["model"].update(name="os.system"),
    "codepath_act": lambda c: c["config"]["model"].update(activation="builtins.eval"),
    "codepath_type": lambda c: c.update(model_type="subprocess.Popen"),
    "data_name_traversal": lambda c: c["config"]["data"].update(name="../../../../etc/passwd"),
}
for _edit in HUB_EDITS:

    def _hub_builder(root: Path, edit: str = _edit) -> None:
        folder = root / f"t/gdata/h_{edit}"
        shutil.copytree(_hub(root), folder)
        config = json.loads((folder / "config.json").read_text())
        HUB_EDITS[edit](config)
        (folder / "config.json").write_text(json.dumps(config))

    BUILDERS[f"t/gdata/h_{_edit}"] = _hub_builder


@builder("t/gdata/h_nested_json")
def nested_json(root: Path) -> None:
    folder = root / "t/gdata/h_nested_json"
    shutil.copytree(_hub(root), folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


@builder("t/gdata/h_weights_devzero")
def weights_devzero(root: Path) -> None:
    folder = root / "t/gdata/h_weights_devzero"
    shutil.copytree(_hub(root), folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")


def _finished(root: Path) -> Path:
    run = root / "t/_finished"
    if not run.exists():
        turbovae(root, "train", *DIGITS, "--checkpoint-every", "10", "--out", "t/_finished")
    return run


def _signed(meta: dict) -> dict:
    import hashlib

    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return {**meta, "meta_sha256": hashlib.sha256(canonical).hexdigest()}


LOOP_EDITS: dict[str, Callable[[dict], object]] = {
    "o7_loop_neg": lambda m: m["loop"].update(epoch=-5),
    "o7_loop_big": lambda m: m["loop"].update(batch_in_epoch=10**12),
    "o7_loop_x": lambda m: m.update(loop="x"),
    "o7_loopstep": lambda m: m["loop"].update(step="7"),
    "o7_norng": lambda m: m.pop("rng"),
    "o7_noopt": lambda m: m.pop("optimizer"),
    "o7_rngbad": lambda m: m["rng"].update(python=[3, None, None]),
    "o10_list": lambda m: m.update(config=[1, 2]),
    "o10_null": lambda m: m.update(config=None),
}
for _run in LOOP_EDITS:

    def _loop_builder(root: Path, run: str = _run) -> None:
        victim = root / "t" / run
        shutil.copytree(_finished(root), victim)
        steps = sorted((victim / "checkpoints").glob("step-*.json"))
        for old in steps[:-1]:  # only the forged one left
            old.unlink()
            old.with_suffix(".safetensors").unlink()
        meta = json.loads(steps[-1].read_text())
        LOOP_EDITS[run](meta)
        steps[-1].write_text(json.dumps(_signed(meta)))

    BUILDERS[f"t/{_run}"] = _loop_builder


def _d8(root: Path) -> None:
    """D8: the digits scaled to 8-bit grey (0..240), what ``tpl/mlp_dl`` is trained on."""
    from sklearn.datasets import load_digits

    if not (root / "t/_d8.npy").exists():
        np.save(root / "t/_d8.npy", (load_digits().images * 15).astype(np.uint8))


@builder("t/fdata/grey8.npy")
def grey8(root: Path) -> None:
    _d8(root)
    (root / "t/fdata").mkdir(parents=True, exist_ok=True)
    np.save(root / "t/fdata/grey8.npy", np.load(root / "t/_d8.npy")[:100])


@builder("t/fdata/pngs")
def pngs(root: Path) -> None:
    from PIL import Image

    folder = root / "t/fdata/pngs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(9)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(folder / f"{i:02d}.png")


@builder("t/fdata/mlp_dl_grey8.tvz", "t/fdata/pngs.tvz")
def tvz(root: Path) -> None:
    for name, source in (("mlp_dl_grey8", "t/fdata/grey8.npy"), ("pngs", "t/fdata/pngs")):
        if not (root / f"t/fdata/{name}.tvz").exists():
            build(root, source)
            build(root, "tpl/mlp_dl")
            turbovae(root, "compress", "tpl/mlp_dl", source, "--out", f"t/fdata/{name}.tvz", "--lanes", "4")


@builder("t/fdata/exists.npy", "t/fdata/exists.tvz", "t/fdata/exists_dir")
def existing(root: Path) -> None:
    (root / "t/fdata/exists_dir").mkdir(parents=True, exist_ok=True)
    for i in range(20):  # the names decompressing t/fdata/pngs.tvz writes
        (root / f"t/fdata/exists_dir/{i:02d}.png").write_bytes(b"an earlier file\n")
    for name in ("exists.npy", "exists.tvz"):
        (root / "t/fdata" / name).write_bytes(b"an earlier file\n")


def _forge(data: bytes, edit: Callable[[dict], object]) -> bytes:
    """A .tvz whose metadata ``edit`` changed (a dict in, a dict or raw bytes out), length and CRC redone."""
    import struct
    import zlib

    from turbovae import compression as c

    magic, version, ckpt, weights, n = c._HEAD.unpack_from(data)
    info = json.loads(data[c._HEAD.size : c._HEAD.size + n])
    blob = edit(info)
    blob = blob if isinstance(blob, bytes) else json.dumps(blob).encode()
    body = c._HEAD.pack(magic, version, ckpt, weights, len(blob)) + blob + data[c._HEAD.size + n : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def _crc_fixed(data: bytes) -> bytes:
    import struct
    import zlib

    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


TVZ_FORGERIES: dict[str, Callable[[dict], object]] = {
    "count_1e12": lambda i: {**i, "count": 10**12},
    "count_1e9": lambda i: {**i, "count": 10**9},
    "count_neg": lambda i: {**i, "count": -5},
    "count_str": lambda i: {**i, "count": "20"},
    "lanes_1e9": lambda i: {**i, "lanes": 10**9},
    "lanes_0": lambda i: {**i, "lanes": 0},
    "seed_words_big": lambda i: {**i, "seed_words": 10**9},
    "latent_bits_16": lambda i: {**i, "latent_bits": 16},
    "latent_bits_99": lambda i: {**i, "latent_bits": 99},
    "event_shape": lambda i: {**i, "event_shape": [1, 100_000, 100_000]},
    "names_trav": lambda i: {**i, "names": ["../../evil.png", *i["names"][1:]]},
    "names_abs": lambda i: {**i, "names": ["/tmp/evil.png", *i["names"][1:]]},
    "names_short": lambda i: {**i, "names": i["names"][:3]},
    "names_dup": lambda i: {**i, "names": ["a.png"] * len(i["names"])},
    "names_int": lambda i: {**i, "names": list(range(len(i["names"])))},
    "names_nul": lambda i: {**i, "names": ["a\0.png", *i["names"][1:]]},
    "names_empty": lambda i: {**i, "names": ["", *i["names"][1:]]},
    "names_str": lambda i: {**i, "names": "a.png"},
    "dtype_garbage": lambda i: {**i, "dtype": "zz"},
    "dtype_object": lambda i: {**i, "dtype": "|O"},
    "dtype_f2": lambda i: {**i, "dtype": "<f2"},
    "array_shape": lambda i: {**i, "array_shape": [3, 3]},
    "scale_300": lambda i: {**i, "scale": 300},
    "scale_0": lambda i: {**i, "scale": 0},
    "key_weird": lambda i: {**i, "\u202e": 1},
    "source_folder": lambda i: {**i, "source": "folder"},
    "channels_last": lambda i: {**i, "channels_last": True},
    "meta_list": lambda i: [1, 2],
    "meta_nested": lambda i: b"[" * 100_000 + b"]" * 100_000,
}
TVZ_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "trunc_half": lambda d: d[: len(d) // 2],
    "trunc_1": lambda d: d[:-1],
    "trunc_10": lambda d: d[:-10],
    "zero": lambda d: b"",
    "random": lambda d: np.random.default_rng(0).integers(0, 256, len(d)).astype(np.uint8).tobytes(),
    "magic_only": lambda d: d[:4],
    "flip0": lambda d: _flip(d, len(d) - 40),
    "flip0_crcfixed": lambda d: _crc_fixed(_flip(d, len(d) - 40)),
    "flip1": lambda d: _flip(d, len(d) // 2),
    "flip1_crcfixed": lambda d: _crc_fixed(_flip(d, len(d) // 2)),
    "flip2": lambda d: _flip(d, 30),
    "flip2_crcfixed": lambda d: _crc_fixed(_flip(d, 30)),
    # the header: magic (4), version (2), two SHA-256 (32 + 32), the metadata's length (4)
    "forged_meta_len_huge": lambda d: _crc_fixed(d[:70] + (2**31).to_bytes(4, "little") + d[74:]),
    "forged_version": lambda d: _crc_fixed(d[:4] + (99).to_bytes(2, "little") + d[6:]),
}
for _key in [*(f"forged_{k}" for k in TVZ_FORGERIES), *TVZ_DAMAGE]:

    def _tvz_builder(root: Path, key: str = _key) -> None:
        source = "pngs" if key.startswith("forged_names") else "mlp_dl_grey8"
        build(root, f"t/fdata/{source}.tvz")
        data = (root / f"t/fdata/{source}.tvz").read_bytes()
        if key in TVZ_DAMAGE:
            forged = TVZ_DAMAGE[key](data)
        else:
            forged = _forge(data, TVZ_FORGERIES[key.removeprefix("forged_")])
        (root / f"t/fdata/v_{key}.tvz").write_bytes(forged)

    BUILDERS[f"t/fdata/v_{_key}.tvz"] = _tvz_builder


def build(root: Path, path: str) -> None:
    if not (root / path).exists() and not (root / path).is_symlink():
        BUILDERS[path](root)


PATH_TOKEN = re.compile(r"^(t|tpl)/")


# held in the audit, but gigabytes of memory and minutes on a shared machine: not replayed here
HEAVY = {"O33-latent1e5", "O33-hidden_many", "O26-10k-categories-forced"}


def inputs_of(command: str) -> list[str] | None:
    """The t/ and tpl/ paths a command reads (those after --out are written); None: not a command this
    script can run (a description, several commands, torchrun, timing)."""
    if not (command.startswith("turbovae ") or command.startswith("python -c ")):
        return None
    if "--nproc" in command:
        return None
    # $PWD is the temporary directory the commands run in; sqlite:///t/x.db is the relative t/x.db
    text = command.replace("file://$PWD/", "file:").replace("$PWD/", "").replace("sqlite:///", "sqlite:")
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    if any(w.endswith(";") or w == "&&" for w in words):  # several commands, or a description after one
        return None
    found = []
    for i, w in enumerate(words):
        for m in re.finditer(r"(?:^|[='\"(:])((?:t|tpl)/[\w./-]+)", w):
            if i > 0 and words[i - 1] == "--out" and m.group(1) not in BUILDERS:
                continue
            found.append(m.group(1).rstrip("/"))
    return found


# what a library prints raw: Python warnings (and the source line under them), logging's lines
RAW = re.compile(r"Warning: |warnings\.warn\(|^\s+\w[\w.]* = \w[\w.]*\(|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \w+ ")


def judge(record: dict[str, str], rc: int | None, err: str, peak_mb: float = 0.0) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if rc is None:
        return False
    if record["command"].startswith("python -c"):
        return last.startswith("turbovae.errors.") or (rc == 0 and record["severity"] == "held")
    clean = rc in (0, 2, 130) and "Traceback" not in err and not any(RAW.search(line) for line in lines)
    if record["severity"] == "held" or not clean:
        return clean
    if (str(rc), last.strip()) != (record["rc"], record["last_stderr_line"].strip()):
        return True
    # the same ending: held only where the fault was the memory it took (now at most half of it)
    audit_peak = float(record["peak_rss_mb"] or 0)
    return audit_peak >= 1000 and 0 < peak_mb <= audit_peak / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsv", default=str(TSV))
    p.add_argument("--only", default="", help="a regular expression on the records' ids")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    p.add_argument("--json", help="write the per-record results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args()
    with open(a.tsv, newline="") as f:
        records = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    root = Path(tempfile.mkdtemp(prefix="fault-rerun-"))
    (root / "t").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore", "PWD": str(root)}
    bindir = root / "_bin"  # `turbovae` on PATH: this checkout's
    bindir.mkdir()
    (bindir / "turbovae").write_text(f'#!/bin/sh\nexec {sys.executable} -m turbovae "$@"\n')
    (bindir / "turbovae").chmod(0o755)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    results = []
    for r in records:
        if a.only and not re.search(a.only, r["id"]):
            continue
        needed = None if r["id"] in HEAVY else inputs_of(r["command"])
        missing = None if needed is None else [n for n in needed if n not in BUILDERS]
        if needed is None or missing:
            results.append(
                {**r, "replayed": False, "why": "no command" if needed is None else f"no builder {missing}"}
            )
            continue
        try:
            for n in needed:
                build(root, n)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            results.append({**r, "replayed": False, "why": f"setup: {str(e)[:200]}"})
            continue
        t0 = time.perf_counter()
        try:
            done = subprocess.run(r["command"], shell=True, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=a.timeout)  # fmt: skip
            rc, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            rc, err = None, "timeout"
        # an upper bound of this command's peak memory: the largest of every child's so far
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        held = judge(r, rc, err, peak_mb)
        last = ([x for x in err.splitlines() if x.strip()] or [""])[-1][:160]
        seconds = round(time.perf_counter() - t0, 1)
        results.append({**r, "replayed": True, "held_now": held, "rc_now": rc, "last_now": last,
                        "seconds": seconds, "peak_mb_at_most": round(peak_mb)})  # fmt: skip
        print(f"{'held ' if held else 'BROKE'} {r['severity']:6} {r['id']:40} rc {rc}  {last}", flush=True)
    table: dict[str, list[int]] = {}
    for x in results:
        row = table.setdefault(x["severity"], [0, 0, 0, 0])  # in the TSV, replayed, held, broke
        row[0] += 1
        if x["replayed"]:
            row[1] += 1
            row[2 if x["held_now"] else 3] += 1
    print(f"\n{'audit severity':16}{'records':>8}{'replayed':>9}{'held':>6}{'broke':>6}")
    for sev in ("held", "high", "medium", "low"):
        if sev in table:
            print(f"{sev:16}" + "".join(f"{v:>{w}}" for v, w in zip(table[sev], (8, 9, 6, 6), strict=True)))
    total = [sum(v[i] for v in table.values()) for i in range(4)]
    print(f"{'all':16}" + "".join(f"{v:>{w}}" for v, w in zip(total, (8, 9, 6, 6), strict=True)))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    for m in MOUNTS:  # before the temporary directory goes
        subprocess.run(["umount", str(m)], capture_output=True)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
