"""The package's structure, enforced (docs/design.md section 7): imports only go down the layers, from the entry
points to the math, with no cycle among modules; no function-local import of the package's own modules (they would
hide a cycle), and every function-local import of another library says why it is lazy; no module over 500 lines.

The checker reads the source (every import statement, function-local ones included), so it sees what a run may
never execute; the tests below also show that it fails on an injected upward import and an injected cycle."""
import ast
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "driffusion_rt")
KERNELS = os.path.join(ROOT, "kernels")

# bottom to top; a module may import modules of its own layer or of lower ones. "pipelines.*" lists the family
# modules by name; the package faces (__init__.py) re-export and are checked for cycles only.
LAYERS = [
    ["plan", "trajectory", "schedulers", "strength", "kernels", "kernels.fallback", "kernels.fused", "_source_tree"],
    ["rounds", "windows"],
    ["options"],
    ["evaluator", "noise", "blend", "cuda_graphs", "outputs", "arena"],
    ["results"],
    ["distributed"],
    ["parasolver", "adaptive", "run"],
    ["sampler"],
    ["batch", "sequence"],
    ["layout"],
    ["gmm", "fixed_cost", "digits"],
    ["pipelines.family", "pipelines.loading", "pipelines.guidance", "pipelines.images", "pipelines.lora"],
    ["pipelines.prepare", "pipelines.decode", "pipelines.tasks"],
    ["pipelines.conditioning", "pipelines.video"],
    ["pipelines.*"],  # the families
    ["pipelines.api"],
    ["pipelines.wrapper"],
    ["pipelines"],
    ["requests"],
    ["model_ref"],
    ["services"],
    ["cli", "engine", "openai_api", "waiting"],
    ["generate", "serve", "train_digits"],
]
MAX_LINES = 500
# the package's own modules that may be imported lazily, and why (their import pulls in an optional dependency)
LAZY_OWN = {"kernels.fused": "it imports triton, which the CPU fallback does not need"}


def modules(root: str, kernels: str) -> dict:
    """Module name (relative to the package, "" for its face) -> source path."""
    out = {}
    for base, prefix in ((root, ""), (kernels, "kernels")):
        for d, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), base)[:-3].replace(os.sep, ".")
                    name = ".".join(p for p in (prefix, rel) if p)
                    out[name.removesuffix(".__init__").removesuffix("__init__")] = os.path.join(d, f)
    return out


def _imports(path: str, name: str, mods: dict):
    """(line, target module, function-local, source line and the line above it) of every import of the package's
    own modules, and of other libraries inside functions (target None)."""
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    lines = src.splitlines()
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = pkg.split(".") if pkg else []
            base = parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])
            base = ".".join(p for p in base if p)
            targets = [f"{base}.{a.name}".strip(".") if f"{base}.{a.name}".strip(".") in mods else base
                       for a in node.names]
        else:
            full = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for m in full:
                if m == "driffusion_rt" or m.startswith("driffusion_rt."):
                    targets.append(m[len("driffusion_rt."):] if m != "driffusion_rt" else "")
        own = [t for t in targets if t in mods]
        text = lines[node.lineno - 2: node.lineno]
        for t in own:
            yield node.lineno, t, id(node) in local, text
        if not own and id(node) in local:
            yield node.lineno, None, True, text


def layer_of(name: str) -> int | None:
    for k, layer in enumerate(LAYERS):
        if name in layer or (name.startswith("pipelines.") and "pipelines.*" in layer
                             and not any(name in other for other in LAYERS)):
            return k
    return None


def problems(root: str = PACKAGE, kernels: str = KERNELS) -> list:
    """Every violation of the rules in the module docstring, as readable lines (empty: the structure holds)."""
    mods = modules(root, kernels)
    graph, out = {m: set() for m in mods}, []
    for name, path in mods.items():
        for line, target, local, text in _imports(path, name, mods):
            where = f"{os.path.relpath(path, os.path.dirname(root))}:{line}"
            above, line = text
            comment = line.split("#", 1)[1] if "#" in line else ""
            reason = comment.replace("noqa: F401", "").replace("noqa", "").strip(" :,") or above.strip().startswith("#")
            if target is None:
                if not reason:
                    out.append(f"{where}: a function-local import without a reason: {line.strip()}")
                continue
            if local and not (target in LAZY_OWN and reason):
                out.append(f"{where}: a function-local import of the package's own module {target!r}")
            if target != name:
                graph[name].add(target)
            if name and target and not mods[target].endswith("__init__.py") or name and target == "pipelines":
                lo, hi = layer_of(name), layer_of(target)
                if lo is None:
                    out.append(f"{where}: module {name!r} is in no layer")
                elif hi is not None and hi > lo:
                    out.append(f"{where}: {name!r} imports {target!r} from a higher layer")
    for name in mods:
        if name and layer_of(name) is None and not mods[name].endswith("__init__.py"):
            out.append(f"{name}: in no layer")
    out += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    for name, path in mods.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        if n > MAX_LINES:
            out.append(f"{name}: {n} lines, more than {MAX_LINES}")
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(c or "driffusion_rt" for c in comp))
    for v in list(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_package_keeps_its_layers_without_cycles():
    found = problems()
    assert found == [], "\n".join(found)


@pytest.fixture
def copy(tmp_path):
    """A copy of the package and its kernels to inject faults into."""
    shutil.copytree(PACKAGE, tmp_path / "driffusion_rt", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(KERNELS, tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_an_injected_upward_import_fails(copy):
    _append(copy / "driffusion_rt" / "plan.py", "\nfrom . import engine  # noqa: E402,F401\n")
    found = problems(str(copy / "driffusion_rt"), str(copy / "kernels"))
    assert any("'plan' imports 'engine' from a higher layer" in p for p in found), found
    assert any(p.startswith("import cycle:") and "plan" in p for p in found), found


def test_an_injected_cycle_and_a_local_import_fail(copy):
    _append(copy / "driffusion_rt" / "rounds.py", "\n\ndef _late():\n    from .options import SamplingOptions\n"
                                                  "    return SamplingOptions\n")
    found = problems(str(copy / "driffusion_rt"), str(copy / "kernels"))
    assert any("import cycle: options -> rounds" in p for p in found), found
    assert any("function-local import of the package's own module 'options'" in p for p in found), found
    assert any("'rounds' imports 'options' from a higher layer" in p for p in found), found


def test_a_lazy_import_needs_its_reason_and_modules_stay_small(copy):
    _append(copy / "driffusion_rt" / "noise.py", "\n\ndef _late():\n    import json\n    return json\n")
    fused = copy / "kernels" / "__init__.py"
    fused.write_text(re.sub(r"from \. import fused  #.*", "from . import fused", fused.read_text()))
    _append(copy / "driffusion_rt" / "blend.py", "\n" * (MAX_LINES + 1))
    found = problems(str(copy / "driffusion_rt"), str(copy / "kernels"))
    assert any("function-local import without a reason: import json" in p for p in found), found
    assert any("function-local import of the package's own module 'kernels.fused'" in p for p in found), found
    assert any(p.startswith("blend: ") and "more than 500" in p for p in found), found
