"""The parallel layout of a job and the one function that assembles a sampler for it (docs/design.md section 4).

`parallelize(model, pipe, cfg=..., info=...)` is how every entry point (command line, engine, pipelines, benchmarks)
builds its sampler: the job's ranks as a (draft, cfg) DeviceMesh, the guidance pair's hooks on the denoiser modules,
the evaluator over the draft dim, CUDA graphs off under a guidance pair. `Sampler.apply` then runs requests on it.

Guidance-parallel ranks: world = draft ranks x cfg ranks, and the two ranks of a cfg pair each run one half of
every classifier-free-guidance denoiser call.

The layout is a DeviceMesh of shape (draft, cfg), dims named "draft" and "cfg": a pair is two consecutive ranks (so
torchrun puts it on one node), and the draft dim spreads the drafts of a round as before. Parallelism is applied
from outside, model code untouched: `Layout.apply(module)` registers forward hooks on the denoiser (UNet,
transformer). When the runtime's model call holds N rows and the adapter calls the denoiser on 2N (uncond and cond
stacked, as every family's adapter does), the pre-hook hands the module its own half (rows [c N, (c + 1) N) of every
tensor argument with 2N rows) and the post-hook all-gathers the pair's halves back into 2N rows: the adapter's
guidance formula (guidance rescale, Flux's true CFG, ...) then runs unchanged, on both ranks, on the same bits.
That exchange is the one collective guidance costs; it stays inside the pair's node. (Folding it into the round's
all-gather would mean splitting every adapter's guidance code; the hook keeps all families working unchanged.)

Every rank of the job keeps the same trajectory: drafts are gathered over the draft dim, the noise comes from
replica generators of rank 0's, and both ranks of a pair hold identical outputs after each exchange.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from .distributed import DistributedEvaluator, all_gather_rows, current, watchdog_grace
from .evaluator import LocalEvaluator, call_rows
from .sampler import Sampler

CHOICES = ("1", "2", "auto")


def parse_cfg(value) -> str:
    """--cfg-parallel / cfg_parallel= as given: 1, 2 or auto (ValueError otherwise)."""
    v = str(value)
    if v not in CHOICES:
        raise ValueError(f"cfg_parallel must be one of {', '.join(CHOICES)}, got {value!r}")
    return v


def check_world(value, world: int):
    """Before any model loads: a fixed cfg degree must divide the job's world size, and the ranks per node (a pair
    is two consecutive ranks: it shares a node when every node runs an even number of ranks)."""
    v = parse_cfg(value)
    if v != "auto" and world % int(v):
        raise ValueError(f"--cfg-parallel {v} needs a number of ranks divisible by {v}; this job has {world} "
                         f"rank{'s' if world != 1 else ''}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if v != "auto" and local % int(v):
        raise ValueError(f"--cfg-parallel {v} keeps a guidance pair on one node: the ranks per node "
                         f"(--nproc_per_node, here {local}) must be divisible by {v}")


def guided(model, model_kwargs) -> bool:
    """Whether a request's model calls run classifier-free guidance as one doubled denoiser call: the model says so
    (`model.guided(model_kwargs)`), else the adapters' convention: negative prompt embeddings are passed."""
    fn = getattr(model, "guided", None)
    return bool(fn(model_kwargs or {})) if fn is not None else "negative_prompt_embeds" in (model_kwargs or {})


def resolve(value, world: int, is_guided: bool) -> int:
    """The cfg degree of a job: "auto" is 2 when guidance is on and the world is even; 2 with guidance off is an
    error (a pair would compute every call twice, whole)."""
    v = parse_cfg(value)
    if v == "auto":
        return 2 if is_guided and world % 2 == 0 else 1
    check_world(v, world)
    if int(v) > 1 and not is_guided:
        raise ValueError(f"--cfg-parallel {v} splits classifier-free guidance across ranks, but this request's model "
                         f"calls are not guided (guidance_scale <= 1, a model without guidance, Flux without "
                         f"true CFG, or Qwen-Image without a negative prompt); use --cfg-parallel 1 or auto")
    return int(v)


DENOISERS = ("unet", "transformer", "transformer_2", "controlnet", "denoiser")  # what adapters call doubled


