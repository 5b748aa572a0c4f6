"""The data-science environment: write ``build_model`` for a tabular classification task (ETPO Section 5.1)."""

from .datasets import (
    BENCHMARK_DATASETS,
    OFFLINE_DATASETS,
    DatasetNotFoundError,
    TabularDataset,
    dataset_names,
    load_dataset,
)
from .env import DataScienceEnv
from .evaluation import ModelSandbox, make_splits, roc_auc, validate_proba
from .extract import Extraction, answer_class, extract_function, find_banned

__all__ = [
    "DataScienceEnv",
    "TabularDataset",
    "DatasetNotFoundError",
    "load_dataset",
    "dataset_names",
    "BENCHMARK_DATASETS",
    "OFFLINE_DATASETS",
    "ModelSandbox",
    "validate_proba",
    "make_splits",
    "roc_auc",
    "Extraction",
    "extract_function",
    "find_banned",
    "answer_class",
]
