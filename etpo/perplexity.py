"""Language-modelling drift of a trained policy (docs/method.md section 14): perplexity of base + policy LoRA vs. the base model.

Usage::

    python -m etpo.perplexity --run_dir runs/benchmark/paper/runs/etpo/breast_w/seed0 [--corpus code,prose,science]
    python -m etpo.perplexity --adapters DIR [--source hf --name_or_path codellama/CodeLlama-7b-hf ...]
    python -m etpo.perplexity --run_dir RUN --corpus_file wikitext=wiki.test.raw --corpus_file github=repo_dir/
    python -m etpo.perplexity --run_dir RUN --hf wikitext=wikitext:wikitext-2-raw-v1:test:text  # needs `datasets`

The trained model is the base with the policy adapter ``<run_dir>/adapters/policy`` (peft format, written by
``SharedBaseLM.save_adapters``); the reference is the same model with the adapter disabled, i.e. exactly the base
(the "reference" view of the model layer). The base is described by ``adapters/backbone.json`` (written next to the
adapters), else by ``<run_dir>/config.yaml``'s ``model.init_args.backbone``; ``--source/--name_or_path/--gguf_file/
--gguf_cache_dir/--device/--dtype`` override fields of it. It is loaded with ``modules.shared_base.loading.load_backbone``.

Perplexity, exactly: ``exp(mean NLL)`` over every predicted token of a corpus's token stream (the documents joined
by a blank line, tokenised without special tokens, cut to ``--max_tokens``). The stream is scored with a sliding
window of ``--window`` tokens moved by ``--stride`` (default ``window // 2``): window k covers stream positions
``[k * stride, k * stride + W)`` (``W = window``, minus one when a BOS token is prepended) and scores only the
positions not scored by an earlier window, so every token is predicted exactly once, with at least
``W - stride`` tokens of context (except in the first window). ``--bos auto`` prepends the tokenizer's BOS to every
window when the tokenizer adds one by itself (Llama, CodeLlama); then the first stream token is predicted too,
otherwise it only serves as context. ``--stride`` equal to ``W`` (``W - 1`` without BOS) gives disjoint fixed-length
chunks. Windows of equal shape are batched (``--batch_size``); NLLs are computed in float32 from the logits of the
scored positions only and summed in float64. The model runs in the backbone's dtype (``auto`` = bfloat16 on CUDA):
drifts as small as the paper's (~0.1 %) are best measured with ``--dtype float32`` where memory allows.

Offline default corpora (no internet here; ``--corpus_file`` and ``--hf`` take the paper's GitHub / Wikitext / arXiv
when a copy is available). They are built deterministically from text that every install of this project has --
the Python standard library and the scipy / numpy packages scikit-learn depends on -- and are far from what the
policy is trained on (its own generated scikit-learn scripts), so they are held out:

* ``code`` (for GitHub): source files of the Python standard library (the fixed list :data:`CODE_FILES`), cut into
  6,000-character pieces at line boundaries and interleaved round-robin over the files. General-purpose,
  idiomatic, well-commented Python that is not data-science code, like a random GitHub sample;
* ``prose`` (for Wikitext): the prose paragraphs of Python's own documentation topics (``pydoc_data.topics``: the
  language reference and library chapters as plain text), in sorted topic order; indented blocks (grammar, code,
  tables) are dropped and wrapped lines joined. The largest body of edited, expository, encyclopaedia-style English
  shipped with every Python (Wikitext is Wikipedia's "good" articles); its subject is technical;
* ``science`` (for arXiv): the long docstrings (Notes with LaTeX maths, references) of ``scipy.special``
  (``_add_newdocs.py``), ``numpy.linalg`` and ``scipy.stats`` (``_stats_py.py``, ``_morestats.py``), read from
  source with ``ast`` (nothing imported), each cut before its ``Examples`` section, round-robin over the files:
  mathematical and statistical exposition with formulae and citations, the register of arXiv papers.

Every corpus is fingerprinted (sha256 of its token ids) in ``perplexity.json`` so that two evaluations can be
checked to have scored identical text. The scores are relative: what matters is trained vs. base on the same text
(the paper: 2.0633 -> 2.0648 on GitHub code for CodeLlama-7B, i.e. +0.07 %).

Output: a table (corpus, tokens, base ppl, trained ppl, relative change) on stdout and ``perplexity.json`` in the
run dir (``--out`` to put it elsewhere).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

__all__ = [
    "CODE_FILES", "BUILTIN_CORPORA", "code_corpus", "prose_corpus", "science_corpus", "load_corpus_file",
    "load_hf_corpus", "window_plan", "stream_nll", "CorpusResult", "evaluate", "load_policy_model", "main",
]

#: Python standard library modules used for the ``code`` corpus (relative to the stdlib folder), in this order.
CODE_FILES = (
    "textwrap.py", "heapq.py", "fractions.py", "statistics.py", "shlex.py", "difflib.py", "argparse.py",
    "dataclasses.py", "functools.py", "json/decoder.py", "json/encoder.py", "csv.py", "calendar.py", "pprint.py",
    "string.py", "ipaddress.py", "graphlib.py", "colorsys.py", "random.py", "tokenize.py", "bisect.py", "enum.py",
)
#: (package, path inside it) of the ``science`` corpus sources, in this order.
SCIENCE_FILES = (
    ("scipy", "special/_add_newdocs.py"),
    ("numpy", "linalg/_linalg.py"),
    ("scipy", "stats/_stats_py.py"),
    ("scipy", "stats/_morestats.py"),
)
#: Hugging Face shortcuts for the paper's corpora (only usable where ``datasets`` and the data are available).
HF_ALIASES = {"wikitext": "wikitext:wikitext-2-raw-v1:test:text"}


# ----------------------------------------------------------------------------------------------------------------
# corpora
# ----------------------------------------------------------------------------------------------------------------

def _round_robin(sources: Sequence[Iterable[str]], max_chars: int) -> list[str]:
    """Take one piece from every source in turn until ``max_chars`` characters are collected or all run dry."""
    iters = [iter(s) for s in sources]
    out, total = [], 0
    while iters and total < max_chars:
        alive = []
        for it in iters:
            piece = next(it, None)
            if piece is None:
                continue
            alive.append(it)
            out.append(piece)
            total += len(piece) + 2
            if total >= max_chars:
                break
        iters = alive
    return out


def _line_chunks(text: str, size: int) -> Iterable[str]:
    """``text`` in pieces of about ``size`` characters, cut at line boundaries."""
    piece: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        piece.append(line)
        n += len(line)
        if n >= size:
            yield "".join(piece).strip("\n")
            piece, n = [], 0
    if piece and "".join(piece).strip():
        yield "".join(piece).strip("\n")


def code_corpus(max_chars: int = 200_000) -> tuple[list[str], str]:
    """Python standard library sources (:data:`CODE_FILES`), 6,000-character pieces, round-robin over files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f for f in CODE_FILES if (stdlib / f).is_file()]
    if not files:
        raise FileNotFoundError(f"no standard library sources found under {stdlib}")
    pieces = _round_robin([_line_chunks(f.read_text(encoding="utf-8"), 6000) for f in files], max_chars)
    names = ", ".join(str(f.relative_to(stdlib)) for f in files)
    return pieces, f"Python {sys.version.split()[0]} standard library: {names}"


