"""The shape of the package's code, checked with ``ast`` so that it stays as agreed.

Three rules over every module of ``contrans_tl/``:

* no function or method is longer than :data:`MAX_LINES` lines or takes more than
  :data:`MAX_PARAMS` parameters;
* no module uses another ``contrans_tl`` module's underscore (private) name, neither
  imported (``from contrans_tl.x import _y``, relative imports too) nor reached as an
  attribute (``contrans_tl.x._y``, ``x._y`` after ``from contrans_tl import x``);
* nothing in ``contrans_tl/analysis/`` imports the evaluation pipelines
  (``contrans_tl.evals``, ``contrans_tl.pipelines``) or the CLI (``contrans_tl.cli``).

Each test lists every offender in one failure message. A last test plants offenders in
synthetic source, so a scanner that finds nothing cannot pass the rules by accident.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "contrans_tl"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 100
MAX_PARAMS = 15
ANALYSIS_MUST_NOT_IMPORT = ("contrans_tl.evals", "contrans_tl.pipelines", "contrans_tl.cli")


@dataclass(frozen=True)
class Module:
    """One source file of the package: its dotted name, path and syntax tree."""

    name: str
    path: Path
    tree: ast.Module
    is_package: bool

    @property
    def package(self) -> str:
        """The package relative imports of this module start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    """``contrans_tl/analysis/plots.py`` -> ``contrans_tl.analysis.plots``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_module(path: Path, root: Path = ROOT) -> Module:
    return Module(
        name=module_name(path, root),
        path=path,
        tree=ast.parse(path.read_text(encoding="utf-8"), filename=str(path)),
        is_package=path.name == "__init__.py",
    )


def package_modules(root: Path = ROOT) -> list[Module]:
    return [parse_module(p, root) for p in sorted(root.rglob("*.py"))]


def is_private(name: str) -> bool:
    """An underscore name that is not a dunder (``_x`` yes, ``__version__`` no)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True, order=True)
