"""Datasets stored as a folder of PNG/JPEG images, and image resizing."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .arrays import split_indices
from .dataset import Dataset

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Modes that carry no colour; alpha is dropped because the models see opaque pixels only.
_GREY_MODES = frozenset({"1", "L", "LA", "La"})
# 16-bit and float images would need a different max_value; refusing beats silently clipping. Pillow
# opens 16-bit grey PNGs as I;16 but 16-bit colour ones as 8-bit RGB(A) (dropping the low byte), so
# PNGs are also judged by their header's bit depth: every 16-bit PNG is refused, grey or colour.
_UNSUPPORTED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KINDS = {0: "grey", 2: "RGB", 3: "palette", 4: "grey + alpha", 6: "RGBA"}


def _check_bit_depth(file: Path) -> None:
    """Refuse a PNG of more than 8 bits per channel, judged by its IHDR chunk (grey or colour alike)."""
    try:
        with open(file, "rb") as f:
            head = f.read(26)
    except OSError:
        return  # Pillow's own error follows
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR" or head[24] <= 8:
        return
    raise DataError(
        f"{file}: a {head[24]}-bit {_PNG_KINDS.get(head[25], 'unknown')} PNG; images must be 8 bits per "
        "channel (values 0..255): convert it, e.g. `convert IN.png -depth 8 OUT.png`"
    )


_OPEN_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _image_files(root: Path) -> list[Path]:
    # Sorted so that the same folder always gives the same order, hence the same split.
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _hxw(size: tuple[int, int]) -> str:
    width, height = size
    return f"{height}x{width}"


def folder_files(root: Path) -> tuple[list[Path], int]:
    """(every image under ``root``, sorted; how many of them are training images): the files of
    ``train/`` then ``test/`` when both exist, else all of them (with 0: the split is to be made)."""
    if not root.is_dir():
        raise DataError(
            f"{root}: not a folder, expected a folder of {', '.join(sorted(IMAGE_SUFFIXES))} images"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = _image_files(root / "train"), _image_files(root / "test")
        for files, sub in ((train_files, "train"), (test_files, "test")):
            if not files:
                raise DataError(
                    f"{root / sub}: no images found, expected {', '.join(sorted(IMAGE_SUFFIXES))}"
                )
        return train_files + test_files, len(train_files)
    files = _image_files(root)
    if not files:
        raise DataError(f"{root}: no images found, expected {', '.join(sorted(IMAGE_SUFFIXES))} files")
    return files, 0


def scan_images(files: list[Path], resize: tuple[int, int] | None) -> tuple[int, int, str]:
    """(height, width, PIL mode "L" or "RGB") of the array the images make, from their headers only (no
    pixel is decoded); refuses an unreadable, 16-bit or float image, and mixed sizes without ``resize``."""
    modes, sizes, large = [], [], []
    for file in files:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    modes.append(image.mode)
                    sizes.append(image.size)
        except _OPEN_ERRORS as e:
            raise DataError(f"{file}: cannot read image ({e})") from e
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            large.append(file)
        _check_bit_depth(file)
        if modes[-1] in _UNSUPPORTED_MODES:
            raise DataError(
                f"{file}: image mode {modes[-1]} is not supported, expected 8-bit greyscale or colour"
            )
    if large:  # PIL's raw DecompressionBombWarning (a traceback-like line pair) said once, in one line
        w, h = sizes[files.index(large[0])]
        print(
            f"turbovae: warning: {len(large)} image(s) above PIL's decompression-bomb limit of "
            f"{(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.3g} Mpx, each decoded whole before resizing "
            f"(e.g. {large[0]}: {_hxw((w, h))} (HxW), {w * h / 1e6:.3g} Mpx, {w * h * 4 / 2**20:,.3g} MiB)",
            file=sys.stderr,
        )
    if resize is None:
        for file, size in zip(files, sizes, strict=True):
            if size != sizes[0]:
                raise DataError(
                    f"images differ in size: {files[0]} is {_hxw(sizes[0])} but {file} is {_hxw(size)} "
                    "(HxW); pass --resize HxW to resize them all"
                )
        height, width = sizes[0][1], sizes[0][0]
    else:
        height, width = resize
    return height, width, "L" if all(m in _GREY_MODES for m in modes) else "RGB"


def decode_image(file: Path, mode: str, height: int, width: int) -> np.ndarray:
    """One image as uint8 (height, width, channels) in ``mode``, resized (Lanczos) when it differs."""
    try:
        with warnings.catch_warnings():  # scan_images said it, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                converted = image.convert(mode)
        if converted.size != (width, height):
            converted = converted.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(converted).reshape(height, width, -1)
    except _OPEN_ERRORS as e:
        raise DataError(f"{file}: cannot decode image ({e})") from e


def load_image_folder(
    path: str | Path,
    *,
    resize: tuple[int, int] | None = None,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    labels: bool = False,
) -> Dataset:
    """Load every PNG/JPEG image under a folder (recursively) as ``uint8`` (N, C, H, W).

    ``train/`` and ``test/`` subfolders, when both exist, give the split; otherwise it is made
    deterministically from the sorted file list. The result is greyscale (C = 1) when every image
    is greyscale, else RGB (C = 3); alpha is dropped.

    Args:
        path: The folder.
        resize: (height, width) every image is resized to. Without it all images must share a size.
        test_fraction: Fraction held out for test when there are no ``train/``/``test/`` subfolders.
        split_seed: Seed of that split.
        labels: Read class labels from the sub-folder names (``CLASS/*.png``, or ``train/CLASS/`` and
            ``test/CLASS/``): ``y_train``/``y_test`` and ``meta["class_names"]`` (sorted names).

    Returns:
        A ``Dataset`` with ``max_value = 255`` named after the folder.

    Raises:
        DataError: No images, a corrupt or unsupported image, or mixed sizes without ``resize``.
    """
    root = Path(path)
    files, n_train = folder_files(root)
    if n_train:
        train_idx, test_idx = np.arange(n_train), np.arange(n_train, len(files))
    elif test_fraction == 0:  # every image in file order, no split (encode's inputs: one image is fine)
        train_idx, test_idx = np.arange(len(files)), np.arange(0)
    else:
        train_idx, test_idx = split_indices(len(files), test_fraction, split_seed)

    height, width, mode = scan_images(files, resize)
    pixels = np.empty((len(files), height, width, 1 if mode == "L" else 3), dtype=np.uint8)  # (N, H, W, C)
    for i, file in enumerate(files):
        pixels[i] = decode_image(file, mode, height, width)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))  # (N, C, H, W)
    dataset = Dataset(name=root.resolve().name, x_train=x[train_idx], x_test=x[test_idx], max_value=255.0)
    if labels:
        classes = [class_of(file, root, n_train > 0) for file in files]
        names = sorted({c for c in classes if c is not None})
        if None in classes or len(names) < 2:
            raise DataError(
                f"{root}: --condition label reads classes from sub-folders (CLASS/IMAGE.png), but "
                + (
                    "some images lie outside one"
                    if None in classes
                    else f"found {len(names)} class folder(s)"
                )
            )
        y = torch.tensor([names.index(c) for c in classes if c is not None], dtype=torch.long)
        dataset.y_train, dataset.y_test = y[train_idx], y[test_idx]
        dataset.meta["class_names"] = names
    return dataset


def class_of(file: Path, root: Path, split: bool) -> str | None:
    """The class sub-folder of an image (below train/ or test/ when the folder is split), or None."""
    parts = file.relative_to(root).parts[1 if split else 0 :]
    return parts[0] if len(parts) > 1 else None


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (N, C, H, W) images to ``size`` = (height, width), channel by channel.

    Args:
        x: ``uint8`` or ``float32`` images.
        size: Target (height, width).

    Returns:
        The resized images, same dtype, clipped to the input's value range.
    """
    height, width = size
    if x.shape[2:] == (height, width) or x.size == 0:
        return x
    out = np.empty((*x.shape[:2], height, width), dtype=x.dtype)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            # A 2-D uint8 array becomes an 'L' image and float32 an 'F' image: no rescaling either way.
            image = Image.fromarray(x[i, c]).resize((width, height), Image.Resampling.LANCZOS)
            out[i, c] = np.asarray(image)
    # Lanczos overshoots at edges; values outside the input range (e.g. 17 for 0..16 digits) are artefacts.
    return np.clip(out, x.min(), x.max(), out=out)


def crop_tiles(image: np.ndarray, crop: int, stride: int) -> np.ndarray:
    """The ``crop``×``crop`` tiles of one (H, W, C) image on a grid of ``stride``, as (n, C, crop, crop);
    an image smaller than ``crop`` is first enlarged (Lanczos) until its short side is ``crop``."""
    height, width = image.shape[:2]
    if min(height, width) < crop:
        k = crop / min(height, width)
        size = (max(crop, round(width * k)), max(crop, round(height * k)))
        channels = image.shape[2]
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        image = np.asarray(pil.resize(size, Image.Resampling.LANCZOS)).reshape(size[1], size[0], channels)
        height, width = image.shape[:2]
    tiles = [image[y : y + crop, x : x + crop] for y in range(0, height - crop + 1, stride)
             for x in range(0, width - crop + 1, stride)]  # fmt: skip
    return np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2))


def photo_crops(name: str, images: list[np.ndarray], is_test: list[bool], crop: int) -> Dataset:
    """Photos of any size as crops: the training photos' tiles on a grid of stride crop/2 (each batch
    draws random ones: random crops on that grid), the held-out photos' non-overlapping tiles."""
    if crop < 8:
        raise DataError(f"data.crop must be at least 8 pixels, got {crop}")
    train = [crop_tiles(im, crop, max(crop // 2, 1)) for im, t in zip(images, is_test, strict=True) if not t]
    test = [crop_tiles(im, crop, crop) for im, t in zip(images, is_test, strict=True) if t]
    if not train or not test:
        raise DataError(f"{name}: --crop needs at least one training and one held-out image")
    dataset = Dataset(name=name, x_train=torch.from_numpy(np.concatenate(train)),
                      x_test=torch.from_numpy(np.concatenate(test)), max_value=255.0)  # fmt: skip
    dataset.meta["crop"] = crop
    return dataset


def load_photo_folder(
    path: str | Path, crop: int, test_fraction: float = 0.1, split_seed: int = 0
) -> Dataset:
    """A folder of photos of any size as ``crop``×``crop`` crops (``photo_crops``); the split is by photo
    (``train/`` and ``test/``, else a seeded share of the files), colour when any photo is."""
    root = Path(path)
    files, n_train = folder_files(root)
    if n_train:
        is_test = [i >= n_train for i in range(len(files))]
    else:
        _, test_idx = split_indices(len(files), test_fraction, split_seed)
        chosen = set(test_idx.tolist()) or {len(files) - 1}
        is_test = [i in chosen for i in range(len(files))]
    modes = []
    for file in files:
        _check_bit_depth(file)
        try:
            with Image.open(file) as image:
                modes.append(image.mode)
        except _OPEN_ERRORS as e:
            raise DataError(f"{file}: cannot read image ({e})") from e
    mode = "L" if all(m in _GREY_MODES for m in modes) else "RGB"
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert(mode)).reshape(image.size[1], image.size[0], -1))
        except _OPEN_ERRORS as e:
            raise DataError(f"{file}: cannot decode image ({e})") from e
    return photo_crops(root.resolve().name, images, is_test, crop)


# scikit-image's bundled photos (real, offline): training photos, then the held-out ones
PHOTOS_TRAIN = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png",
                "grass.png", "gravel.png")  # fmt: skip
PHOTOS_TEST = ("chelsea.png", "rocket.jpg")


def load_photos(crop: int = 64) -> Dataset:
    """The photos scikit-image ships in its wheel (``--data photos``) as colour crops (``photo_crops``)."""
    try:
        import skimage
    except ImportError:
        raise DataError(
            "--data photos reads the photos scikit-image ships: pip install 'turbovae[diffusers]'"
        ) from None
    root = Path(skimage.__file__).parent / "data"
    images = []
    for name in PHOTOS_TRAIN + PHOTOS_TEST:
        with Image.open(root / name) as image:
            images.append(np.asarray(image.convert("RGB")))
    is_test = [name in PHOTOS_TEST for name in PHOTOS_TRAIN + PHOTOS_TEST]
    return photo_crops("photos", images, is_test, crop)
