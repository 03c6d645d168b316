"""The parallel layout of a job and the one function that assembles a sampler for it (docs/design.md section 4,
docs/layouts.md).

`parallelize(model, pipe, cfg=..., ulysses=..., ring=..., info=...)` is how every entry point (command line,
engine, pipelines, benchmarks) builds its sampler: the job's ranks as a DeviceMesh with dims (draft, cfg, ring,
ulysses), the guidance pair's hooks on the denoiser modules, diffusers' context parallelism on the sequence dims
(sequence.py), the evaluator over the draft dim, CUDA graphs off when a call is split. `Sampler.apply` then runs
requests on it.

world = draft ranks x cfg x ring x ulysses. The sequence dims (ring x ulysses, together "seq") are innermost, so a
sequence group is consecutive ranks on one node's fast links: its exchanges happen inside every attention of every
call. A guidance pair comes next (one exchange per call), the draft dim outermost (one all-gather per round).

Guidance-parallel ranks: the two ranks of a cfg pair each run one half of every classifier-free-guidance denoiser
call. Parallelism is applied from outside, model code untouched: `Layout.apply(module)` registers forward hooks on
the denoiser (UNet, transformer). When the runtime's model call holds N rows and the adapter calls the denoiser on
2N (uncond and cond stacked, as every family's adapter does), the pre-hook hands the module its own half (rows
[c N, (c + 1) N) of every tensor argument with 2N rows) and the post-hook all-gathers the pair's halves back into 2N
rows: the adapter's guidance formula (guidance rescale, Flux's true CFG, ...) then runs unchanged, on both ranks, on
the same bits. That exchange is the one collective guidance costs; it stays inside the pair's node. (Folding it into
the round's all-gather would mean splitting every adapter's guidance code; the hook keeps all families working
unchanged.) Under a sequence split the pair's hooks run outside diffusers' (the whole call is halved first, then its
tokens are split), so the two compose without knowing of each other.

Every rank of the job keeps the same trajectory: drafts are gathered over the draft dim, the noise comes from
replica generators of rank 0's, and every rank of a pair or a sequence group holds identical outputs after each
exchange.
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
from .sequence import SequenceGroup
from .sequence import apply as apply_sequence
from .sequence import check as check_sequence

CHOICES = ("1", "2", "auto")
DIMS = ("draft", "cfg", "ring", "ulysses")  # outermost first


def parse_cfg(value) -> str:
    """--cfg-parallel / cfg_parallel= as given: 1, 2 or auto (ValueError otherwise)."""
    v = str(value)
    if v not in CHOICES:
        raise ValueError(f"cfg_parallel must be one of {', '.join(CHOICES)}, got {value!r}")
    return v


def _flags(cfg: int, ulysses: int, ring: int) -> str:
    parts = [f"--{name} {v}" for name, v in (("cfg-parallel", cfg), ("ulysses", ulysses), ("ring", ring)) if v > 1]
    return " x ".join(parts)


def check_world(value, world: int, ulysses: int = 1, ring: int = 1):
    """Before any model loads: the degrees themselves (sequence.check), and a fixed cfg degree times the sequence
    degree must divide the job's world size and the ranks per node (a guidance pair and a sequence group are
    consecutive ranks: they share a node when every node's rank count is a multiple of their size)."""
    v = parse_cfg(value)
    check_sequence(ulysses, ring)
    split = (1 if v == "auto" else int(v)) * ulysses * ring
    if split == 1:
        return
    flags = _flags(1 if v == "auto" else int(v), ulysses, ring)
    if world % split:
        raise ValueError(f"{flags} needs a number of ranks divisible by {split}; this job has {world} "
                         f"rank{'s' if world != 1 else ''}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    what = " and ".join(w for w, on in (("a guidance pair", v == "2"), ("a sequence group", ulysses * ring > 1)) if on)
    if local % split:
        raise ValueError(f"{flags} keeps {what} on one node: the ranks per node (--nproc_per_node, here {local}) "
                         f"must be divisible by {split}")


def guided(model, model_kwargs) -> bool:
    """Whether a request's model calls run classifier-free guidance as one doubled denoiser call: the model says so
    (`model.guided(model_kwargs)`), else the adapters' convention: negative prompt embeddings are passed."""
    fn = getattr(model, "guided", None)
    return bool(fn(model_kwargs or {})) if fn is not None else "negative_prompt_embeds" in (model_kwargs or {})


def resolve(value, world: int, is_guided: bool, ulysses: int = 1, ring: int = 1) -> int:
    """The cfg degree of a job: "auto" is 2 when guidance is on and the world holds a whole number of pairs of
    sequence groups; 2 with guidance off is an error (a pair would compute every call twice, whole)."""
    v = parse_cfg(value)
    if v == "auto":
        check_world("1", world, ulysses, ring)
        return 2 if is_guided and world % (2 * ulysses * ring) == 0 else 1
    check_world(v, world, ulysses, ring)
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
    """The layout of a job: draft ranks x cfg x ring x ulysses. cfg_rank 0 runs the uncond half of a guided call, 1
    the cond half; seq_rank is this rank's place in its sequence group (ring-major)."""
    cfg: int
    draft: int
    cfg_rank: int
    draft_rank: int
    mesh: object = None  # the DeviceMesh (None: nothing split)
    ulysses: int = 1
    ring: int = 1
    seq_rank: int = 0

    @classmethod
    def make(cls, cfg: int, info, ulysses: int = 1, ring: int = 1) -> "Layout":
        """Split the job (DistInfo `info`, None outside torchrun) into a DeviceMesh; every rank calls this. The
        mesh's subgroups wait as long as the runtime's collectives may (not torch's 30-minute default)."""
        check_world(cfg, info.world if info else 1, ulysses, ring)
        if info is None or cfg * ulysses * ring == 1:
            return cls(1, info.world if info else 1, 0, info.rank if info else 0)
        opts = dist.ProcessGroupNCCL.Options() if info.backend == "nccl" else dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=info.timeout_s + watchdog_grace(info.timeout_s))
        shape = (info.world // (cfg * ulysses * ring), cfg, ring, ulysses)
        mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=DIMS,
                                backend_override={d: (info.backend, opts) for d in DIMS})
        seq_rank = mesh["ring"].get_local_rank() * ulysses + mesh["ulysses"].get_local_rank()
        return cls(cfg, shape[0], mesh["cfg"].get_local_rank(), mesh["draft"].get_local_rank(), mesh, ulysses, ring,
                   seq_rank)

    @property
    def seq(self) -> int:
        """Ranks per sequence group (ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def splits(self) -> bool:
        """Whether a model call is split across ranks (a guidance pair or a sequence group)."""
        return self.cfg * self.seq > 1

    @property
    def cfg_group(self):
        return self.mesh["cfg"].get_group()

    @property
    def draft_group(self):
        return self.mesh["draft"].get_group()

    @property
    def sequence(self) -> SequenceGroup | None:
        """This rank's sequence group (None: calls are not split by tokens)."""
        return SequenceGroup(self.ulysses, self.ring, self.mesh) if self.seq > 1 else None

    def describe(self) -> dict:
        return {"cfg": self.cfg, "draft_ranks": self.draft, "ulysses": self.ulysses, "ring": self.ring,
                "cfg_rank": self.cfg_rank, "draft_rank": self.draft_rank, "seq_rank": self.seq_rank}

    def summary(self) -> str:
        """The layout in a run's printed summary: cfg x draft ranks, and the sequence dims when calls are split."""
        seq = f" x ulysses {self.ulysses} x ring {self.ring}" if self.seq > 1 else ""
        return f"cfg {self.cfg} x draft ranks {self.draft}{seq}"

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


