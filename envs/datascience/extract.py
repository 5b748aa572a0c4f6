"""Turn an LLM action (generated text) into the source of a ``build_model`` function.

The prompt ends inside ``def build_model(...)`` right after its docstring, so the expected action is the
function *body*. Models also answer with a complete ``def build_model``, wrap code in markdown fences, or keep
talking after the function. :func:`extract_function` handles all of these with the ``ast`` module:

1. If the text has markdown fences, the fenced block that defines ``build_model`` (else the first block) is
   used; an unterminated fence (generation cut off) runs to the end of the text.
2. If the text defines ``def build_model``, the longest prefix of the text from the first import/def line
   that parses is taken, and the program is its top-level imports plus the last ``build_model`` definition.
3. Otherwise the text is a body: it ends at the first non-blank line indented less than the body's first
   line (the model went back to module level); it is dedented, re-indented under the function header, and
   cut to its longest parseable prefix of lines.

In every case the function body is cut after its first top-level ``return`` (anything after it is dead
code, typically a usage example the model kept writing). A function with no statement left, or one that can
only return None (no ``return <value>`` and no ``raise``: usually a generation cut off before its end), is
rejected without running it. A complete definition keeps its own parameter names; a body is placed under
the prompt's header. Text that yields no usable function is an error (:class:`Extraction` with
``code=None``; the environment reports it as status ``invalid-output``).
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

__all__ = ["Extraction", "extract_function", "find_banned", "answer_class", "answer_configuration", "FUNCTION_NAME",
           "HEADER", "NO_CODE", "UNKNOWN_CLASS"]

FUNCTION_NAME = "build_model"
HEADER = "def build_model(x_train: np.ndarray, y_train: np.ndarray):"
PRELUDE = "import numpy as np\n"
MAX_CHARS = 20_000  # longer actions are cut (an LLM action is at most a few hundred tokens)
MAX_LINES = 400

_FENCE = re.compile(r"^[ \t]*```[^\n]*$", re.MULTILINE)


@dataclass
class Extraction:
    """Result of :func:`extract_function`: ``code`` is a complete program defining ``build_model`` or None."""

    code: str | None
    error: str | None = None
    form: str = ""  # "body" or "function"

    @property
    def ok(self) -> bool:
        return self.code is not None


def _fenced_blocks(text: str) -> list[str]:
    marks = list(_FENCE.finditer(text))
    if not marks:
        return []
    blocks = []
    i = 0
    while i < len(marks):
        start = marks[i].end() + 1
        if i + 1 < len(marks):
            blocks.append(text[start : marks[i + 1].start()])
            i += 2
        else:  # unterminated: generation stopped inside the block
            blocks.append(text[start:])
            i += 1
    return blocks


def _strip_fences(text: str) -> str:
    blocks = _fenced_blocks(text)
    if not blocks:
        return text
    for block in blocks:
        if re.search(rf"^\s*def\s+{FUNCTION_NAME}\s*\(", block, re.MULTILINE):
            return block
    # A body continuation may precede a fence opened by a chatty model ("    x = 1\n```"): keep the prefix
    # if it looks like code, else take the first block.
    before = text[: _FENCE.search(text).start()]
    if before.strip() and _parses_as_body(before):
        return before
    return blocks[0]


def _parses_as_body(text: str) -> bool:
    try:
        ast.parse("def f():\n" + textwrap.indent(textwrap.dedent(text), "    "))
        return True
    except SyntaxError:
        return False


def _longest_parseable_prefix(lines: list[str], wrap) -> tuple[ast.Module, str] | None:
    """The longest ``lines[:k]`` (k >= 1) whose ``wrap``-ed source parses; returns (tree, source)."""
    for k in range(len(lines), 0, -1):
        if not lines[k - 1].strip():
            continue  # same program as a shorter prefix
        source = wrap(lines[:k])
        try:
            return ast.parse(source), source
        except (SyntaxError, ValueError):  # ValueError: null bytes
            continue
    return None


def _cut_after_return(func: ast.FunctionDef) -> None:
    for i, stmt in enumerate(func.body):
        if isinstance(stmt, ast.Return):
            del func.body[i + 1 :]
            return


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _returns_value(func: ast.FunctionDef) -> bool:
    """Whether ``func`` itself (not a nested def/class) has a ``return <value>`` or a ``raise``.

    Without either it can only return None: typically a generation cut off before its ``return``.
    """
    stack = list(func.body)
    while stack:
        node = stack.pop()
        if (isinstance(node, ast.Return) and node.value is not None) or isinstance(node, ast.Raise):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _render(func: ast.FunctionDef, imports: list[ast.stmt], source: str, form: str) -> Extraction:
    _cut_after_return(func)
    if not [s for s in func.body if not _is_docstring(s) and not isinstance(s, ast.Pass)]:
        return Extraction(None, "the function body is empty: write statements that build and return a model", form)
    if not _returns_value(func):
        return Extraction(None, "build_model never returns a model (no return statement; was the answer cut off?)", form)
    # A complete definition keeps its own parameter names (the body may use them); a body gets the prompt's.
    header = HEADER if form == "body" else f"def {FUNCTION_NAME}({ast.unparse(func.args)}):"
    lines = source.splitlines()
    first = func.body[0]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    if start > func.lineno:
        # The original text of the statements keeps the model's comments and layout.
        body_src = textwrap.indent(textwrap.dedent("\n".join(lines[start - 1 : func.body[-1].end_lineno])), "    ")
    else:  # the body shares its line with the header (def build_model(x, y): return ...)
        body_src = textwrap.indent("\n".join(ast.unparse(s) for s in func.body), "    ")
    import_lines = []
    for imp in imports:
        line = ast.get_source_segment(source, imp)
        if line and line.strip() != PRELUDE.strip() and line not in import_lines:
            import_lines.append(line)
    import_src = "".join(line + "\n" for line in import_lines)
    code = PRELUDE + import_src + "\n\n" + header + "\n" + body_src.rstrip() + "\n"
    try:
        ast.parse(code)
    except SyntaxError:  # e.g. odd indentation inside a multi-line expression: fall back to the AST
        body_src = textwrap.indent("\n".join(ast.unparse(s) for s in func.body), "    ")
        code = PRELUDE + import_src + "\n\n" + header + "\n" + body_src + "\n"
    return Extraction(code, None, form)


def _as_function(text: str) -> Extraction | None:
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        if re.match(rf"\s*def\s+{FUNCTION_NAME}\s*\(", line):
            start = i
            break
    if start is None:
        return None
    # Include imports written just before the def (a whole-module answer).
    first = start
    while first > 0 and (not lines[first - 1].strip() or re.match(r"\s*(import|from)\s", lines[first - 1])
                         or lines[first - 1].lstrip().startswith("#")):
        first -= 1
    chunk = textwrap.dedent("\n".join(lines[first:])).splitlines()
    found = _longest_parseable_prefix(chunk, lambda ls: "\n".join(ls) + "\n")
    if found is None:
        return Extraction(None, "the text defines build_model but it is not valid Python", "function")
    tree, source = found
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == FUNCTION_NAME]
    if not funcs:
        return Extraction(None, "the definition of build_model is not valid Python", "function")
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return _render(funcs[-1], imports, source, "function")


def _as_body(text: str) -> Extraction:
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    # A first line that only closes/annotates the docstring line (e.g. "  # comment") is kept: comments parse.
    if not lines:
        return Extraction(None, "the answer is empty: no code was generated", "body")
    indent = len(lines[0]) - len(lines[0].lstrip())
    if indent > 0:
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() and len(line) - len(line.lstrip()) < indent:
                lines = lines[:i]  # back at module level: the function ended
                break
    body = textwrap.dedent("\n".join(lines)).splitlines()

    def wrap(ls: list[str]) -> str:
        return "def build_model(x_train, y_train):\n" + "\n".join("    " + line if line.strip() else "" for line in ls) + "\n"

    found = _longest_parseable_prefix(body, wrap)
    if found is None:
        return Extraction(None, "no valid Python code was found in the answer", "body")
    tree, source = found
    return _render(tree.body[0], [], source, "body")


def extract_function(action: str) -> Extraction:
    """Build a complete program ``import numpy as np`` + ``def build_model(...)`` from an action.

    Returns an :class:`Extraction`; ``code`` is None (with ``error`` set) when nothing usable was found.
    """
    if not isinstance(action, str):
        return Extraction(None, f"the action must be a string, got {type(action).__name__}")
    # Bound the work: the prefix search parses up to one candidate per line (actions are ~256 tokens).
    text = action[:MAX_CHARS]
    text = "\n".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:MAX_LINES])
    text = text.replace("\t", "    ").replace("\x00", "")
    text = _strip_fences(text)
    result = _as_function(text)
    if result is not None and result.ok:
        return result
    body = _as_body(text)
    if body.ok or result is None:
        return body
    return result


def find_banned(code: str, banned: tuple[str, ...] | list[str]) -> str | None:
    """Return the first banned name used by ``code`` (identifiers, attributes, imports, strings), else None.

    Comments are ignored (they are not in the AST); a banned word inside a string still counts, since
    ``getattr(module, "GridSearchCV")`` would use it.
    """
    if not banned:
        return None
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return next((b for b in banned if b in code), None)
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.alias):
            words.extend([node.name, node.asname or ""])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.append(node.value)
        for word in words:
            for b in banned:
                if b in word:
                    return b
    return None


NO_CODE = "(no code)"  # the answer held no usable build_model
UNKNOWN_CLASS = "(unknown)"  # a build_model whose returned estimator could not be read off the source
# Calls that return one of their arguments' estimators: the class is that estimator's
_PIPELINES = ("make_pipeline", "Pipeline")


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _estimator_call(expr: ast.expr | None, assigned: dict[str, ast.expr], depth: int = 0) -> ast.Call | None:
    """The constructor call an expression builds its estimator with: ``RandomForestClassifier(...)`` itself; a name
    is followed to what was assigned to it, ``x.fit(...)`` to ``x`` (fit returns the estimator), a pipeline to its
    last step."""
    if expr is None or depth > 8:
        return None
    if isinstance(expr, ast.Name):
        return _estimator_call(assigned.get(expr.id), assigned, depth + 1) if expr.id in assigned else None
    if not isinstance(expr, ast.Call):
        return None
    name = _called_name(expr.func)
    if name == "fit" and isinstance(expr.func, ast.Attribute):
        return _estimator_call(expr.func.value, assigned, depth + 1)
    if name == "make_pipeline" and expr.args:
        return _estimator_call(expr.args[-1], assigned, depth + 1)
    if name == "Pipeline":
        steps = expr.args[0] if expr.args else next((k.value for k in expr.keywords if k.arg == "steps"), None)
        if isinstance(steps, (ast.List, ast.Tuple)) and steps.elts:
            last = steps.elts[-1]
            if isinstance(last, ast.Tuple) and len(last.elts) == 2:
                return _estimator_call(last.elts[1], assigned, depth + 1)
        return None
    return expr if name is not None else None


def _returned_call(code: str | None) -> ast.Call | str:
    """The constructor call of the estimator ``build_model`` returns, or :data:`NO_CODE` / :data:`UNKNOWN_CLASS`."""
    if code is None:
        return NO_CODE
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return UNKNOWN_CLASS
    func = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == FUNCTION_NAME), None)
    if func is None:
        return UNKNOWN_CLASS
    assigned: dict[str, ast.expr] = {}
    nodes = sorted((n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.Return))), key=lambda n: n.lineno)
    for node in nodes:  # in source order: the last assignment to a name before the return wins
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned[node.targets[0].id] = node.value
        elif isinstance(node, ast.Return) and node.value is not None:
            found = _estimator_call(node.value, assigned)
            return found if found is not None else UNKNOWN_CLASS
    return UNKNOWN_CLASS


def answer_class(code: str | None) -> str:
    """The class of an answer: the name of the estimator its ``build_model`` returns, read off the source
    (``RandomForestClassifier``, ``LogisticRegression`` -- a pipeline counts as its last step, a wrapper such as
    ``CalibratedClassifierCV`` as itself). :data:`NO_CODE` when there is no program (``code`` None, as
    :func:`extract_function` gives for an unusable answer), :data:`UNKNOWN_CLASS` when the returned value cannot be
    traced to a constructor. Answers of one class choose the same model and differ in details (arguments,
    preprocessing): what a run learns to prefer shows as the classes' shares over its batches."""
    call = _returned_call(code)
    return call if isinstance(call, str) else _called_name(call.func)


def answer_configuration(code: str | None) -> str:
    """The class with the arguments its constructor is given, as written: ``RandomForestClassifier(max_samples=1000,
    random_state=0)`` -- positional arguments first, keywords sorted by name, values as source text (a name stays a
    name). Finer than :func:`answer_class`, for a dataset where the better answer is an argument of the common
    class (tic_tac_toe's ``max_samples``). :data:`NO_CODE` / :data:`UNKNOWN_CLASS` as there."""
    call = _returned_call(code)
    if isinstance(call, str):
        return call
    parts = [ast.unparse(a) for a in call.args]
    parts += [f"{k.arg}={ast.unparse(k.value)}" if k.arg else f"**{ast.unparse(k.value)}"
              for k in sorted(call.keywords, key=lambda k: k.arg or "")]
    return f"{_called_name(call.func)}({', '.join(parts)})"
