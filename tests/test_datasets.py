"""Dataset loading and the documented preprocessing (envs.datascience.datasets).

Expected counts come from ../shared/datasets/README.md and each SOURCE.md: rows after dropping rows with
missing values, features after dropping the id column, class counts as verified there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from envs.datascience.datasets import (
    BENCHMARK_DATASETS,
    OFFLINE_DATASETS,
    DatasetNotFoundError,
    dataset_names,
    load_dataset,
)

# name: (rows after preprocessing with max_rows=2000, features, class counts in code order or None)
EXPECTED = {
    "pharyngitis": (512, 18, {"0": 281, "1": 231}),  # SOURCE.md: dropna -> 512 rows, 0: 281, 1: 231
    "kidney_stone": (414, 6, {"0": 230, "1": 184}),
    "health_insurance": (2000, 12, None),  # 23548 complete rows, capped
    "spaceship_titanic": (2000, 12, None),  # 6606 complete rows, capped
    "balance_scale": (625, 4, {"B": 49, "L": 288, "R": 288}),
    "breast_w": (683, 9, None),  # 699 rows, 16 with a missing Bare_Nuclei
    "cmc": (1473, 9, {"1": 629, "2": 333, "3": 511}),
    "credit_g": (1000, 20, {"bad": 300, "good": 700}),
    "diabetes": (768, 8, {"tested_negative": 500, "tested_positive": 268}),
    "eucalyptus": (736 - 95, 19, None),  # 448 missing cells in 95 rows
    "jungle_chess": (2000, 6, None),  # 44819 rows, capped
    "pc1": (1109, 21, {"False": 1032, "True": 77}),
    "tic_tac_toe": (958, 9, {"negative": 332, "positive": 626}),
}
N_CLASSES = {"balance_scale": 3, "cmc": 3, "eucalyptus": 5, "jungle_chess": 3}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_dataset_counts(shared_datasets, name):
    if not (shared_datasets / name).is_dir():
        pytest.skip(f"{name} not in {shared_datasets}")
    rows, features, counts = EXPECTED[name]
    ds = load_dataset(name, data_dir=shared_datasets)
    assert ds.name == name
    assert ds.X.shape == (rows, features)
    assert ds.X.dtype == np.float64 and ds.y.dtype == np.int64
    assert np.isfinite(ds.X).all()
    assert ds.n_classes == N_CLASSES.get(name, 2)
    assert set(np.unique(ds.y)) == set(range(ds.n_classes))
    if counts is not None:
        assert ds.class_counts() == counts
    assert len(ds.feature_names) == features
    assert ds.description and len(ds.description) > 20
    assert not ds.X.flags.writeable  # shared through the cache


def test_breast_w_drops_the_16_incomplete_rows(shared_datasets):
    ds = load_dataset("breast_w", data_dir=shared_datasets)
    assert ds.n_rows == 699 - 16
    assert sum(ds.class_counts().values()) == 683
    assert "Bare_Nuclei" in ds.feature_names


def test_head_subsample_matches_reference_implementation(shared_datasets):
    """subsample='head' = dropna then the first 2000 rows (ETPO's data_utils.py); SOURCE.md gives the counts."""
    hi = load_dataset("health_insurance", data_dir=shared_datasets, subsample="head")
    assert hi.class_counts() == {"0": 1546, "1": 454}
    st = load_dataset("spaceship_titanic", data_dir=shared_datasets, subsample="head")
    assert st.class_counts() == {"False": 1071, "True": 929}
    assert "PassengerId" not in st.feature_names and "Name" in st.feature_names


def test_random_subsample_is_deterministic_and_seeded(shared_datasets):
    a = load_dataset("jungle_chess", data_dir=shared_datasets, max_rows=500, subsample_seed=0)
    b = load_dataset("jungle_chess", data_dir=shared_datasets, max_rows=500, subsample_seed=0)
    c = load_dataset("jungle_chess", data_dir=shared_datasets, max_rows=500, subsample_seed=1)
    assert a is b  # cached
    assert a.n_rows == 500 and not np.array_equal(a.X, c.X)
    full = load_dataset("jungle_chess", data_dir=shared_datasets, max_rows=None)
    assert full.n_rows == 44819
    assert full.class_counts() == {"b": 17422, "d": 4335, "w": 23062}


def test_categorical_columns_are_integer_codes(shared_datasets):
    ds = load_dataset("credit_g", data_dir=shared_datasets)
    col = ds.feature_names.index("checking_status")
    values = np.unique(ds.X[:, col])
    assert values.tolist() == list(range(len(values)))  # codes 0..k-1 of the sorted categories
    ttt = load_dataset("tic_tac_toe", data_dir=shared_datasets)
    assert set(np.unique(ttt.X).tolist()) == {0.0, 1.0, 2.0}  # b, o, x


@pytest.mark.parametrize("name, file", [("tic_tac_toe", "tic_tac_toe.csv"), ("tic_tac_toe", "tic_tac_toe.arff"),
                                        ("balance_scale", "balance_scale.csv"), ("balance_scale", "balance_scale.arff")])
def test_generated_tables_are_openmls_rows_in_openmls_order(shared_datasets, tmp_path, name, file):
    """tic_tac_toe and balance_scale are computed from their rules, offline on any machine: the same preprocessed
    table, row for row, as the OpenML files of ../shared/datasets (read by the file loader)."""
    from envs.datascience.datasets import _SPECS, _preprocess, _read_table

    path = shared_datasets / name / file
    if not path.is_file():
        pytest.skip(f"{path} absent")
    from_file = _preprocess(_read_table(path), name, _SPECS[name], None, "random", 0, "", str(path))
    generated = load_dataset(name, data_dir=tmp_path, max_rows=None, download=False)  # no file there: computed
    assert generated.source.startswith("generated")
    np.testing.assert_array_equal(generated.X, from_file.X)
    np.testing.assert_array_equal(generated.y, from_file.y)
    assert generated.feature_names == from_file.feature_names and generated.class_names == from_file.class_names
    assert generated.description and "three in a row" in load_dataset("tic_tac_toe").description


@pytest.mark.parametrize("name", ["breast_w", "diabetes"])
def test_arff_variant_gives_the_same_table(shared_datasets, tmp_path, name):
    src = shared_datasets / name / f"{name}.arff"
    if not src.is_file():
        pytest.skip(f"{src} absent")
    (tmp_path / name).mkdir()
    os.symlink(src, tmp_path / name / f"{name}.arff")  # a data dir holding only the ARFF file
    from_arff = load_dataset(name, data_dir=tmp_path, max_rows=None)
    from_csv = load_dataset(name, data_dir=shared_datasets, max_rows=None)
    assert "arff" in from_arff.source and from_csv.source.endswith(".csv")
    np.testing.assert_array_equal(from_arff.X, from_csv.X)
    np.testing.assert_array_equal(from_arff.y, from_csv.y)
    assert from_arff.class_names == from_csv.class_names


def test_gzipped_csv_is_read(shared_datasets, tmp_path):
    import gzip

    src = shared_datasets / "kidney_stone" / "train.csv"
    if not src.is_file():
        pytest.skip("kidney_stone absent")
    (tmp_path / "kidney_stone").mkdir()
    with gzip.open(tmp_path / "kidney_stone" / "kidney_stone.csv.gz", "wb") as fh:
        fh.write(src.read_bytes())
    ds = load_dataset("kidney_stone", data_dir=tmp_path)
    assert ds.n_rows == 414 and ds.source.endswith(".csv.gz")


def test_airlines_missing_offline_gives_clear_error(shared_datasets):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("airlines", data_dir=shared_datasets, download=False)
    msg = str(err.value)
    assert "airlines" in msg and "1169" in msg and "ETPO_DATA_DIR" in msg
    assert str(shared_datasets / "airlines") in msg


def test_openml_fallback_is_used_and_preprocessed(shared_datasets, tmp_path, monkeypatch):
    """Without a local copy an OpenML set comes from fetch_openml (stubbed here: no network in tests)."""
    import pandas as pd

    import envs.datascience.datasets as mod

    calls = []

    def fake_fetch(name, openml_id, data_home):
        calls.append((name, openml_id))
        return pd.read_csv(shared_datasets / "breast_w" / "breast_w.csv")

    monkeypatch.setattr(mod, "data_directories", lambda d: [Path(d)])
    monkeypatch.setattr(mod, "_fetch_openml", fake_fetch)
    ds = load_dataset("breast_w", data_dir=tmp_path, download=True)
    assert calls == [("breast_w", 15)]
    assert ds.source == "OpenML 15" and ds.X.shape == (683, 9)

    def failing_fetch(name, openml_id, data_home):
        raise OSError("network is unreachable")

    monkeypatch.setattr(mod, "_fetch_openml", failing_fetch)
    with pytest.raises(DatasetNotFoundError, match="network is unreachable"):
        load_dataset("cmc", data_dir=tmp_path, download=True)


def test_missing_kaggle_set_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("ETPO_DATA_DIR", raising=False)
    import envs.datascience.datasets as mod

    monkeypatch.setattr(mod, "data_directories", lambda d: [Path(d)] if d else [])
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("pharyngitis", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "pharyngitis" / "pharyngitis.csv") in msg
    assert "ETPO_DATA_DIR" in msg and "Kaggle" in msg


def test_env_var_data_dir(shared_datasets, monkeypatch, tmp_path):
    (tmp_path / "kidney_stone").mkdir()
    os.symlink(shared_datasets / "kidney_stone" / "train.csv", tmp_path / "kidney_stone" / "train.csv")
    monkeypatch.setenv("ETPO_DATA_DIR", str(tmp_path))
    ds = load_dataset("kidney-stone")  # aliases with '-' work too
    assert ds.source == str(tmp_path / "kidney_stone" / "train.csv")


@pytest.mark.parametrize("name,shape,k", [("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3),
                                          ("iris", (150, 4), 3), ("digits", (1797, 64), 10)])
def test_offline_sklearn_sets(name, shape, k):
    ds = load_dataset(name)
    assert ds.X.shape == shape and ds.n_classes == k
    assert ds.description


def test_offline_cap_applies(tmp_path):
    assert load_dataset("digits", max_rows=300).n_rows == 300


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    msg = str(err.value)
    for name in BENCHMARK_DATASETS + OFFLINE_DATASETS:
        assert name in msg
    assert len(dataset_names()) == 18
