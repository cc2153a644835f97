"""The package's shape, enforced: imports flow one way through the layers, no cycles, and mypy
is clean. README's "Where things are" draws the same layers.

Every import counts, wherever it stands (module level, inside a function, under
TYPE_CHECKING): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "exchanged"

# Lowest first. A module may import modules of its own layer or of a lower one, never higher.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaf helpers", ("exchanged", "exchanged.errors", "exchanged.common")),
    ("pki", ("exchanged.pki",)),
    ("store", ("exchanged.store",)),
    ("roles", ("exchanged.roles",)),
    ("exchange model and CA", ("exchanged.ca", "exchanged.package", "exchanged.receipts",
                               "exchanged.box", "exchanged.archive")),
    ("transport", ("exchanged.transport",)),
    ("node", ("exchanged.node",)),
    ("control client", ("exchanged.client",)),
    ("command line", ("exchanged.cli", "exchanged.__main__")),
]

# Third-party modules some of ours must never import.
FORBIDDEN = {
    # the wire protocol is sans-IO: bytes in, events out
    "exchanged.transport.protocol": {"trio", "ssl", "socket", "asyncio", "selectors", "anyio",
                                     "OpenSSL", "select"},
    # a local command starts fast: no event loop, no TLS bridge
    "exchanged.node.wire": {"trio"},
    "exchanged.client": {"trio"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def imports_of(path: Path, name: str, known: Iterable[str]) -> tuple[set[str], set[str]]:
    """(modules of ours, top-level third-party names) that `path` (module `name`) imports."""
    known = set(known)
    ours: set[str] = set()
    others: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` depends on the module
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                while t not in known and "." in t:
                    t = t.rpartition(".")[0]
                if t != name:
                    ours.add(t)
            else:
                others.add(t.split(".")[0])
    return ours, others


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules(root)
    ours, others = {}, {}
    for name, path in found.items():
        ours[name], others[name] = imports_of(path, name, found)
    return ours, others


def layer_of(name: str) -> int:
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    if where is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS and to the README")
    return where


def violations(deps: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(deps.items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                out.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} "
                           f"({LAYERS[layer_of(t)][0]}), a higher layer")
    for mod, targets in sorted(deps.items()):
        if "exchanged.cli" in targets and mod != "exchanged.__main__":
            out.append(f"{mod} imports the command line; only the entry point may")
    return out


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


def packages(deps: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages (exchanged.pki, .store, .transport, .node) and the
    top-level modules."""
    def pkg(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else m
    out: dict[str, set[str]] = {}
    for m, targets in deps.items():
        out.setdefault(pkg(m), set()).update(pkg(t) for t in targets if pkg(t) != pkg(m))
    return out


# -- the contracts ----------------------------------------------------------------------------

DEPS, THIRD_PARTY = graph(ROOT)


def test_the_walk_sees_the_package() -> None:
    assert "exchanged.pki.token" in DEPS and "exchanged.node.service" in DEPS
    assert "exchanged.pki.token" in DEPS["exchanged.pki.operator"]
    assert "trio" in THIRD_PARTY["exchanged.node.service"]


def test_imports_flow_one_way() -> None:
    assert violations(DEPS) == []


def test_pki_is_pure() -> None:
    """pki imports no store, roles, transport, node or command line (it is also the layer
    rule; said again here so that a failure reads plainly)."""
    bad = {m: {t for t in ts if not t.startswith(("exchanged.pki", "exchanged.errors",
                                                   "exchanged.common"))}
           for m, ts in DEPS.items() if m.startswith("exchanged.pki")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_store_never_imports_transport_or_node() -> None:
    bad = {m: {t for t in ts if t.startswith(("exchanged.transport", "exchanged.node",
                                              "exchanged.roles", "exchanged.cli"))}
           for m, ts in DEPS.items() if m.startswith("exchanged.store")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_forbidden_third_party_imports() -> None:
    for mod, banned in FORBIDDEN.items():
        assert mod in THIRD_PARTY, f"{mod} is gone: update FORBIDDEN"
        assert not THIRD_PARTY[mod] & banned, f"{mod} imports {THIRD_PARTY[mod] & banned}"


def test_no_cycles_between_modules_or_packages() -> None:
    assert cycles(DEPS) == []
    assert cycles(packages(DEPS)) == []


def test_mypy_is_clean() -> None:
    p = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MYPY_CACHE_DIR": str(ROOT / ".mypy_cache")})
    assert p.returncode == 0, p.stdout + p.stderr


# -- the checker itself catches what it must --------------------------------------------------

def test_checker_finds_a_broken_never(tmp_path: Path) -> None:
    """A lazy import of the store inside pki, and a cycle, written as files and found."""
    pkg = tmp_path / PACKAGE
    for d in (pkg, pkg / "pki", pkg / "store"):
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
    (pkg / "pki" / "token.py").write_text("def f():\n    from ..store import db\n")
    (pkg / "store" / "db.py").write_text("from exchanged.store import audit\n")
    (pkg / "store" / "audit.py").write_text("import exchanged.store.db\n")
    (pkg / "roles.py").write_text("from exchanged import cli\n")
    (pkg / "cli.py").write_text("")
    deps, _ = graph(tmp_path)
    found = violations(deps)
    assert any("exchanged.pki.token" in v and "exchanged.store.db" in v for v in found), found
    assert any("imports the command line" in v for v in found), found
    assert cycles(deps) == [["exchanged.store.audit", "exchanged.store.db"]]


def test_the_daemon_does_not_load_numpy_or_pandas() -> None:
    """sqlite-utils imports numpy and pandas when they are installed (numpy is, in the test
    environment: matplotlib needs it); the daemon never uses them and numpy alone was 12 MiB of
    its idle resident memory. Failed before the store package hid them from sqlite-utils."""
    import importlib.util
    assert importlib.util.find_spec("numpy") is not None  # else this test proves nothing
    out = subprocess.run(
        [sys.executable, "-c", "import sys, exchanged.node.service, exchanged.cli; "
         "print(sorted(m for m in ('numpy', 'pandas') if m in sys.modules)); "
         "import numpy; print('importable')"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split("\n")
    assert out[:2] == ["[]", "importable"], out


def test_the_daemon_is_started_without_the_rest_of_the_command_line(tmp_path: Path) -> None:
    """`exchanged serve` leaves out exchanged.cli and the CA's code (about 0.8 MiB of the idle
    daemon's resident memory), through the console script's own module, as systemd starts it;
    it fails as the command line does (one line, exit 1). Help and a wrong option still go to
    the full command line. Failed before the dispatch in exchanged/__main__.py: both were
    loaded."""
    missing = tmp_path / "none.toml"
    code = ("import sys\nfrom exchanged.__main__ import main\n"
            f"code = main(['serve', '--config', {str(missing)!r}])\n"
            "print(code, sorted(m for m in ('exchanged.cli', 'exchanged.ca', "
            "'exchanged.store.cadb') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stdout.strip() == "1 []", p.stdout + p.stderr
    assert p.stderr == f"exchanged: error: no configuration file {missing}\n"
    # ... and it is what pyproject installs as the `exchanged` command
    assert 'exchanged = "exchanged.__main__:main"' in (ROOT / "pyproject.toml").read_text()
    p = subprocess.run([sys.executable, "-m", "exchanged", "serve", "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "run the node's exchange daemon" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "exchanged", "serve", "--bogus"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in p.stderr, p.stderr


def test_give_back_memory_returns_freed_heap_to_the_system() -> None:
    """What the daemon calls after start-up and after taking a CRL: freed C-heap pages leave
    the process's resident set. In a child process, so this run's own heap does not blur it."""
    code = """
import resource
from exchanged.common import give_back_memory

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()

held = [bytes(2000) + bytes([i % 256]) for i in range(40000)]  # ~80 MB from malloc
held = held[-1:]  # the rest freed; the last one keeps the heap's top in use
before = rss()
give_back_memory()
print(before - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert int(out) > 40 * 2**20, out  # most of the 80 MB went back


_LARGE_BUFFER = """
import sys
from exchanged.common import keep_large_buffers_apart

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096

if sys.argv[1] == "tuned":
    keep_large_buffers_apart()
first = b"x" * (5 << 20)  # a CRL's size; glibc gives it pages of its own, and frees them
del first  # ... and, left to itself, raises its threshold above 5 MB on this free
before = rss()
second = b"y" * (5 << 20)
del second
print(rss() - before)
"""


def test_large_buffers_go_back_to_the_system_when_freed() -> None:
    """What the daemon sets first (keep_large_buffers_apart): without it, the second 5 MB
    buffer came from the heap and its pages stayed with the process after it was freed."""
    kept = {}
    for mode in ("tuned", "default"):
        out = subprocess.run([sys.executable, "-c", _LARGE_BUFFER, mode], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        kept[mode] = int(out)
    assert kept["tuned"] < 1 << 20, kept  # returned
    assert kept["default"] > 4 << 20, kept  # the control: glibc's own way keeps it
