"""Datasets, validation and the fixed task protocol (DESIGN.md 3.1-3.2)."""

from starrec.data.errors import DataError
from starrec.data.schema import Dataset

__all__ = ["DataError", "Dataset"]
