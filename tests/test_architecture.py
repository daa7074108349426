"""The architecture, held: packages by role, every import arrow pointing down, no cycle.

    cli                                   argument parsing and printing
    dicom, web, observe                   the fronts and what reports on the appliance (never each other)
    jobs                                  import, export, lifecycle, scrub, fsck, off-site copies
    admin                                 a home made (init, restore's new home), systemd units
    store, audit                          the archive and its catalog; the trail (never each other)
    format, backends, security, ...       pure codecs, tiers, who may do what, the audit vocabulary
    config, errors, fsutil, human         what everything stands on

A module may import a module of its own package, or of any layer below its own; nothing
above it, nothing beside it. The layers are kept here, read from the source with `ast`
(imports inside functions count too), so that a wrong-way arrow fails the build."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "appliance"
LAYERS = [
    ["appliance.__main__"],
    ["appliance.cli"],
    ["appliance.dicom", "appliance.web", "appliance.observe"],
    ["appliance.jobs"],
    ["appliance.admin"],
    ["appliance.store", "appliance.audit"],
    # The audit vocabulary (pure) and the server's counters are used by the layers above.
    ["appliance.format", "appliance.backends", "appliance.security", "appliance.audit.events",
     "appliance.audit.chain", "appliance.observe.metrics"],
    ["appliance.config", "appliance.fsutil", "appliance.human"],
    ["appliance.errors", "appliance"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The appliance modules `name` imports (a name imported from a package counts as its module when
    it is one)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - \
                                node.level + 1] + ([base] if base else []))
            if not base.startswith("appliance"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("appliance"))
    return out - {name}


def _place(name: str) -> tuple[int, str]:
    """(layer, the prefix that put it there): the longest prefix listed."""
    best = max((prefix for layer in LAYERS for prefix in layer if name == prefix or name.startswith(prefix + ".")),
               key=len)
    return next(number for number, layer in enumerate(LAYERS) if best in layer), best


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def wrong_way_arrows() -> list[str]:
    wrong = []
    for name in sorted(MODULES):
        layer, _ = _place(name)
        for target in sorted(_imports(name)):
            target_layer, _ = _place(target)
            if _package(name) == _package(target) and name != "appliance":
                continue  # inside one package
            if target_layer <= layer:
                wrong.append(f"{name} -> {target}")
    return wrong


def cycles() -> list[list[str]]:
    graph = {name: sorted(t for t in _imports(name) if t in MODULES) for name in MODULES}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def test_every_module_has_a_layer():
    for name in MODULES:
        _place(name)  # raises when no prefix fits


def test_every_arrow_points_down():
    assert wrong_way_arrows() == []


def test_no_import_cycle():
    assert cycles() == []


MAX_LINES = 680  # "no module over ~600 lines": the largest codecs (p10, transcode, sealed) are near it


def test_no_module_over_600_lines_or_so():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# The only code that writes the index: its engine and the catalog (store/catalog/).
INDEX_WRITERS = ("appliance.store.index", "appliance.store.catalog")
_WRITE_METHODS = {"put", "delete", "dup_add", "dup_remove", "dup_clear"}


def index_writes(sources: dict[str, str] | None = None) -> list[str]:
    """Calls outside the catalog that write the index: a transaction's put/delete/dup_* on one of
    the index's databases, or an index's write(); or a reach for the archive's private index."""
    from appliance.store import index

    databases = set(index._PLAIN_DBS) | set(index._DUP_DBS)
    found = []
    for name, source in (sources or {n: p.read_text() for n, p in MODULES.items()}).items():
        if name.startswith(INDEX_WRITERS):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr == "_index" and ast.unparse(node.value) != "self":
                found.append(f"{name}:{node.lineno} reaches for the archive's index")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            first = node.args[0] if node.args else None
            if node.func.attr in _WRITE_METHODS and isinstance(first, ast.Constant) and first.value in databases:
                found.append(f"{name}:{node.lineno} {node.func.attr}({first.value!r})")
            if node.func.attr == "write" and "index" in ast.unparse(node.func.value).lower():
                found.append(f"{name}:{node.lineno} {ast.unparse(node.func)}()")
    return found


def test_only_the_catalog_writes_the_index():
    assert index_writes() == []


def test_the_index_check_catches_a_write_outside_the_catalog():
    rogue = ('def mark(archive, ca, t):\n    t.put("blobs", ca, {})\n    archive.index.write(lambda t: None)\n'
             '    archive._index.write(lambda t: None)\n')
    assert len(index_writes({"appliance.jobs.rogue": rogue})) == 4


@pytest.mark.parametrize("bad", ["appliance.store -> appliance.jobs", "appliance.format -> appliance.store"])
def test_the_check_catches_a_wrong_way_arrow(bad, monkeypatch):
    """The check itself can fail: a store module importing a job, a codec importing the store."""
    source, target = (part.strip() for part in bad.split("->"))
    victim = next(name for name in sorted(MODULES) if name.startswith(source + "."))
    real = _imports
    monkeypatch.setitem(globals(), "_imports", lambda name: real(name) | ({next(
        m for m in sorted(MODULES) if m.startswith(target + "."))} if name == victim else set()))
    assert any(arrow.startswith(victim + " -> ") for arrow in wrong_way_arrows())
