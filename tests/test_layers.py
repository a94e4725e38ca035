"""The layers of the design card, enforced: a change that imports across a layer fails here, naming the import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> folder, as pyproject.toml maps them
    "lorabatch": "client",
    "lorabatch.schemas": "schemas",
    "lorabatch.store": "store",
    "lorabatch.producer": "producer",
    "lorabatch.worker": "worker",
    "lorabatch.demo": "demo",
    "lorabatch.cli": "cli",
}
HEAVY = ("torch", "transformers", "peft", "safetensors", "tokenizers")

# (modules under this package, may not import these prefixes, why)
RULES = [
    ("lorabatch.schemas", ("lorabatch.store", "lorabatch.producer", "lorabatch.worker", "lorabatch.cli",
                           "lorabatch.demo", "celery", "kombu", *HEAVY), "schemas are the contracts both sides share"),
    ("lorabatch.store", ("lorabatch.producer", "lorabatch.worker", "lorabatch.cli", "lorabatch.demo", *HEAVY),
     "the shared store serves both sides and never needs torch"),
    ("lorabatch.producer", ("lorabatch.worker", "lorabatch.cli", "lorabatch.demo", *HEAVY),
     "the producer never imports the worker; a producer-only install has no torch"),
    ("lorabatch.worker", ("lorabatch.producer", "lorabatch.cli"), "the worker never imports the producer"),
    ("lorabatch.worker.engine", ("celery", "kombu", "sqlalchemy", "redis", "lorabatch.store", "lorabatch.producer",
                                 "lorabatch.worker.runner", "lorabatch.worker.tasks", "lorabatch.worker.service",
                                 "lorabatch.worker.feed", "lorabatch.cli"),
     "the engine knows nothing of Celery, SQL or the store"),
    ("lorabatch.demo", ("lorabatch.store", "lorabatch.producer", "lorabatch.worker", "lorabatch.cli", "celery",
                        "sqlalchemy"), "the demo builder only builds files"),
]
OPTIONAL = {("lorabatch.producer.prompt_check", "transformers")}
"""Imports allowed across a rule because they are optional: guarded, used only when already installed
(the submit-time prompt-length check uses a local tokenizer when there is one)."""
CLIENT_RULE = ("lorabatch.worker", "lorabatch.cli", "lorabatch.demo", *HEAVY)


def modules() -> dict[str, Path]:
    """Every module's import name -> its file."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "lorabatch" and any(p in PACKAGES.values() for p in rel.parts[:1]):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, *, typing_blocks: bool = True) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-level ones included; with
    ``typing_blocks=False``, not those under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if not typing_blocks:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")[: len(name.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}" if mod.startswith("lorabatch") else mod) for a in node.names]
    return out


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def violations() -> list[str]:
    found = []
    for name, path in modules().items():
        rules = [(forbidden, why) for pkg, forbidden, why in RULES if _under(name, pkg)]
        if path.parent == REPO / "client":
            rules.append((CLIENT_RULE, "the Python client works on a producer-only install"))
        for line, imported in imports_of(name, path):
            for forbidden, why in rules:
                for prefix in forbidden:
                    if _under(imported, prefix) and (name, prefix) not in OPTIONAL:
                        found.append(f"{_shown(path)}:{line} imports {imported} ({why})")
    return found


def test_no_module_imports_across_its_layer():
    """Producer never imports the worker, the worker never the producer, the engine neither Celery nor SQL."""
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a producer module importing the worker is reported with its line."""
    fake = tmp_path / "bad.py"
    fake.write_text("import os\nfrom lorabatch.worker.engine import Engine\n")
    assert imports_of("lorabatch.producer.bad", fake) == [(1, "os"), (2, "lorabatch.worker.engine.Engine")]
    monkeypatch.setitem(PACKAGES, "lorabatch.producer", str(tmp_path))
    assert any("bad.py:2 imports lorabatch.worker.engine.Engine" in v for v in violations())


def test_no_import_cycles_between_modules():
    """No cycle among lorabatch's modules, counting imports inside functions too (they hide cycles)."""
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for _, imported in imports_of(name, path, typing_blocks=False):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not _under(name, imported):
                graph[name].add(imported)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("module", ["lorabatch.cli.main", "lorabatch", "lorabatch.producer.submit",
                                    "lorabatch.producer.export", "lorabatch.store.lifecycle"])
def test_producer_side_imports_no_torch(module):
    """The CLI and the producer load without torch, as on a producer-only install."""
    code = f"import sys, {module}; bad = [m for m in {HEAVY!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_without_torch_names_the_extra(tmp_path):
    """`lorabatch worker` on a producer-only install: one line naming the worker extra, exit 2."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util as u\n_find = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name.split('.')[0] in ('torch', 'peft') else _find(name, *a, **k)\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "lorabatch.cli", "worker"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "pip install 'lorabatch[worker]'" in r.stderr and "torch" in r.stderr


def test_modules_stay_small():
    """No module over about 300 lines unless its docstring says why."""
    big = []
    for name, path in modules().items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 320 and "over 300 lines" not in doc:
            big.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert big == []
