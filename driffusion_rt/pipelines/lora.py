"""LoRA weights on a loaded pipeline, the way diffusers users load them (load_lora_weights, then set_adapters with
one weight per adapter). The runtime needs nothing else: the LoRA layers are part of the denoiser it calls, and
the per-call scale travels as diffusers' cross_attention_kwargs / joint_attention_kwargs {"scale": s}
(`prepare(..., lora_scale=s)`, `DRiffusionPipeline(...)(..., cross_attention_kwargs={"scale": s})`)."""
import os


def parse_lora(spec: str) -> tuple:
    """"PATH[:SCALE]" -> (path, scale); SCALE defaults to 1. A colon followed by something that is not a number
    belongs to the path."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a LoRA is PATH[:SCALE], got {spec!r}")
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"LoRA {spec!r}: the scale must be a finite number, got {tail!r}")
    return path, scale


def check_lora_path(path: str):
    """A LoRA is a weights file (.safetensors / .bin) or a directory holding pytorch_lora_weights.* ."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA weights {path!r} do not exist (expected a .safetensors file or a directory "
                                f"with pytorch_lora_weights.safetensors)")


def load_loras(pipe, loras) -> list:
    """Load (path, scale) pairs as adapters lora0, lora1, ... and activate them with their scales; returns the
    adapter names. Needs peft (pip install 'driffusion_rt[lora]')."""
    loras = [parse_lora(x) if isinstance(x, str) else tuple(x) for x in loras]
    for path, _ in loras:
        check_lora_path(path)
    if not loras:
        return []
    try:
        import peft  # noqa: F401  optional: the lora extra
    except ImportError:
        raise ValueError("loading LoRA weights needs peft: pip install 'driffusion_rt[lora]'") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} cannot load LoRA weights")
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"lora{i}"
        kw = {}
        if os.path.isfile(path):
            kw = {"weight_name": os.path.basename(path)}
            path = os.path.dirname(path) or "."
        try:
            pipe.load_lora_weights(path, adapter_name=name, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"LoRA weights {loras[i][0]!r} could not be loaded into the "
                             f"{type(pipe).__name__}: {e}") from e
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return names