def denoisers(*owners) -> list:
    """The denoiser modules of a runtime model or pipeline (UNet, transformers, ControlNet, ...), each once."""
    found = []
    for owner in owners:
        for name in DENOISERS:
            m = getattr(owner, name, None)
            if isinstance(m, torch.nn.Module) and all(m is not f for f in found):
                found.append(m)
    return found


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)({k: _map(v, fn) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        mapped = [_map(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # a diffusers BaseOutput
        return type(value)(**{k: _map(value[k], fn) for k in value.keys()})
    return value


@dataclass(frozen=True)
class Layout:
    """The (draft, cfg) layout of a job. cfg_rank 0 runs the uncond half of a guided call, 1 the cond half."""
    cfg: int
    draft: int
    cfg_rank: int
    draft_rank: int
    mesh: object = None  # the DeviceMesh (None: cfg = 1, nothing split)

    @classmethod
    def make(cls, cfg: int, info) -> "Layout":
        """Split the job (DistInfo `info`, world = draft x cfg) into a DeviceMesh; every rank calls this. The mesh's
        subgroups wait as long as the runtime's collectives may (not torch's 30-minute default)."""
        if info is None or cfg == 1:
            return cls(1, info.world if info else 1, 0, info.rank if info else 0)
        check_world(cfg, info.world)
        opts = dist.ProcessGroupNCCL.Options() if info.backend == "nccl" else dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=info.timeout_s + watchdog_grace(info.timeout_s))
        mesh = init_device_mesh(info.device.type, (info.world // cfg, cfg), mesh_dim_names=("draft", "cfg"),
                                backend_override={"draft": (info.backend, opts), "cfg": (info.backend, opts)})
        return cls(cfg, info.world // cfg, mesh["cfg"].get_local_rank(), mesh["draft"].get_local_rank(), mesh)

    @property
    def cfg_group(self):
        return self.mesh["cfg"].get_group()

    @property
    def draft_group(self):
        return self.mesh["draft"].get_group()

    def describe(self) -> dict:
        return {"cfg": self.cfg, "draft_ranks": self.draft, "cfg_rank": self.cfg_rank, "draft_rank": self.draft_rank}

    def apply(self, *modules) -> list:
        """Run the doubled (uncond + cond) calls of these denoiser modules split across the cfg pair; returns the
        hook handles (remove them to undo)."""
        if self.cfg == 1:
            return []
        handles = []
        for m in modules:
            handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return handles

    def _pre(self, module, args, kwargs):
        rows = call_rows()
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        module._driffusion_half = None
        if rows is None or first is None or first.shape[0] != self.cfg * rows:
            return None  # not a doubled call (outside the runtime, guidance off): run it whole
        lo, hi = self.cfg_rank * rows, (self.cfg_rank + 1) * rows
        module._driffusion_half = rows
        half = lambda t: t[lo:hi] if t.dim() and t.shape[0] == self.cfg * rows else t  # noqa: E731
        return _map(args, half), _map(kwargs, half)

    def _post(self, module, args, kwargs, output):
        rows = getattr(module, "_driffusion_half", None)
        if rows is None:
            return None
        module._driffusion_half = None

        def whole(t):
            if not t.dim() or t.shape[0] != rows:
                return t
            out = torch.empty(self.cfg * rows, *t.shape[1:], dtype=t.dtype, device=t.device)
            all_gather_rows(out, t.contiguous(), current(), self.cfg_group)
            return out
        return _map(output, whole)


def parallelize(model, *owners, cfg: int = 1, info=None, cuda_graphs: bool = True) -> Sampler:
    """The sampler of `model` on this rank of the job (info: its DistInfo, default the process group this process
    joined; None outside torchrun): the ranks as a (draft, cfg) layout, the cfg pair's hooks on the denoiser modules
    of the model and of `owners` (e.g. the pipeline), drafts spread and gathered over the draft dim, and CUDA graphs
    (on CUDA latents) unless turned off, the model cannot be captured, or a guidance pair splits its calls (the
    pair's exchange inside a captured call is unverified on GPUs). Every rank calls this the same way."""
    info = current() if info is None else info
    layout = Layout.make(cfg, info)
    layout.apply(*denoisers(model, *owners))
    ev = LocalEvaluator(model) if info is None else DistributedEvaluator(model, info, layout)
    graphs = cuda_graphs and getattr(model, "cuda_graphs", True) and layout.cfg == 1
    return Sampler(model, ev, cuda_graphs=graphs, layout=layout)
