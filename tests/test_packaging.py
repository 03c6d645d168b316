"""driffusion_rt.kernels imports from a source checkout and from an installed layout alike (issue 14, item 8).

`pip install .` (non-editable) copies kernels/ into site-packages as driffusion_rt/kernels; run from the repository
root, Python imports the checkout's driffusion_rt instead, which has no kernels/ inside. The tests run a fresh
interpreter with the editable install's finder removed, so only the plain path-based import is left.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_EDITABLE_FINDER = """
import importlib.machinery, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()
                    and "editable" not in type(f).__name__.lower() and "editable" not in str(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
"""

CHECK = """
import importlib.machinery, os, torch
import driffusion_rt
from driffusion_rt import kernels
pkg_dir = driffusion_rt.__path__[0]
print("PACKAGE", os.path.realpath(pkg_dir))
print("KERNELS", os.path.realpath(kernels.__file__))
spec = importlib.machinery.PathFinder.find_spec("driffusion_rt.kernels", driffusion_rt.__path__)
print("PATHFINDER", spec is not None)
arena = torch.arange(6.0).view(3, 2)
kernels.combine(arena, torch.tensor([2]), torch.tensor([0, 1]), torch.tensor([[1.0, 10.0]]))
print("COMBINE", arena[2].tolist())
"""


def run(code, cwd, pythonpath=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, "-c", NO_EDITABLE_FINDER + code], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def test_source_checkout_finds_the_kernels_beside_the_package():
    out = run(CHECK, ROOT)
    assert out["PACKAGE"] == os.path.realpath(os.path.join(ROOT, "driffusion_rt"))
    assert out["KERNELS"] == os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    assert out["PATHFINDER"] == "False"  # the plain import system alone would not find them: the package did
    assert out["COMBINE"] == "[20.0, 31.0]"


def test_installed_layout_uses_its_own_kernels(tmp_path):
    """The layout setup.py installs (kernels/ inside the package), imported from elsewhere: nothing is redirected."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "driffusion_rt"), site / "driffusion_rt",
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copytree(os.path.join(ROOT, "kernels"), site / "driffusion_rt" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = run(CHECK, str(tmp_path), pythonpath=str(site))
    assert out["PACKAGE"] == os.path.realpath(site / "driffusion_rt")
    assert out["KERNELS"] == os.path.realpath(site / "driffusion_rt" / "kernels" / "__init__.py")
    assert out["PATHFINDER"] == "True" and out["COMBINE"] == "[20.0, 31.0]"


WITHOUT_IMPORTLIB_METADATA = """
import sys

class Refuse:  # as on the GPU image: the importlib_metadata distribution is not installed
    def find_spec(self, name, path=None, target=None):
        if name == "importlib_metadata" or name.startswith("importlib_metadata."):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)

sys.meta_path.insert(0, Refuse())
import diffusers
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401  (the lazy modules the runtime uses)
import driffusion_rt.pipelines, driffusion_rt.services  # noqa: F401
print("IMPORTED", "importlib_metadata" in sys.modules)
"""


def test_diffusers_runs_without_importlib_metadata():
    """perf/gpu_wheels.sh carries diffusers but not importlib_metadata, which diffusers declares but imports only on
    Python < 3.8 (the GPU image lacks it, and its own need, zipp): diffusers and the runtime must import without it."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_IMPORTLIB_METADATA], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IMPORTED False" in r.stdout
    with open(os.path.join(ROOT, "perf", "gpu_wheels.sh")) as f:
        assert "importlib_metadata==" not in f.read()


def test_every_torch_and_triton_name_the_code_uses_exists():
    """Every torch / torch.distributed / triton / triton.language attribute named in the package, kernels/, perf/ and
    tests/ exists in the installed releases: run in the floor environment (docs/compatibility.md) it checks the oldest
    torch and triton setup.py admits. Names only a CUDA build of torch has are left out on a CPU build."""
    import glob
    import importlib
    import re

    import torch
    import torch.distributed as dist
    import triton
    import triton.language as tl
    roots = {"torch": (torch, "torch"), "dist": (dist, "torch.distributed"), "triton": (triton, "triton"),
             "tl": (tl, "triton.language")}
    cuda_build_only = {"dist.ProcessGroupNCCL"}
    names = set()
    for pattern in ("driffusion_rt/**/*.py", "kernels/*.py", "perf/*.py", "tests/*.py"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            with open(path, encoding="utf-8") as f:
                names |= set(re.findall(r"\b((?:torch|dist|triton|tl)(?:\.[A-Za-z_]\w*)+)", f.read()))
    missing = []
    for name in sorted(names):
        root, *parts = name.split(".")
        obj, module = roots[root]
        for i, part in enumerate(parts):
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            try:  # a submodule not imported yet
                obj = importlib.import_module(".".join([module, *parts[: i + 1]]))
            except ImportError:
                if torch.version.cuda is not None or not any(name.startswith(c) for c in cuda_build_only):
                    missing.append(name)
                break
    assert len(names) > 100, sorted(names)  # the scan found the code's names
    assert not missing, f"torch {torch.__version__} / triton {triton.__version__} lack {missing}"
