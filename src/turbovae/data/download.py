"""Find the MNIST / Fashion-MNIST IDX files on disk, or download them with SHA-256 verification.

Local files are not checksummed: Debian re-compresses its copies, so their gzip bytes differ from
upstream. They are validated by the IDX parser instead (header, rank, exact size). Downloads are
verified against the checksums of the official files before they are moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# Tried in order. The same mirrors as torchvision; overridden by $TURBOVAE_MIRROR (see mirrors()).
MIRRORS: dict[str, list[str]] = {
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
}

# SHA-256 of the official .gz files, from tensorflow/datasets
# tensorflow_datasets/url_checksums/{mnist,fashion_mnist}.txt (the files are identical on every mirror).
SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
}

# Distribution packages that install the files (Debian: dataset-fashion-mnist).
SYSTEM_DIRS: dict[str, list[str]] = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}

TIMEOUT_S = 60.0
# a mirror that sends less than this on average, once a download has run TIMEOUT_S, is given up (the
# partial file is kept and continued by the next mirror or attempt): one byte every 2 s never ended
MIN_BYTES_PER_S = 10_000
_clock = time.monotonic
_CHUNK = 1 << 20
# the largest official file is 26 MB (Fashion-MNIST's training images): a mirror sending more is wrong
MAX_BYTES = 64 << 20


def cache_dir(name: str) -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/turbovae/<name>`` (default ``~/.cache/turbovae/<name>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "turbovae" / name


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for the four files, in order.

    ``data_dir``, ``$TURBOVAE_DATA/<name>``, ``$TURBOVAE_DATA``, the user cache, then system dirs.
    """
    dirs = [Path(data_dir)] if data_dir else []
    if root := os.environ.get("TURBOVAE_DATA"):
        dirs += [Path(root) / name, Path(root)]
    dirs.append(cache_dir(name))
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, [])]
    return dirs


def mirrors(name: str) -> list[str]:
    """Base URLs to download from; ``$TURBOVAE_MIRROR`` replaces them with ``<mirror>/<name>/``."""
    if mirror := os.environ.get("TURBOVAE_MIRROR"):
        return [f"{mirror.rstrip('/')}/{name}/"]
    return MIRRORS[name]


