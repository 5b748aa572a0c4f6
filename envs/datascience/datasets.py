"""Tabular classification datasets of the ETPO data-science benchmark (paper Table 1) and offline defaults.

:func:`load_dataset` returns a :class:`TabularDataset` (float features, integer labels ``0..K-1``).

Names: the 14 benchmark sets of docs/method.md section 13 - Kaggle ``pharyngitis``, ``kidney_stone``,
``health_insurance``, ``spaceship_titanic`` and OpenML ``airlines`` (1169), ``balance_scale`` (11),
``breast_w`` (15), ``cmc`` (23), ``credit_g`` (31), ``diabetes`` (37), ``eucalyptus`` (188), ``jungle_chess``
(41027), ``pc1`` (1068), ``tic_tac_toe`` (50) - plus scikit-learn's bundled ``breast_cancer``, ``wine``,
``iris`` and ``digits``, which need no files and are the offline defaults.

tic_tac_toe and balance_scale are complete enumerations defined by rules (every end position of a game of
tic-tac-toe; every weight and distance 1..5 on a balance scale): they are computed here, offline on any machine,
row for row as OpenML 50 and 11 hold them (checked against the files), with descriptions in the project's words.

Where another benchmark table is looked for, in order:

1. ``data_dir`` (argument), then the ``ETPO_DATA_DIR`` environment variable, then the project's shared folder
   next to the checkout (``<repo>/../shared/datasets``), each laid out as ``<dir>/<name>/<file>`` with
   ``<file>`` one of ``<name>.csv``, ``<name>.csv.gz``, ``<name>.arff`` (Kaggle sets: the file names of the
   official ETPO repository, e.g. ``kidney_stone/train.csv``);
2. for the OpenML sets, ``sklearn.datasets.fetch_openml(data_id=...)`` (cached by scikit-learn under
   ``data_home``), unless ``download=False`` or ``ETPO_OFFLINE=1``.

Preprocessing (as the reference implementation's ``data_utils.py``, made deterministic):

* drop identifier columns (pharyngitis ``number``, kidney_stone ``id``, health_insurance ``ID``,
  spaceship_titanic ``PassengerId``);
* drop every row with a missing value;
* cap the table at ``max_rows`` rows: ``subsample="random"`` (default) keeps a uniformly random subset
  drawn with ``numpy.random.default_rng(subsample_seed)``, in the original row order; ``subsample="head"``
  keeps the first ``max_rows`` rows, which is exactly what the reference implementation does for
  health_insurance and spaceship_titanic;
* encode every non-numeric feature column (strings, booleans) as integer codes of its sorted distinct
  values (scikit-learn ``LabelEncoder`` order), and the target the same way (``class_names`` keeps the
  original values in code order);
* description: ``description.txt`` next to the data when present, else a short generated one.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TabularDataset",
    "DatasetNotFoundError",
    "load_dataset",
    "dataset_names",
    "data_directories",
    "BENCHMARK_DATASETS",
    "OFFLINE_DATASETS",
    "OPENML_IDS",
]


@dataclass(frozen=True, eq=False)
class TabularDataset:
    """A preprocessed classification table. ``X``: float64 ``(n, d)``; ``y``: int64 ``(n,)`` in ``0..K-1``."""

    name: str
    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    description: str
    target_name: str = "target"
    source: str = ""

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=self.n_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def __repr__(self) -> str:
        return (
            f"TabularDataset({self.name!r}, rows={self.n_rows}, features={self.n_features}, "
            f"classes={self.n_classes}, source={self.source!r})"
        )


class DatasetNotFoundError(FileNotFoundError):
    """A known dataset whose data could not be found locally nor downloaded; the message says how to get it."""


@dataclass(frozen=True)
class _Spec:
    target: str
    files: tuple[str, ...]
    id_columns: tuple[str, ...] = ()
    openml_id: int | None = None
    origin: str = ""


# Facts from ../shared/datasets/*/SOURCE.md and docs/method.md section 13.
_ETPO_REPO = "github.com/morning9393/ETPO (etpo/envs/datascience/{name}/{file})"
_SPECS: dict[str, _Spec] = {
    "pharyngitis": _Spec("radt", ("pharyngitis.csv", "pharyngitis.csv.gz"), ("number",),
                         origin="Kaggle 'pharyngitis' (as used by CAAFE); copy: " + _ETPO_REPO),
    "kidney_stone": _Spec("target", ("train.csv", "kidney_stone.csv", "kidney_stone.csv.gz"), ("id",),
                          origin="Kaggle competition 'playground-series-s3e12' train.csv; copy: " + _ETPO_REPO),
    "health_insurance": _Spec("Response", ("health_insurance.csv.gz", "health_insurance.csv"), ("ID",),
                              origin="Kaggle 'health-insurance-lead-prediction-raw-data'; copy: " + _ETPO_REPO),
    "spaceship_titanic": _Spec("Transported", ("spaceship_titanic.csv", "spaceship_titanic.csv.gz"), ("PassengerId",),
                               origin="Kaggle competition 'spaceship-titanic' train.csv; copy: " + _ETPO_REPO),
}
OPENML_IDS: dict[str, int] = {
    "airlines": 1169,
    "balance_scale": 11,
    "breast_w": 15,
    "cmc": 23,
    "credit_g": 31,
    "diabetes": 37,
    "eucalyptus": 188,
    "jungle_chess": 41027,
    "pc1": 1068,
    "tic_tac_toe": 50,
}
_OPENML_TARGETS = {
    "airlines": "Delay",
    "balance_scale": "class",
    "breast_w": "Class",
    "cmc": "Contraceptive_method_used",
    "credit_g": "class",
    "diabetes": "class",
    "eucalyptus": "Utility",
    "jungle_chess": "class",
    "pc1": "defects",
    "tic_tac_toe": "Class",
}
for _name, _id in OPENML_IDS.items():
    _SPECS[_name] = _Spec(
        _OPENML_TARGETS[_name],
        (f"{_name}.csv", f"{_name}.csv.gz", f"{_name}.arff"),
        openml_id=_id,
        origin=f"OpenML data id {_id} (https://www.openml.org/d/{_id})",
    )

BENCHMARK_DATASETS: tuple[str, ...] = (
    "pharyngitis", "kidney_stone", "health_insurance", "spaceship_titanic", "airlines", "balance_scale",
    "breast_w", "cmc", "credit_g", "diabetes", "eucalyptus", "jungle_chess", "pc1", "tic_tac_toe",
)
OFFLINE_DATASETS: tuple[str, ...] = ("breast_cancer", "wine", "iris", "digits")

_OFFLINE_DESCRIPTIONS = {
    "breast_cancer": "Breast cancer Wisconsin (diagnostic): 30 real-valued features computed from a digitized "
    "image of a fine needle aspirate of a breast mass (radius, texture, perimeter, area, smoothness, ... as "
    "mean, standard error and worst value). Predict whether the tumour is malignant or benign.",
    "wine": "Wine recognition: results of a chemical analysis (alcohol, malic acid, ash, flavanoids, colour "
    "intensity, proline, ...) of wines grown in the same region of Italy by three different cultivators. "
    "Predict the cultivator.",
    "iris": "Iris plants: sepal length, sepal width, petal length and petal width in cm of iris flowers. "
    "Predict the species (setosa, versicolor, virginica).",
    "digits": "Optical recognition of handwritten digits: 8x8 images of digits, each pixel an integer 0..16 "
    "counting the ink in a 4x4 block of the original bitmap. Predict the digit 0..9.",
}


def dataset_names() -> tuple[str, ...]:
    """Every name :func:`load_dataset` accepts (benchmark first, then the offline scikit-learn sets)."""
    return BENCHMARK_DATASETS + OFFLINE_DATASETS


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in dataset_names():
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return key


def data_directories(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders a benchmark table is looked for in, in order (the module docstring): ``data_dir``, then
    ``ETPO_DATA_DIR``, then the project's shared folder next to the checkout."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    env = os.environ.get("ETPO_DATA_DIR")
    if env:
        dirs.append(Path(env))
    # The project's shared folder next to the checkout (../shared/datasets), used in development.
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "datasets")
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


# ------------------------------------------------------------------------------------------ readers


def _read_arff(path: Path):
    """Read an ARFF file with liac-arff into a DataFrame ('?' -> NaN).

    Range annotations such as ``@attribute x integer [1,10]`` (Weka style, e.g. breast_w) are not ARFF
    that liac-arff accepts, so they are stripped first.
    """
    import arff
    import pandas as pd

    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(
        r"(?im)^(\s*@attribute\s+.+?\s+(?:integer|real|numeric))\s*\[[^\]]*\]\s*$", r"\1", text
    )
    data = arff.loads(text)
    columns = [a[0] for a in data["attributes"]]
    return pd.DataFrame(data["data"], columns=columns)


def _read_table(path: Path):
    import pandas as pd

    if path.suffix == ".arff":
        return _read_arff(path)
    return pd.read_csv(path)  # pandas reads .csv.gz transparently


def _fetch_openml(name: str, openml_id: int, data_home: str | None):
    from sklearn.datasets import fetch_openml

    kwargs = dict(data_id=openml_id, as_frame=True, data_home=data_home)
    try:
        bunch = fetch_openml(**kwargs, parser="auto", n_retries=1, delay=0.5)
    except TypeError:  # older scikit-learn without n_retries/delay/parser
        bunch = fetch_openml(**kwargs)
    return bunch.frame


# ------------------------------------------------------------------------------------------ preprocessing


def _encode_column(values) -> tuple[np.ndarray, list[str]]:
    """Integer codes of the sorted distinct values (LabelEncoder order) and those values as strings."""
    import pandas as pd

    series = pd.Series(values)
    if series.dtype == bool or series.dtype == object or not pd.api.types.is_numeric_dtype(series):
        # Sort on the values themselves when they are mutually comparable, else on their strings.
        try:
            uniques = sorted(series.unique())
        except TypeError:
            uniques = sorted(series.unique(), key=str)
    else:
        uniques = sorted(series.unique())
    index = {v: i for i, v in enumerate(uniques)}
    codes = np.asarray([index[v] for v in series], dtype=np.int64)
    return codes, [_value_name(v) for v in uniques]


def _value_name(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _preprocess(df, name: str, spec: _Spec, max_rows: int | None, subsample: str, seed: int, description: str,
                source: str) -> TabularDataset:
    import pandas as pd

    if spec.target not in df.columns:
        raise ValueError(f"{name}: target column {spec.target!r} not in {list(df.columns)} ({source})")
    df = df.drop(columns=[c for c in spec.id_columns if c in df.columns])
    df = df.replace("?", np.nan).dropna(axis=0, how="any").reset_index(drop=True)
    if max_rows is not None and len(df) > max_rows:
        if subsample == "head":
            df = df.iloc[:max_rows]
        else:
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(len(df), size=max_rows, replace=False))
            df = df.iloc[keep]
        df = df.reset_index(drop=True)
    y, class_names = _encode_column(df[spec.target].to_numpy())
    features = df.drop(columns=[spec.target])
    cols = []
    for col in features.columns:
        s = features[col]
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            cols.append(_encode_column(s.to_numpy())[0].astype(np.float64))
        else:
            cols.append(s.to_numpy(dtype=np.float64))
    X = np.column_stack(cols) if cols else np.empty((len(df), 0))
    return _finish(name, X, y, [str(c) for c in features.columns], class_names, description, spec.target, source)


def _finish(name, X, y, feature_names, class_names, description, target, source) -> TabularDataset:
    X = np.ascontiguousarray(X, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.int64)
    X.setflags(write=False)  # shared between environments through the cache: must not be mutated
    y.setflags(write=False)
    if not description:
        description = _generated_description(name, X.shape, feature_names, target, class_names)
    return TabularDataset(name, X, y, tuple(feature_names), tuple(class_names), description.strip(), target, source)


def _generated_description(name, shape, feature_names, target, class_names) -> str:
    feats = ", ".join(feature_names[:20]) + (", ..." if len(feature_names) > 20 else "")
    return (
        f"Tabular classification dataset '{name}' with {shape[0]} rows and {shape[1]} features ({feats}). "
        f"Predict '{target}' ({len(class_names)} classes: {', '.join(class_names[:10])})."
    )


# ------------------------------------------------------------------------------------------ generated tables
# Two of the benchmark's OpenML tables are complete enumerations defined by rules, so they are computed here rather
# than read from a file: the same rows in the same order as OpenML's files (tests/test_datasets.py checks both against
# ../shared/datasets), available offline on any machine. Their descriptions are the project's own words.

TTT_SQUARES = ("top-left-square", "top-middle-square", "top-right-square", "middle-left-square",
               "middle-middle-square", "middle-right-square", "bottom-left-square", "bottom-middle-square",
               "bottom-right-square")
_TTT_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


def _ttt_wins(board, player: str) -> bool:
    return any(all(board[i] == player for i in line) for line in _TTT_LINES)


def tic_tac_toe_rows() -> list[tuple[str, ...]]:
    """Every board a game of tic-tac-toe can end on, x moving first (958): squares ``x`` / ``o`` / ``b`` (blank) and
    the class, ``positive`` when x has three in a row. In OpenML 50's order: x's wins, then o's wins, then the draws,
    each sorted square by square with x < o < b."""
    ends: set[tuple[str, ...]] = set()

    def play(board: list[str], player: str) -> None:
        if _ttt_wins(board, "x") or _ttt_wins(board, "o") or "b" not in board:
            ends.add(tuple(board))
            return
        for i in range(9):
            if board[i] == "b":
                board[i] = player
                play(board, "o" if player == "x" else "x")
                board[i] = "b"

    play(["b"] * 9, "x")
    order = {"x": 0, "o": 1, "b": 2}
    key = lambda board: tuple(order[c] for c in board)  # noqa: E731
    x_wins = sorted((b for b in ends if _ttt_wins(b, "x")), key=key)
    o_wins = sorted((b for b in ends if _ttt_wins(b, "o") and not _ttt_wins(b, "x")), key=key)
    draws = sorted((b for b in ends if not _ttt_wins(b, "x") and not _ttt_wins(b, "o")), key=key)
    return [b + ("positive",) for b in x_wins] + [b + ("negative",) for b in o_wins + draws]


def balance_scale_rows() -> list[tuple]:
    """Every (left weight, left distance, right weight, right distance) in 1..5 (625), in that nested order, with the
    side the scale tips to: ``L`` when left weight x distance is larger, ``R`` when smaller, ``B`` when equal."""
    rows = []
    for lw in range(1, 6):
        for ld in range(1, 6):
            for rw in range(1, 6):
                for rd in range(1, 6):
                    left, right = lw * ld, rw * rd
                    rows.append((lw, ld, rw, rd, "L" if left > right else "R" if left < right else "B"))
    return rows


_GENERATED = {
    "tic_tac_toe": (TTT_SQUARES + ("Class",), tic_tac_toe_rows,
                    "Tic-tac-toe end positions: every board on which a game can end when x moves first, one column "
                    "per square holding x, o or b (blank). Predict whether x has three in a row (positive) or not "
                    "(negative: o won or the game is a draw)."),
    "balance_scale": (("left-weight", "left-distance", "right-weight", "right-distance", "class"), balance_scale_rows,
                      "A balance scale with a weight at a distance on each side, every combination of weights and "
                      "distances 1 to 5. Predict whether it tips left (L), tips right (R) or stays balanced (B)."),
}


def _load_generated(name: str, max_rows: int | None, subsample: str, seed: int) -> TabularDataset:
    import pandas as pd

    columns, rows, description = _GENERATED[name]
    df = pd.DataFrame(rows(), columns=list(columns))
    return _preprocess(df, name, _SPECS[name], max_rows, subsample, seed, description,
                       f"generated by envs.datascience.datasets (the rows of OpenML {_SPECS[name].openml_id})")


def _load_offline(name: str, max_rows: int | None, subsample: str, seed: int) -> TabularDataset:
    from sklearn import datasets

    loader = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
              "iris": datasets.load_iris, "digits": datasets.load_digits}[name]
    bunch = loader()
    X, y = bunch.data, bunch.target
    if max_rows is not None and len(y) > max_rows:
        keep = np.arange(max_rows) if subsample == "head" else np.sort(
            np.random.default_rng(seed).choice(len(y), size=max_rows, replace=False))
        X, y = X[keep], y[keep]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [f"x{i}" for i in range(X.shape[1])])]
    class_names = [str(c) for c in bunch.target_names]
    target = {"breast_cancer": "diagnosis", "wine": "cultivar", "iris": "species", "digits": "digit"}[name]
    return _finish(name, X, y, feature_names, class_names, _OFFLINE_DESCRIPTIONS[name], target,
                   f"sklearn.datasets.load_{name}")


# ------------------------------------------------------------------------------------------ public API

_CACHE_LOCK = threading.Lock()


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    max_rows: int | None = 2000,
    *,
    subsample: str = "random",
    subsample_seed: int = 0,
    download: bool | None = None,
    data_home: str | None = None,
) -> TabularDataset:
    """Load and preprocess a dataset by name (see the module docstring for sources and preprocessing).

    Results are cached per (name, data directories, options): environments on the same dataset share one
    read-only copy. ``download=None`` means "download OpenML sets unless ``ETPO_OFFLINE`` is set".

    Raises:
        ValueError: unknown name (the message lists the valid names) or bad options.
        DatasetNotFoundError: a known dataset that is neither on disk nor downloadable; the message lists
            where it looked and how to obtain the data.
    """
    key = _canonical(name)
    if subsample not in ("random", "head"):
        raise ValueError(f"subsample must be 'random' or 'head', got {subsample!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    if download is None:
        download = os.environ.get("ETPO_OFFLINE", "").strip().lower() not in ("1", "true", "yes")
    dirs = tuple(str(d) for d in data_directories(data_dir))
    return _load_cached(key, dirs, max_rows, subsample, int(subsample_seed), bool(download), data_home)


@functools.lru_cache(maxsize=64)
def _load_cached(key, dirs, max_rows, subsample, seed, download, data_home) -> TabularDataset:
    with _CACHE_LOCK:  # one thread loads while others wait for the cached result
        return _load_uncached(key, dirs, max_rows, subsample, seed, download, data_home)


def _load_uncached(key, dirs, max_rows, subsample, seed, download, data_home) -> TabularDataset:
    if key in OFFLINE_DATASETS:
        return _load_offline(key, max_rows, subsample, seed)
    if key in _GENERATED:
        return _load_generated(key, max_rows, subsample, seed)
    spec = _SPECS[key]
    looked: list[str] = []
    for d in dirs:
        folder = Path(d) / key
        for fname in spec.files:
            path = folder / fname
            looked.append(str(path))
            if path.is_file():
                desc_path = folder / "description.txt"
                description = desc_path.read_text(encoding="utf-8", errors="replace") if desc_path.is_file() else ""
                df = _read_table(path)
                return _preprocess(df, key, spec, max_rows, subsample, seed, description, str(path))
    reason = ""
    if spec.openml_id is not None:
        if download:
            try:
                df = _fetch_openml(key, spec.openml_id, data_home)
                return _preprocess(df, key, spec, max_rows, subsample, seed, "", f"OpenML {spec.openml_id}")
            except Exception as exc:  # noqa: BLE001 - offline, HTTP error, ...: reported below
                reason = f"downloading OpenML data id {spec.openml_id} failed ({type(exc).__name__}: {exc})"
        else:
            reason = f"downloading OpenML data id {spec.openml_id} is disabled (download=False or ETPO_OFFLINE)"
        how = (
            f"set ETPO_DATA_DIR to a folder holding {key}/{key}.csv (e.g. the project's shared/datasets), "
            f"or allow network access so scikit-learn can fetch OpenML data id {spec.openml_id}"
        )
    else:
        reason = "Kaggle data is never downloaded automatically"
        how = (
            f"download it from {spec.origin.format(name=key, file=spec.files[0])} and place it at "
            f"<data_dir>/{key}/{spec.files[0]}, then pass data_dir= or set ETPO_DATA_DIR=/path/to/shared/datasets"
        )
    raise DatasetNotFoundError(
        f"dataset {key!r} not found. Looked for: {', '.join(looked) or '(no data directory)'}. {reason}. To fix: {how}."
    )
