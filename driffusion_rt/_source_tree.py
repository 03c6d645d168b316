"""Make `driffusion_rt.kernels` importable from a source checkout.

Installed, the top-level kernels/ folder is the subpackage driffusion_rt/kernels (setup.py's package_dir). Imported
from a checkout (the repository root first on sys.path: `pip install .` then run from the root, or no install at
all) the package has no kernels/ inside; the folder sits beside it. Then it is loaded from there under the same
name, so the same code runs either way. An editable install maps the folder itself; this changes nothing there.
"""
import importlib.util
import os
import sys

NAME = __name__.rpartition(".")[0] + ".kernels"


def load_kernels_beside():
    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if NAME in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(beside):
        return
    spec = importlib.util.spec_from_file_location(NAME, beside, submodule_search_locations=[os.path.dirname(beside)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    setattr(sys.modules[__name__.rpartition(".")[0]], "kernels", module)


load_kernels_beside()