def _prose_paragraphs(text: str) -> Iterable[str]:
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if not lines or not lines[0] or lines[0][0].isspace():
            continue  # grammar, code and tables are indented
        if any(set(line.strip()) <= set("*=-~^") for line in lines if line.strip()):
            continue  # headings and their underlines
        joined = " ".join(line.strip() for line in lines)
        letters = sum(c.isalpha() or c.isspace() for c in joined)
        if len(joined) >= 150 and letters >= 0.85 * len(joined):
            yield joined


def prose_corpus(max_chars: int = 200_000) -> tuple[list[str], str]:
    """Prose paragraphs of ``pydoc_data.topics`` (Python's documentation as text), sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split it off
        raise FileNotFoundError(f"pydoc_data is not installed with this Python ({err}); use --corpus_file") from None
    docs = []
    for key in sorted(topics):
        paras = list(_prose_paragraphs(topics[key]))
        if paras:
            docs.append("\n\n".join(paras))
    pieces = _round_robin([docs], max_chars)
    return pieces, f"prose paragraphs of pydoc_data.topics (Python {sys.version.split()[0]} documentation)"


def _package_dir(name: str) -> Optional[Path]:
    spec = importlib_util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _long_strings(path: Path, min_chars: int = 400) -> Iterable[str]:
    """Docstrings and long string arguments (``add_newdoc(..., \"\"\"doc\"\"\")``) of a source file, in source order,
    dedented and cut before their ``Examples`` section."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        text = textwrap.dedent(node.value).strip("\n")
        lines = text.splitlines()
        for i in range(len(lines) - 1):
            if lines[i].strip() == "Examples" and set(lines[i + 1].strip()) == {"-"}:
                text = "\n".join(lines[:i]).rstrip()
                break
        if len(text) >= min_chars:
            yield text


def science_corpus(max_chars: int = 200_000) -> tuple[list[str], str]:
    """Long docstrings of scipy.special / numpy.linalg / scipy.stats (:data:`SCIENCE_FILES`), round-robin."""
    sources, used = [], []
    for package, rel in SCIENCE_FILES:
        root = _package_dir(package)
        if root is not None and (root / rel).is_file():
            sources.append(_long_strings(root / rel))
            used.append(f"{package}/{rel}")
    if not sources:
        raise FileNotFoundError("neither scipy nor numpy sources found; use --corpus_file")
    versions = []
    for package in dict.fromkeys(p for p, _ in SCIENCE_FILES):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001 - metadata is informative only
            pass
    return _round_robin(sources, max_chars), f"docstrings of {', '.join(used)} ({', '.join(versions)})"


BUILTIN_CORPORA: dict[str, Callable[[int], tuple[list[str], str]]] = {
    "code": code_corpus, "prose": prose_corpus, "science": science_corpus,
}


def load_corpus_file(path: str | Path) -> tuple[list[str], str]:
    """A text file, or every text file below a folder (sorted paths; binary and undecodable files skipped)."""
    path = Path(path)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")], str(path)
    if path.is_dir():
        docs = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                raw = f.read_bytes()
                if b"\0" in raw[:4096]:
                    continue
                docs.append(raw.decode("utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        if not docs:
            raise FileNotFoundError(f"no text files under {path}")
        return docs, f"{len(docs)} files under {path}"
    raise FileNotFoundError(f"corpus file not found: {path}")


def load_hf_corpus(spec: str, max_chars: int) -> tuple[list[str], str]:
    """``dataset[:config[:split[:column]]]`` through the ``datasets`` package; fails with a clear message when the
    package or the data is not available (this machine has no internet)."""
    parts = (spec.split(":") + [None, None, None])[:4]
    name, config, split, column = parts[0], parts[1] or None, parts[2] or "test", parts[3] or "text"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise RuntimeError(f"Hugging Face dataset {spec!r} requested but the `datasets` package is not installed "
                           "(and there is no internet here): pass a local copy with --corpus_file NAME=PATH") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline errors come in many types
        raise RuntimeError(f"could not load Hugging Face dataset {spec!r} ({type(err).__name__}: {err}); without "
                           "internet pass a local copy with --corpus_file NAME=PATH") from None
    docs, total = [], 0
    for row in ds:
        text = row[column]
        if text and text.strip():
            docs.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return docs, f"huggingface {spec}"


# ----------------------------------------------------------------------------------------------------------------
# exact perplexity
# ----------------------------------------------------------------------------------------------------------------

def window_plan(n_tokens: int, window: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """``[(begin, end, score_from)]``: window k feeds stream tokens ``[begin, end)`` (after a BOS when ``bos``) and
    scores stream positions ``[score_from, end)``; every position (but position 0 without BOS) is scored once."""
    span = window - (1 if bos else 0)  # stream tokens per window
    if span < (1 if bos else 2):
        raise ValueError(f"window {window} is too short")
    if not 1 <= stride <= span - (0 if bos else 1):
        raise ValueError(f"stride must be in [1, {span - (0 if bos else 1)}] for window {window} "
                         f"({'with' if bos else 'without'} BOS), got {stride}")
    plan, prev_end, begin = [], (0 if bos else 1), 0
    while prev_end < n_tokens:
        end = min(begin + span, n_tokens)
        if end > prev_end:
            plan.append((begin, end, prev_end))
            prev_end = end
        begin += stride
    return plan


@dataclass
class StreamNLL:
    nll_sum: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.mean) if self.tokens else math.nan


def _forward_tail_logits(model, input_ids, keep: int):
    """Logits of the last ``keep`` positions (``logits_to_keep`` when the model supports it)."""
    import torch

    mask = torch.ones_like(input_ids)
    try:
        out = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
    except TypeError:
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return out.logits[:, -keep:]


def stream_nll(model, ids: Sequence[int], window: int, stride: int, bos_id: Optional[int], batch_size: int = 4,
               progress: Optional[Callable[[int], None]] = None) -> StreamNLL:
    """Summed NLL of the token stream ``ids`` under ``model`` with the sliding-window rule of :func:`window_plan`."""
    import torch
    import torch.nn.functional as F

    bos = bos_id is not None
    plan = window_plan(len(ids), window, stride, bos)
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for w in plan:  # windows of equal shape batch without padding
        groups.setdefault((w[1] - w[0], w[1] - w[2]), []).append(w)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for (_, k), windows in groups.items():
                for i in range(0, len(windows), batch_size):
                    chunk = windows[i:i + batch_size]
                    rows = torch.stack([ids_t[b:e] for b, e, _ in chunk])
                    if bos:
                        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], 1)
                    targets = torch.stack([ids_t[e - k:e] for _, e, _ in chunk]).to(device)
                    # logits at input positions T-1-k .. T-2 predict the k scored tokens
                    logits = _forward_tail_logits(model, rows.to(device), k + 1)[:, :-1]
                    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          reduction="none")
                    total += float(nll.double().sum())
                    count += targets.numel()
                    if progress is not None:
                        progress(targets.numel())
    finally:
        model.train(was_training)
    return StreamNLL(total, count)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------

def _backbone_from_run(run_dir: Optional[Path], adapters: Optional[Path]):
    """The BackboneConfig saved with the adapters, else the run's config.yaml ``model.init_args.backbone``."""
    from modules.shared_base.loading import BackboneConfig, read_backbone_config

    for folder in [a for a in (adapters, adapters.parent if adapters else None) if a is not None]:
        cfg = read_backbone_config(folder)
        if cfg is not None:
            return cfg, str(folder / "backbone.json")
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        backbone = ((raw.get("model") or {}).get("init_args") or {}).get("backbone")
        if isinstance(backbone, dict):
            return BackboneConfig.from_dict(backbone), str(run_dir / "config.yaml")
    return None, None


def _policy_dir(adapters: Path) -> Path:
    """``adapters`` itself when it holds a peft adapter, else its ``policy`` subfolder."""
    if (adapters / "adapter_config.json").is_file():
        return adapters
    if (adapters / "policy" / "adapter_config.json").is_file():
        return adapters / "policy"
    raise FileNotFoundError(f"no peft adapter (adapter_config.json) in {adapters} or {adapters / 'policy'}")


def load_policy_model(run_dir: Optional[str | Path] = None, adapters: Optional[str | Path] = None,
                      overrides: Optional[dict] = None, base_only: bool = False):
    """``(model, tokenizer, info)``: the base from the run's backbone config (plus ``overrides``) with the policy
    adapter loaded as a peft model (``model.disable_adapter()`` = the base), or the bare base with ``base_only``."""
    import dataclasses

    from modules.shared_base.loading import BackboneConfig, load_backbone

    run_dir = Path(run_dir) if run_dir else None
    adapters = Path(adapters) if adapters else (run_dir / "adapters" if run_dir else None)
    cfg, cfg_source = _backbone_from_run(run_dir, adapters)
    if cfg is None:
        if not overrides or not overrides.get("source"):
            raise FileNotFoundError("no backbone description found (adapters/backbone.json or config.yaml); "
                                    "give the base with --source / --name_or_path")
        cfg, cfg_source = BackboneConfig(), "command line"
    if overrides:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = load_backbone(cfg)
    info = {"backbone": cfg.to_dict(), "backbone_from": cfg_source, "adapter": None}
    if base_only:
        return model, tokenizer, info
    if adapters is None:
        raise FileNotFoundError("give --run_dir or --adapters (or --base_only)")
    policy = _policy_dir(adapters)
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft reads a deprecated transformers attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(policy), is_trainable=False)
    model.eval()
    info["adapter"] = str(policy)
    return model, tokenizer, info


