"""The package's shape: no import cycles between spotfit's modules, one stated job per module.

Imports are read from the source (every ``import`` statement, also those
inside functions, which are imports all the same), so a cycle hidden behind a
lazy import fails too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spotfit"


def _modules():
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """spotfit modules imported by module ``name`` (the package root ``spotfit`` aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from spotfit import roi`
    return {m for m in found if m in MODULES and m != "spotfit" and m != name}


def _graph():
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _find_cycle(graph):
    """One import cycle as a list of module names, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_walker_sees_lazy_imports():
    """group imports detection inside a function only; the walker must see it."""
    assert "spotfit.detection" in _graph()["spotfit.group"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_states_its_job(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()[0]) > 20, f"{name} needs an opening docstring stating its job"


def test_fitting_layers_depend_downward():
    """The fitting layers import only layers below them (api > single/group > results > solver)."""
    graph = _graph()
    below = {
        "spotfit.group": {"spotfit.api", "spotfit.batch", "spotfit.cli"},
        "spotfit.single": {"spotfit.api", "spotfit.group", "spotfit.batch", "spotfit.cli"},
        "spotfit.results": {"spotfit.api", "spotfit.single", "spotfit.group"},
        "spotfit.solver": {"spotfit.api", "spotfit.single", "spotfit.group", "spotfit.results",
                           "spotfit.config"},
        "spotfit.models.base": {"spotfit.solver", "spotfit.estimators", "spotfit.config"},
    }
    for module, forbidden in below.items():
        assert not graph[module] & forbidden, (module, graph[module] & forbidden)


def test_config_imports_without_numpy():
    """The command line reads FitConfig's option metadata before anything heavy is imported."""
    import subprocess
    import sys

    code = ("import sys, spotfit.config as c; c.option_metadata(); c.FitConfig(sigma=2); "
            "heavy = {'numpy', 'pandas', 'scipy', 'numba'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
