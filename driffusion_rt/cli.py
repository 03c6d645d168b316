"""The flags the command line (generate.py) and the server (serve.py) share, their checks, and how either says
"bad input": one line from rank 0, exit status 2, before any model loads (docs/cli.md)."""
import argparse
import os
import sys

from . import distributed
from .distributed import DEFAULT_INIT_TIMEOUT_S, DEFAULT_TIMEOUT_S
from .layout import CHOICES as CFG_CHOICES
from .model_ref import BUILTIN
from .pipelines.lora import parse_lora
from .requests import Limits, RequestError

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")
LIMIT_FLAGS = (("prompt_chars", "--max-prompt-chars", "longest prompt accepted, characters"),
               ("side", "--max-side", "largest height or width accepted, pixels"),
               ("steps", "--max-steps", "most sampling steps accepted"),
               ("images", "--max-images", "most images (videos) per request, and digits in a digits prompt"),
               ("parallel", "--max-parallel", "largest parallel n accepted"),
               ("frames", "--max-frames", "most frames per video accepted"),
               ("image_bytes", "--max-image-bytes", "most bytes of input images (image, mask_image, control_image "
                                                    "together, decoded) per request; the request size limit grows "
                                                    "with it"))


def _rank() -> int:
    """This process's rank as torchrun sets it (0 outside torchrun), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def bad_input(message: str, info=None):
    """Bad input: one message (rank 0 prints it; every rank decides the same), leave the job, status 2. The message
    comes first: once one rank has exited, torchrun stops the others."""
    if _rank() == 0:
        print(f"driffusion_rt: error: {message}", file=sys.stderr, flush=True)
    distributed.teardown(info)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line from rank 0 (not every rank's usage text), exit status 2."""

    def error(self, message):
        bad_input(f"{message} (see {self.prog} --help)")


def parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_flags(p):
    """--model, --dtype and the adapters loaded with it (--lora, --controlnet)."""
    p.add_argument("--model", default="digits",
                   help="digits (the shipped class-conditional digits model; the default), a diffusers pipeline "
                        "directory or hub id, gmm (analytic Gaussian mixture) or fixed (a model of fixed cost per "
                        "call, --model-cost)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="model and latent dtype (default float32)")
    g = p.add_argument_group("adapters (diffusers pipelines)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA weights (a .safetensors file or a directory) loaded with their scale, default 1 "
                        "(repeatable; SD, SDXL, SD3, Flux; needs peft); requests may set lora_scale")
    g.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a ControlNetModel directory: run the SD / SDXL ControlNet pipeline (repeatable: "
                        "MultiControlNet); requests then carry one control image per --controlnet")


def add_runtime_flags(p):
    """Device, timeouts, CUDA graphs, the layout (guidance pairs, sequence groups) and the fixed-cost model's costs."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU; the default), cpu, cuda or cuda:N; under torchrun "
                        "every rank uses cuda:LOCAL_RANK (auto, cuda) or the CPU (cpu)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a collective may wait for the other ranks once the model is loaded before the job "
                        f"fails (default {DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--load-timeout", type=float, default=DEFAULT_INIT_TIMEOUT_S,
                   help=f"seconds the ranks wait for each other while starting and loading the model (default "
                        f"{DEFAULT_INIT_TIMEOUT_S:g})")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the model eagerly on GPU (CUDA graphs are on by default there)")
    g.add_argument("--cfg-parallel", default="1", choices=CFG_CHOICES,
                   help="guidance-parallel ranks: 2 runs the uncond and cond halves of every guided model call on two "
                        "ranks (world = draft ranks x 2 x ulysses x ring; --parallel defaults to the draft ranks; the "
                        "server then refuses requests without guidance); auto: 2 when guidance is on and the ranks "
                        "hold a whole number of pairs (default 1)")
    g.add_argument("--ulysses", type=int, default=1, metavar="N",
                   help="sequence-parallel ranks, Ulysses attention: N consecutive ranks hold one draft and split the "
                        "tokens of every transformer call with diffusers' context parallelism (an all-to-all trades "
                        "tokens for attention heads: N must divide the heads, and the token counts); Flux, Wan and "
                        "LTX pipelines; world = draft ranks x cfg x ulysses x ring (default 1; docs/layouts.md)")
    g.add_argument("--ring", type=int, default=1, metavar="N",
                   help="sequence-parallel ranks, ring attention: key / value blocks passed around N ranks (needs an "
                        "attention backend that returns the log-sum-exp, set with DIFFUSERS_ATTN_BACKEND, e.g. "
                        "_native_cudnn on CUDA); combines with --ulysses (default 1)")
    g.add_argument("--model-cost", type=float, default=0.04, help="seconds per call of --model fixed (default 0.04)")
    g.add_argument("--model-cost-per-row", type=float, default=0.0, metavar="SECONDS",
                   help="seconds more per latent row of a call of --model fixed: a call costs --model-cost + rows x "
                        "this, a stand-in for a GPU's batch economics (default 0)")


def add_limit_flags(p):
    """The --max-* flags, shared by the command line and the server so that both enforce the same limits."""
    g = p.add_argument_group("request limits (the same for the command line and the server)")
    for field_name, flag, text in LIMIT_FLAGS:
        g.add_argument(flag, type=int, default=getattr(Limits(), field_name),
                       help=f"{text} (default {getattr(Limits(), field_name)})")


def limits_from_args(args) -> Limits:
    """Limits from the parsed --max-* flags; raises RequestError for a value below 1."""
    values = {}
    for field_name, flag, _ in LIMIT_FLAGS:
        v = getattr(args, flag[2:].replace("-", "_"))
        if v < 1:
            raise RequestError(f"{flag} must be >= 1, got {v}")
        values[field_name] = v
    return Limits(**values)


def check_shared_args(args) -> Limits:
    """The checks of the shared flags: timeouts, the fixed-cost model's costs, the device, adapters only for
    pipelines, the LoRA scales (the files are checked with the model, on rank 0); returns the request limits.
    Raises ValueError naming the bad value."""
    for name in ("timeout", "load_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    for name in ("model_cost", "model_cost_per_row"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 seconds, got {getattr(args, name)}")
    distributed.check_device(args.device)
    if args.model in BUILTIN and (args.lora or args.controlnet):
        raise ValueError(f"--lora and --controlnet apply to diffusers pipelines, not --model {args.model}")
    for spec in args.lora:
        parse_lora(spec)
    return limits_from_args(args)