def _bos_id(tokenizer, mode: str) -> Optional[int]:
    if mode == "never" or tokenizer.bos_token_id is None:
        if mode == "always":
            raise ValueError("--bos always: the tokenizer has no BOS token")
        return None
    if mode == "always":
        return tokenizer.bos_token_id
    ids = tokenizer("a").input_ids  # auto: as the tokenizer does by itself
    return tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class CorpusResult:
    corpus: str
    source: str
    tokens: int                      # predicted tokens
    fingerprint: str
    base_nll: float                  # mean NLL per predicted token (nats)
    base_ppl: float
    trained_nll: Optional[float] = None
    trained_ppl: Optional[float] = None

    @property
    def relative_change(self) -> Optional[float]:
        if self.trained_ppl is None:
            return None
        return self.trained_ppl / self.base_ppl - 1.0


def tokenize_corpus(tokenizer, docs: Sequence[str], max_tokens: int) -> list[int]:
    """The documents joined by a blank line, tokenised without special tokens, cut to ``max_tokens``."""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False).input_ids
    return list(ids[:max_tokens])


def evaluate(model, tokenizer, corpora: dict[str, tuple[list[str], str]], max_tokens: int = 16384,
             window: int = 1024, stride: Optional[int] = None, batch_size: int = 4, bos: str = "auto",
             log: Optional[Callable[[str], None]] = None) -> tuple[list[CorpusResult], dict]:
    """Perplexity of ``model`` (a peft model: adapter on = trained, ``disable_adapter()`` = base; any other model
    is scored as the base only) on each corpus. Returns the results and the settings used."""
    import contextlib

    bos_id = _bos_id(tokenizer, bos)
    span = window - (1 if bos_id is not None else 0)
    if stride is None:  # default: half a window (valid with and without BOS)
        stride = max(1, min(window // 2, span - (0 if bos_id is not None else 1)))
    has_adapter = hasattr(model, "disable_adapter")
    results = []
    for name, (docs, source) in corpora.items():
        ids = tokenize_corpus(tokenizer, docs, max_tokens)
        if len(ids) < 2:
            raise ValueError(f"corpus {name!r} is empty")
        fp = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        ctx = model.disable_adapter() if has_adapter else contextlib.nullcontext()
        with ctx:
            base = stream_nll(model, ids, window, stride, bos_id, batch_size)
        trained = stream_nll(model, ids, window, stride, bos_id, batch_size) if has_adapter else None
        r = CorpusResult(name, source, base.tokens, fp, base.mean, base.ppl,
                         trained.mean if trained else None, trained.ppl if trained else None)
        results.append(r)
        if log:
            log(f"{name}: {len(ids)} tokens, base ppl {r.base_ppl:.4f}"
                + (f", trained ppl {r.trained_ppl:.4f}" if trained else "") + f" ({time.perf_counter() - t0:.0f} s)")
    settings = {"window": window, "stride": stride, "bos": bos_id is not None, "max_tokens": max_tokens,
                "batch_size": batch_size}
    return results, settings


def format_table(results: Sequence[CorpusResult]) -> str:
    header = f"{'corpus':<12} {'tokens':>8} {'base ppl':>10} {'trained ppl':>12} {'rel. change':>12}"
    lines = [header, "-" * len(header)]
    for r in results:
        trained = f"{r.trained_ppl:12.4f}" if r.trained_ppl is not None else f"{'—':>12}"
        rel = f"{100 * r.relative_change:+11.3f}%" if r.relative_change is not None else f"{'—':>12}"
        lines.append(f"{r.corpus:<12} {r.tokens:>8d} {r.base_ppl:10.4f} {trained} {rel}")
    return "\n".join(lines)


def _parse_named(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values or []:
        if "=" not in v:
            raise ValueError(f"{flag} expects NAME=VALUE, got {v!r}")
        name, value = v.split("=", 1)
        out.append((name.strip(), value.strip()))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m etpo.perplexity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default=None, help="a run directory (adapters/policy + config.yaml)")
    p.add_argument("--adapters", default=None, help="an adapters folder (with policy/) or a peft adapter folder")
    p.add_argument("--base_only", action="store_true", help="score the base model only (no adapter needed)")
    p.add_argument("--corpus", default="code,prose,science",
                   help="comma-separated built-in corpora (code, prose, science; 'wikitext' via --hf); '' for none")
    p.add_argument("--corpus_file", action="append", default=[], metavar="NAME=PATH",
                   help="a text file or a folder of text files as corpus NAME (repeatable)")
    p.add_argument("--hf", action="append", default=[], metavar="NAME=DATASET[:CONFIG[:SPLIT[:COLUMN]]]",
                   help="a Hugging Face dataset as corpus NAME (needs the datasets package and the data)")
    p.add_argument("--max_tokens", type=int, default=16384, help="tokens per corpus (default 16384)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window, BOS included (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="window step (default window // 2)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--out", default=None, help="perplexity.json path (default <run_dir>/perplexity.json)")
    for key in ("source", "name_or_path", "gguf_file", "gguf_cache_dir", "device", "dtype"):
        p.add_argument(f"--{key}", default=None, help=f"override the backbone's {key}")
    args = p.parse_args(argv)
    if not (args.run_dir or args.adapters or args.base_only):
        p.error("give --run_dir or --adapters (or --base_only with model arguments)")
    try:
        char_budget = args.max_tokens * 8
        corpora: dict[str, tuple[list[str], str]] = {}
        for name in [c.strip() for c in args.corpus.split(",") if c.strip()]:
            if name in BUILTIN_CORPORA:
                corpora[name] = BUILTIN_CORPORA[name](char_budget)
            elif name in HF_ALIASES:
                corpora[name] = load_hf_corpus(HF_ALIASES[name], char_budget)
            else:
                raise ValueError(f"unknown corpus {name!r}: built-in ones are {sorted(BUILTIN_CORPORA)}; "
                                 "use --corpus_file NAME=PATH or --hf NAME=DATASET")
        for name, path in _parse_named(args.corpus_file, "--corpus_file"):
            corpora[name] = load_corpus_file(path)
        for name, spec in _parse_named(args.hf, "--hf"):
            corpora[name] = load_hf_corpus(spec, char_budget)
        if not corpora:
            raise ValueError("no corpus selected")
        overrides = {k: getattr(args, k) for k in ("source", "name_or_path", "gguf_file", "gguf_cache_dir",
                                                   "device", "dtype")}
        model, tokenizer, info = load_policy_model(args.run_dir, args.adapters, overrides, args.base_only)
        results, settings = evaluate(model, tokenizer, corpora, args.max_tokens, args.window, args.stride,
                                     args.batch_size, args.bos, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"etpo.perplexity: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    out = Path(args.out) if args.out else (Path(args.run_dir) / "perplexity.json" if args.run_dir else
                                           Path(args.adapters or ".") / "perplexity.json")
    payload = {**info, **settings, "perplexity": "exp(mean NLL over predicted tokens), sliding window",
               "corpora": {r.corpus: {**asdict(r), "relative_change": r.relative_change} for r in results}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
