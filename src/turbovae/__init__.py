"""turbovae: train variational autoencoders fast and correctly."""

from . import _clock  # noqa: F401 - first: when this process began running turbovae (total_seconds)
from .compression import compress, decompress
from .config import Config, resolve
from .data import DATASETS, Dataset, load_dataset
from .distributions import DiagonalGaussian
from .engine.loop import fit
from .engine.rundir import load
from .engine.setup import build_vae
from .errors import CheckpointError, ConfigError, DataError, TurboVAEError
from .evaluation import bits_per_dim, iwae_nll, nelbo
from .hub import from_pretrained
from .likelihoods import LIKELIHOODS, build_likelihood
from .models import MODELS, build_network
from .objectives import OBJECTIVES, elbo, iwae
from .synthesizer import TableSynthesizer
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "LIKELIHOODS",
    "MODELS",
    "OBJECTIVES",
    "VAE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "DiagonalGaussian",
    "TableSynthesizer",
    "TurboVAEError",
    "bits_per_dim",
    "build_likelihood",
    "build_network",
    "build_vae",
    "compress",
    "decompress",
    "elbo",
    "fit",
    "from_pretrained",
    "iwae",
    "iwae_nll",
    "load",
    "load_dataset",
    "nelbo",
    "resolve",
]
