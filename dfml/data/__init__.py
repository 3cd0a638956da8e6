"""Datasets: sources -> canonical store -> episode sampler."""

from dfml.data.store import (
    SPLITS,
    DatasetNotFoundError,
    DatasetStore,
    StoreFormatError,
    StoreInfo,
    open_store,
    write_store,
)

__all__ = [
    "SPLITS",
    "DatasetNotFoundError",
    "DatasetStore",
    "StoreFormatError",
    "StoreInfo",
    "open_store",
    "write_store",
]
