"""Data sources and the in-memory dataset."""

from .dataset import Dataset
from .sources import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
