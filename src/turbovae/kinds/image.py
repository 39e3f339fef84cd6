"""Images (C, H, W) and vectors of numbers: built-in data sets, arrays and image folders
(``data/sources.py``). The kind of every source that no other kind claims.

Pictures are image grids (vectors as square images or one-pixel strips, ``viz/grids.py``); a
conditional run is conditioned on the data's labels (``data.condition=label``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import conditioning, runtime
from ..config import parse_resize
from ..data.images import _image_files, load_image_folder
from ..errors import ConfigError, DataError
from .base import DataKind

if TYPE_CHECKING:
    from ..data.dataset import Dataset
    from ..engine.setup import Setup
    from ..vae import VAE


class ImageKind(DataKind):
    name = "image"
    barcode = None  # image grids
    legend = ""
    sample_outs = ".png or .npy"
    inputs = "a .npy or .npz file or a folder of PNG/JPEG images"

    def take_condition(self, data: Dataset, condition: str) -> None:
        """The data's labels (an npz's, IDX label files, digits', an image folder's class sub-folders),
        renumbered 0..K-1."""
        if condition != "label":
            raise ConfigError(
                f"data.condition '{condition}': use 'label' (the labels of '{data.name}') or, for a table "
                "(csv:PATH), the name of a categorical column"
            )
        if data.y_train is None or data.y_test is None:
            raise DataError(
                f"data '{data.name}' has no labels for --condition label (labels come from an npz's y_train/"
                "y_test or y, IDX label files, digits, or an image folder's class sub-folders)"
            )
        values, names = conditioning.label_ids(torch.cat([data.y_train, data.y_test]), data.name,
                                               data.meta.get("class_names"))  # fmt: skip
        data.y_train = conditioning.remap(data.y_train, values)
        data.y_test = conditioning.remap(data.y_test, values)
        conditioning.warn_odd_classes(names, data.y_train, data.y_test, data.name)
        counts = torch.bincount(data.y_train, minlength=len(names)).tolist()
        data.meta["condition"] = {"kind": "label", "names": names, "counts": counts}

    def write_pictures(self, s: Setup, out: Path) -> None:
        """64 prior samples (a conditional run: 8 per class, up to 16 classes) and 16 test inputs above
        their reconstructions (binarised data: the input, its binarised draw and the reconstruction)."""
        from ..viz.grids import as_images, reconstruction_picture, save_class_grid, save_grid

        vae = s.vae
        if vae.n_classes:  # one row of 8 samples per class, named on the left
            y = torch.arange(min(vae.n_classes, 16), device=s.device).repeat_interleave(8)
            samples = vae.sample(len(y), generator=runtime.generator(s.device, 7), condition=y)
            save_class_grid(vae, as_images(samples, s.data.event_shape), y.tolist(), out / "samples.png", 8)
        else:
            samples = vae.sample(64, generator=runtime.generator(s.device, 7))
            save_grid(as_images(samples, s.data.event_shape), out / "samples.png", nrow=8)
        x = s.prepare_test(s.x_test[:16])
        grey = None
        if s.binarize_mode != "none":  # the user's input beside the binarised draw the model scored
            grey = s.data.x_test[: len(x)].to(s.device).float() / s.data.max_value
        recon_y = None if s.y_test is None else s.y_test[: len(x)]
        reconstruction_picture(vae, x, grey, recon_y).save(out / "reconstructions.png", format="PNG")

    def tracked_pictures(self, s: Setup) -> dict[str, np.ndarray]:
        """Prior samples and validation reconstructions (images only, not vectors)."""
        if len(s.data.event_shape) != 3 or not s.has_validation:
            return {}
        from ..viz.grids import grid_image, reconstruction_grid, sample_grid

        vae = s.vae
        vae.eval()
        try:
            x = s.prepare_val(s.x_val[:16])
            y = None if s.y_val is None else s.y_val[:16]  # a conditional run: with the classes
            samples = grid_image(sample_grid(vae, 64), nrow=8)
            pictures = {
                "samples": samples,
                "reconstructions": grid_image(reconstruction_grid(vae, x, y), nrow=len(x)),
            }
        finally:
            vae.train()
        return {name: np.asarray(picture) for name, picture in pictures.items()}

    def save_samples(self, vae: VAE, x: torch.Tensor, out: Path, n: int, classes: list[int] | None) -> None:
        """A grid: rows of 8 (several classes: one row of up to 16 per class)."""
        from ..viz.grids import as_images, save_class_grid, save_grid

        nrow = min(8, n) if classes is None or len(classes) == 1 else min(n, 16)
        if classes is None:
            save_grid(as_images(x, vae.event_shape), out, nrow=nrow)
        else:  # each row named by its class
            per_image = [c for c in classes for _ in range(n)]
            save_class_grid(vae, as_images(x, vae.event_shape), per_image, out, nrow)

    def read_input(self, vae: VAE, path: Path) -> tuple[torch.Tensor, list[str]]:
        """A folder of PNG/JPEG images (rows in the order of the sorted file paths, named by them;
        bytes divided by 255), or an array file as the base kind reads it."""
        if not path.is_dir():
            return super().read_input(vae, path)
        return self.shaped(vae, _folder_input(vae, path), path), _folder_names(path)

    def card_tag(self, vae: VAE) -> str:
        return "image" if len(vae.event_shape) == 3 else "vector"

    def card_usage(self, vae: VAE, load_line: str, top: str) -> list[str]:
        shape = ", ".join(str(d) for d in vae.event_shape)
        return [
            "import torch",
            "import turbovae",
            "",
            load_line,
            f"x = torch.rand(4, {shape})  # inputs: the stored values / {vae.max_value:g}",
            f"z = vae.encode(x).mean  # posterior means{top}",
            "x_hat = vae.reconstruct(x)  # E[x | z]",
            "samples = vae.sample(16)",
        ]


def _folder_input(vae: VAE, path: Path) -> torch.Tensor:
    resize = parse_resize(vae.config.data.resize) if vae.config is not None else None
    ds = load_image_folder(path, resize=resize, test_fraction=0.0)  # no split: the sorted file order
    return torch.cat([ds.x_train, ds.x_test]).float() / 255.0


def _folder_names(path: Path) -> list[str]:
    """The image files of a folder in the order ``_folder_input`` reads them, relative to it."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        files = _image_files(path / "train") + _image_files(path / "test")
    else:
        files = _image_files(path)
    return [str(f.relative_to(path)) for f in files]
