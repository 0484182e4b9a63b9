"""The data layer: readers turn sources into columns; the DataProvider batches them
and loads torch Datasets through a DataLoader (ptutils.data.torch_source).

Configs name these as `ptutils.data.NpzReader`, `ptutils.data.DataProvider`, ...
"""

from __future__ import annotations

from ptutils.data.provider import DataProvider
from ptutils.data.readers import (
    CsvReader,
    DataReader,
    DigitsReader,
    FileReader,
    HDF5Reader,
    JsonLinesReader,
    NpzReader,
    SyntheticReader,
    split_indices,
    stable_seed,
)

__all__ = [
    "CsvReader",
    "DataProvider",
    "DataReader",
    "DigitsReader",
    "FileReader",
    "HDF5Reader",
    "JsonLinesReader",
    "NpzReader",
    "SyntheticReader",
    "split_indices",
    "stable_seed",
]
