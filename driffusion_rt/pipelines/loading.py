"""Loading a pipeline of a supported family: from a local directory (offline) or a hub id, checked before weights
load (model_index.json, component folders, the pipeline class), in the dtype asked for."""
import json
import os
import re

import torch

from .family import family_of, family_of_class

DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")  # "org/name"


def _dtype_keyword() -> str:
    """Recent diffusers name from_pretrained's dtype argument `dtype` and deprecate `torch_dtype`."""
    try:  # a name only recent diffusers define (diffusers itself is imported lazily: it takes seconds)
        # heavy: diffusers takes seconds to import
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401  (heavy, lazy)
        return "dtype"
    except ImportError:
        return "torch_dtype"


def parse_dtype(dtype) -> torch.dtype:
    """torch.dtype or one of DTYPE_ALIASES' names ("float32", "fp16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower()]
    raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPE_ALIASES)}; got {dtype!r}")


def check_model_dir(path: str) -> dict:
    """Validate a local pipeline directory before loading it; returns its model_index.json.

    Raises FileNotFoundError (no model_index.json, a component folder missing) or ValueError (an unreadable
    model_index.json, a pipeline class outside the supported families)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"model directory {path!r} is incomplete: it has no model_index.json "
                                f"(expected a diffusers pipeline saved with save_pretrained)")
    try:
        with open(index, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{index} is not a readable JSON model index: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{index} is not a diffusers model index (a JSON object with _class_name)")
    family_of_class(config.get("_class_name"), where=index)
    missing = [name for name, spec in config.items()
               if not name.startswith("_") and isinstance(spec, (list, tuple)) and len(spec) == 2
               and spec[0] is not None and spec[1] is not None
               and not (os.path.isdir(os.path.join(path, name)) and os.listdir(os.path.join(path, name)))]
    if missing:
        raise FileNotFoundError(f"model directory {path!r} is incomplete: component folder(s) {', '.join(missing)} "
                                f"listed in model_index.json are missing or empty")
    return config


def load_pipeline(model: str, dtype=torch.float32, device="cpu"):
    """Load a pipeline of a supported family from a local directory (offline) or a hub id, on `device`.

    model: a directory holding a diffusers pipeline (model_index.json + component folders) or a hub id
    ("org/name"). Errors: FileNotFoundError for a missing path that is not a plausible hub id, an incomplete
    directory, or a hub id that cannot be fetched; ValueError for an unsupported pipeline class or dtype."""
    from diffusers import DiffusionPipeline  # heavy: seconds to import

    dtype = parse_dtype(dtype)
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be a pipeline directory or a hub id, got {model!r}")
    model = os.fspath(model)
    local = os.path.isdir(model)
    if local:
        check_model_dir(model)
    elif os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} is a file, not a pipeline directory (expected a folder with "
                                f"model_index.json, or a hub id such as 'org/name')")
    elif not HUB_ID.match(model):
        raise FileNotFoundError(f"model directory {model!r} does not exist (and it is not a hub id of the form "
                                f"'org/name')")
    else:
        try:
            config = DiffusionPipeline.load_config(model)
        except Exception as e:  # offline without a cache, unknown repo, no network...
            raise FileNotFoundError(f"model {model!r} is not a local directory and could not be fetched as a hub "
                                    f"id: {type(e).__name__}: {e}") from e
        family_of_class(config.get("_class_name"), where=f"hub model {model!r}")
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **{_dtype_keyword(): dtype}, local_files_only=local)
    except (OSError, EnvironmentError) as e:
        raise FileNotFoundError(f"could not load the pipeline in {model!r}: {e}") from e
    family_of(pipe)
    return pipe.to(device)