def parallelize(model, *owners, cfg: int = 1, info=None, cuda_graphs: bool = True, ulysses: int = 1,
                ring: int = 1) -> Sampler:
    """The sampler of `model` on this rank of the job (info: its DistInfo, default the process group this process
    joined; None outside torchrun): the ranks as a (draft, cfg, ring, ulysses) layout, diffusers' context
    parallelism on the model's denoisers over the sequence dims (sequence.py), the cfg pair's hooks on the
    denoiser modules of the model and of `owners` (e.g. the pipeline), drafts spread and gathered over the draft
    dim, and CUDA graphs (on CUDA latents) unless turned off, the model cannot be captured, or a call is split
    across ranks (the exchanges inside a captured call are unverified on GPUs). Every rank calls this the same
    way. Raises ValueError for a layout the job or the model cannot take."""
    info = current() if info is None else info
    layout = Layout.make(cfg, info, ulysses, ring)
    apply_sequence(model, layout.sequence, denoisers(model))
    layout.apply(*denoisers(model, *owners))
    ev = LocalEvaluator(model) if info is None else DistributedEvaluator(model, info, layout)
    graphs = cuda_graphs and getattr(model, "cuda_graphs", True) and not layout.splits
    return Sampler(model, ev, cuda_graphs=graphs, layout=layout)
