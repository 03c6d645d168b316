"""The sequence dims of a layout: diffusers' own context parallelism on a group of ranks (docs/layouts.md).

The ranks of one sequence group hold the same draft (and the same guidance half) and split the tokens of every
transformer call among themselves. Diffusers does the splitting: the hooks its `enable_parallelism` installs from
the model's `_cp_plan` cut the inputs along the sequence, its attention exchanges them (Ulysses: an all-to-all that
trades tokens for heads; ring: key / value blocks passed around the group) and the output is gathered whole again.
To the runtime the model still takes and returns whole tensors, so rounds, the draft all-gather and the guidance
pair's exchange are unchanged. This module hands diffusers the group (`ContextParallelConfig(..., mesh=...)` over the
job mesh's "ring" and "ulysses" dims) and checks what can be checked before anything loads; it rewrites nothing.

A runtime model takes part through its denoisers: by default every one of them (the adapter's transformer, Wan 2.2's
transformer_2) must carry a `_cp_plan`, and `group.enable(module)` turns diffusers' context parallelism on with it.
A model that needs something else says so with a method `context_parallel(group)` (LTX: its own plan, see
pipelines/ltx.py; the fixed-cost model: a cost that models the split).
"""
import contextlib
import os

import torch

# diffusers' default attention backend (the environment variable that names another, and its default)
BACKEND_ENV, DEFAULT_BACKEND = "DIFFUSERS_ATTN_BACKEND", "native"


def check(ulysses, ring):
    """Before any model loads: both degrees are integers >= 1, and ring attention has a backend that can run it
    (ring merges partial attention results by their log-sum-exp, which diffusers' default `native` backend does not
    return). Raises ValueError naming the value and what is allowed."""
    for name, v in (("ulysses", ulysses), ("ring", ring)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be an integer >= 1 (1: no split), got {v!r}")
    backend = os.environ.get(BACKEND_ENV, DEFAULT_BACKEND)
    if ring > 1 and backend == DEFAULT_BACKEND:
        raise ValueError(f"--ring {ring} needs an attention backend that returns the log-sum-exp of its blocks; "
                         f"diffusers' default {DEFAULT_BACKEND!r} does not: set {BACKEND_ENV} to one that does (on "
                         f"CUDA e.g. _native_cudnn or flash), or split with --ulysses instead")


@contextlib.contextmanager
def _an_accelerator():
    """diffusers 0.42.1 (ModelMixin._resolve_parallel_config) records the model's device as rank modulo
    torch.accelerator.device_count(), which divides by zero on a machine without one (CPU ranks on gloo). The
    device is only recorded (the mesh is ours, passed in), so for the duration of the call count one."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def running(module):
    """(ulysses, ring) of the context parallelism diffusers runs on `module`, or None."""
    config = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
    return None if config is None else (config.ulysses_degree, config.ring_degree)


class SequenceGroup:
    """This rank's sequence group: `ulysses` x `ring` ranks (degree), over `mesh` (a DeviceMesh with dims "ring" and
    "ulysses", as diffusers' ContextParallelConfig takes it)."""

    def __init__(self, ulysses: int, ring: int, mesh):
        self.ulysses, self.ring, self.mesh = ulysses, ring, mesh

    @property
    def degree(self) -> int:
        return self.ulysses * self.ring

    def enable(self, module, cp_plan=None):
        """diffusers' context parallelism on `module` over this group, with its own `_cp_plan` or `cp_plan`.
        A module already split the same way is left as it is (the sequence groups of every layout with these
        degrees are the same ranks: the dims are innermost); any other split is an error."""
        name = type(module).__name__
        if cp_plan is None and getattr(module, "_cp_plan", None) is None:
            raise ValueError(f"sequence parallelism (ulysses {self.ulysses} x ring {self.ring}) needs a denoiser "
                             f"with diffusers' context-parallel plan; {name} has none (no _cp_plan)")
        now = running(module)
        if now == (self.ulysses, self.ring):
            return
        if now is not None:
            raise ValueError(f"this {name} already runs context parallelism as ulysses {now[0]} x ring {now[1]}; "
                             f"every sampler built on it must use that split")
        from diffusers import ContextParallelConfig  # heavy: diffusers takes seconds to import
        config = ContextParallelConfig(ulysses_degree=self.ulysses, ring_degree=self.ring,
                                       mesh=self.mesh["ring", "ulysses"])
        with _an_accelerator():
            module.enable_parallelism(config=config, cp_plan=cp_plan)


def apply(model, group: SequenceGroup | None, modules: list):
    """Turn the sequence split on for `model` (group None: make sure none of its `modules` is split)."""
    if group is None:
        split = [m for m in modules if running(m) is not None]
        if split:
            u, r = running(split[0])
            raise ValueError(f"this {type(split[0]).__name__} runs context parallelism as ulysses {u} x ring {r} "
                             f"(an earlier layout); build every sampler on it with that split")
        return
    own = getattr(model, "context_parallel", None)
    if own is not None:
        own(group)
        return
    if not modules:
        raise ValueError(f"sequence parallelism (ulysses {group.ulysses} x ring {group.ring}) splits a "
                         f"transformer's tokens; the model {type(model).__name__} has no denoiser module to split")
    for m in modules:
        group.enable(m)