class Offender:
    """One place that breaks a rule, sortable by file and line."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.what}"


def offender(module: Module, node: ast.AST, what: str, root: Path) -> Offender:
    rel = module.path.relative_to(root.parent).as_posix()
    return Offender(rel, getattr(node, "lineno", 0), what)


# --- rule 1: function length and parameter count ----------------------------------------


def count_params(fn: ast.FunctionDef | ast.AsyncFunctionDef, *, is_method: bool) -> int:
    """Parameters a caller can pass: positional-only, positional-or-keyword and
    keyword-only ones, plus one each for ``*args`` and ``**kwargs``.

    ``self`` or ``cls`` is not counted when it is the first parameter of a function
    defined directly in a class body (the caller does not pass it).
    """
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    n = len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    if is_method and positional and positional[0].arg in ("self", "cls"):
        n -= 1
    return n


def functions(tree: ast.AST) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """Every function and method, nested ones too, with whether it is a method."""
    methods = {
        id(node)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    return [
        (node, id(node) in methods)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def shape_offenders(modules: list[Module], root: Path = ROOT) -> list[Offender]:
    """Functions longer than MAX_LINES (``def`` line to last line, docstring included,
    decorators not) or with more than MAX_PARAMS parameters."""
    out = []
    for m in modules:
        for fn, is_method in functions(m.tree):
            lines = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
            params = count_params(fn, is_method=is_method)
            problems = []
            if lines > MAX_LINES:
                problems.append(f"{lines} lines")
            if params > MAX_PARAMS:
                problems.append(f"{params} parameters")
            if problems:
                out.append(offender(m, fn, f"{fn.name}: {', '.join(problems)}", root))
    return sorted(out)


# --- rules 2 and 3: what a module imports -----------------------------------------------


def is_package_module(dotted: str, root: Path = ROOT) -> bool:
    """Whether ``dotted`` names a module or package of the package (on disk)."""
    parts = dotted.split(".")
    if parts[0] != root.name:
        return False
    base = root.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_from(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@dataclass(frozen=True)
class ImportUse:
    """A module of the package that ``module`` uses, and the name it uses there."""

    node: ast.AST
    target: str  # the module used (absolute dotted name)
    name: str | None  # the name used in it, None for the module itself


def import_uses(module: Module, root: Path = ROOT) -> list[ImportUse]:
    """Every use of a ``contrans_tl`` module by ``module``: imports, ``from`` imports and
    attribute access on a name bound to a module (``x._y``, ``contrans_tl.x._y``)."""
    uses: list[ImportUse] = []
    bound: dict[str, str] = {}  # local name -> the package module it is bound to
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != root.name:
                    continue
                uses.append(ImportUse(node, alias.name, None))
                if alias.asname:  # import contrans_tl.x as m: m is contrans_tl.x
                    bound[alias.asname] = alias.name
                else:  # import contrans_tl.x: binds contrans_tl
                    bound[root.name] = root.name
        elif isinstance(node, ast.ImportFrom):
            source = imported_from(module, node)
            if source.split(".")[0] != root.name:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if is_package_module(full, root):
                    uses.append(ImportUse(node, full, None))
                    bound[alias.asname or alias.name] = full
                else:
                    uses.append(ImportUse(node, source, alias.name))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute):
            use = _attribute_use(node, bound, root)
            if use is not None:
                uses.append(use)
    return uses


def _attribute_use(node: ast.Attribute, bound: dict[str, str], root: Path) -> ImportUse | None:
    """For ``name.a.b.c`` with ``name`` bound to a module and ``a``, ``b`` modules in turn:
    the use of ``c`` in ``name.a.b`` (``None`` when ``c`` is itself a module, or the chain
    is not one of modules; the inner ``Attribute`` nodes are looked at on their own)."""
    attrs = []
    inner: ast.expr = node
    while isinstance(inner, ast.Attribute):
        attrs.append(inner.attr)
        inner = inner.value
    if not isinstance(inner, ast.Name) or inner.id not in bound:
        return None
    *path, last = [bound[inner.id], *reversed(attrs)]
    current = path[0]
    for attr in path[1:]:
        current = f"{current}.{attr}"
        if not is_package_module(current, root):
            return None
    if is_package_module(f"{current}.{last}", root):
        return None
    return ImportUse(node, current, last)


def private_offenders(modules: list[Module], root: Path = ROOT) -> list[Offender]:
    """Underscore names (and underscore modules) of one module used by another."""
    out = []
    for m in modules:
        for use in import_uses(m, root):
            if use.target == m.name:
                continue
            private_module = any(is_private(p) for p in use.target.split("."))
            if private_module or (use.name is not None and is_private(use.name)):
                what = use.target + (f".{use.name}" if use.name else "")
                out.append(offender(m, use.node, f"uses {what}", root))
    return sorted(out)


def layering_offenders(modules: list[Module], root: Path = ROOT) -> list[Offender]:
    """Imports of the evaluation pipelines or the CLI from ``contrans_tl.analysis``."""
    analysis = f"{root.name}.analysis"
    banned = [root.name + name[len(PACKAGE) :] for name in ANALYSIS_MUST_NOT_IMPORT]
    out = []
    for m in modules:
        if not (m.name == analysis or m.name.startswith(analysis + ".")):
            continue
        for use in import_uses(m, root):
            full = use.target + (f".{use.name}" if use.name else "")
            if any(use.target == b or use.target.startswith(b + ".") for b in banned):
                full = use.target  # one line per imported module, not per name
            if any(full == b or full.startswith(b + ".") for b in banned):
                out.append(offender(m, use.node, f"imports {full}", root))
    return sorted(set(out))


# --- the rules ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    found = package_modules()
    assert len(found) > 10, f"found only {len(found)} modules under {ROOT}"
    return found


def test_no_function_is_too_long_or_takes_too_many_parameters(modules):
    offenders = shape_offenders(modules)
    assert not offenders, (
        f"{len(offenders)} functions exceed {MAX_LINES} lines or {MAX_PARAMS} parameters "
        "(split them into named helpers, or group settings into a config dataclass):\n"
        + "\n".join(map(str, offenders))
    )


def test_no_module_uses_another_modules_private_names(modules):
    offenders = private_offenders(modules)
    assert not offenders, (
        f"{len(offenders)} uses of another module's underscore name (make it public, with "
        "a docstring, or move the code that needs it):\n" + "\n".join(map(str, offenders))
    )


def test_analysis_does_not_import_the_evaluation_pipelines_or_the_cli(modules):
    offenders = layering_offenders(modules)
    assert not offenders, (
        f"{len(offenders)} imports of {', '.join(ANALYSIS_MUST_NOT_IMPORT)} from "
        "contrans_tl.analysis (analysis must stay below the pipelines):\n"
        + "\n".join(map(str, offenders))
    )


# --- the scanner finds what it should ----------------------------------------------------

_PLANTED = {
    "__init__.py": "",
    "core.py": "def _hidden():\n    pass\n\ndef fine(a, b, /, c, *args, d, **kw):\n    pass\n",
    "analysis/__init__.py": "from ..core import fine\n",
    "analysis/bad.py": (
        "import contrans_tl.core\n"
        "import contrans_tl.core as cc\n"
        "from contrans_tl import core, evals\n"
        "from contrans_tl.core import _hidden, fine\n"
        "from ..core import _hidden as h2\n"
        "from contrans_tl.pipelines.emotion import run\n"
        "x = contrans_tl.core._hidden\n"
        "y = cc._hidden, core._hidden, core.fine, core.__name__\n"
        "class K:\n"
        "    def method(self, " + ", ".join(f"p{i}" for i in range(15)) + "):\n"
        "        pass\n"
        "def many(" + ", ".join(f"p{i}" for i in range(16)) + "):\n"
        "    pass\n"
        "def long():\n" + "    x = 1\n" * 100
    ),
    "evals/__init__.py": "",
    "pipelines/__init__.py": "",
    "pipelines/emotion.py": "def run():\n    from contrans_tl.core import _hidden\n",
}


def test_the_scanner_finds_planted_offenders(tmp_path):
    root = tmp_path / PACKAGE
    for rel, text in _PLANTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    mods = package_modules(root)
    assert {m.name for m in mods} >= {"contrans_tl", "contrans_tl.analysis.bad"}

    shape = [(o.path, o.what) for o in shape_offenders(mods, root)]
    assert shape == [
        ("contrans_tl/analysis/bad.py", "many: 16 parameters"),
        ("contrans_tl/analysis/bad.py", "long: 101 lines"),
    ]
    private = [(o.path, o.line, o.what) for o in private_offenders(mods, root)]
    bad = "contrans_tl/analysis/bad.py"
    hidden = "uses contrans_tl.core._hidden"
    assert private == [
        (bad, 4, hidden),  # from contrans_tl.core import _hidden
        (bad, 5, hidden),  # from ..core import _hidden as h2
        (bad, 7, hidden),  # contrans_tl.core._hidden
        (bad, 8, hidden),  # cc._hidden
        (bad, 8, hidden),  # core._hidden
        ("contrans_tl/pipelines/emotion.py", 2, hidden),  # inside a function
    ]
    layering = [(o.line, o.what) for o in layering_offenders(mods, root)]
    assert layering == [
        (3, "imports contrans_tl.evals"),
        (6, "imports contrans_tl.pipelines.emotion"),
    ]