def _find_file(directory: Path, file: str) -> Path | None:
    # Also accept the decompressed file, as left by `gunzip` (the IDX reader detects gzip itself).
    for candidate in (directory / file, directory / file.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_local(name: str, data_dir: str | Path | None = None) -> dict[str, Path] | None:
    """The first searched directory holding all four files, as ``{official file name: path}``."""
    for directory in search_dirs(name, data_dir):
        found = {file: _find_file(directory, file) for file in FILES}
        if all(found.values()):
            return {file: path for file, path in found.items() if path is not None}
    return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (flock): downloads into one folder take turns, so one
    process never removes or appends to the partial file of another. Released when the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fetch(url: str, part: Path, timeout: float) -> str:
    """Download ``url`` into ``part``, continuing a partial file (an HTTP Range request) where there is
    one; at most MAX_BYTES in all. Returns the SHA-256 of the whole file."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: nothing after byte `have`: the partial file may be complete
            raise
        return _sha256_of(part)
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and have + int(length) > MAX_BYTES:
            raise DataError(
                f"{url}: {have + int(length):,} bytes, more than the {MAX_BYTES:,} bytes a data file can be"
            )
        with open(part, "ab" if have else "wb") as out:
            _copy(response, out, have, url, timeout)
    return _sha256_of(part)


def _copy(response: BinaryIO, out: BinaryIO, have: int, url: str, timeout: float = TIMEOUT_S) -> None:
    total = have
    start = _clock()
    read = getattr(response, "read1", None) or response.read  # what has arrived, not a full chunk
    while chunk := read(_CHUNK):
        total += len(chunk)
        if total > MAX_BYTES:
            raise DataError(f"{url}: more than the {MAX_BYTES:,} bytes a data file can be; stopped")
        out.write(chunk)
        elapsed = _clock() - start
        if elapsed > timeout and (total - have) / elapsed < MIN_BYTES_PER_S:
            out.flush()
            raise TimeoutError(
                f"{(total - have) / elapsed:,.0f} bytes/s after {elapsed:.0f} s, less than the "
                f"{MIN_BYTES_PER_S:,} a download must keep up; given up (the partial file is kept)"
            )
    out.flush()
    os.fsync(out.fileno())


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download_file(name: str, dest: Path, timeout: float) -> None:
    """Download ``dest`` from the mirrors into ``.NAME.part`` beside it (same folder: the final rename
    is atomic), verify its SHA-256, rename it into place. A partial file left by a killed or failed
    download is continued by the next attempt (or started again where the server cannot continue it);
    one that fails its checksum is deleted."""
    urls = [base + dest.name for base in mirrors(name)]
    sha256 = SHA256[name][dest.name]
    part = dest.parent / f".{dest.name}.part"
    errors = []
    with _locked(dest.parent):
        if dest.is_file():  # another process downloaded it while this one waited
            return
        for stale in dest.parent.glob(f".{dest.name}.*.part"):  # random names of earlier versions
            stale.unlink(missing_ok=True)
        for url in urls:
            try:
                digest = _fetch(url, part, timeout)
            except DataError as e:  # over the size cap: the partial file is wrong, not unfinished
                part.unlink(missing_ok=True)
                errors.append(str(e))
                continue
            except (OSError, ValueError, http.client.HTTPException) as e:
                # network failures (URLError is an OSError) fall through to the next mirror, which
                # continues the partial file (the mirrors serve the same bytes; the checksum decides)
                errors.append(f"{url}: {e}")
                continue
            if digest != sha256:
                part.unlink(missing_ok=True)
                errors.append(
                    f"{url}: SHA-256 {digest} does not match the expected {sha256}; the download was deleted"
                )
                continue
            os.replace(part, dest)
            return
    raise DataError(
        f"could not download {dest.name} ({'; '.join(errors)}); without network access, place "
        f"{', '.join(FILES)} in {dest.parent} or in $TURBOVAE_DATA/{name}/"
    )


def download(name: str, dest: str | Path | None = None, *, timeout: float = TIMEOUT_S) -> dict[str, Path]:
    """Download the four official files of ``name`` into ``dest`` (default: the user cache).

    Files already in ``dest`` are kept. Each download goes to a partial file beside it that is checked
    against its SHA-256 and then renamed into place, so a failed download never leaves a wrong file in
    place; a partial file left by an interrupted download is continued by the next one.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        dest: Target directory.
        timeout: Seconds to wait on each network operation.

    Returns:
        ``{official file name: path}`` for the four files.

    Raises:
        DataError: A checksum mismatch, or every mirror failed for a file.
    """
    directory = Path(dest) if dest is not None else cache_dir(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{directory}: cannot create the download directory ({e})") from e
    paths = {}
    for file in FILES:
        path = directory / file
        if not path.is_file():
            _download_file(name, path, timeout)
        paths[file] = path
    return paths


def locate(name: str, data_dir: str | Path | None = None, *, allow_download: bool = True) -> dict[str, Path]:
    """Find the four files of ``name`` locally, else download them into the user cache.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"``.
        data_dir: A directory searched before the default places (see ``search_dirs``).
        allow_download: When false, a missing dataset is an error rather than a download.

    Returns:
        ``{official file name: path}``; paths may point at the decompressed files.

    Raises:
        DataError: The files are not found and cannot be downloaded.
    """
    if found := find_local(name, data_dir):
        return found
    if not allow_download:
        searched = ", ".join(str(d) for d in search_dirs(name, data_dir))
        raise DataError(f"{name}: files {', '.join(FILES)} not found in any of {searched}")
    return download(name)
