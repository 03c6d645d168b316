"""The scheduler's noise, drawn exactly as diffusers draws it, identically on every rank.

Stochastic steps (DDPM, DDIM eta > 0, ancestral and SDE solvers) draw one latent of N(0, 1) per draw, in the
scheduler's order. Every rank needs the same numbers (drafts carry the noise the refine will add), so every rank
holds a replica of the request's generator, in the same state, and draws them itself: nothing is sent per round.
"""
import torch


def replica_generator(ev, generator, device: torch.device):
    """On rank 0 `generator` itself; on the other ranks a generator in the same state, so every rank draws the
    numbers rank 0 draws (generator None: rank 0's default generator of `device`). One broadcast per request."""
    if ev.replicas == 1:
        return generator
    dev = generator.device if generator is not None else device
    if ev.is_root:
        state = generator.get_state() if generator is not None else (
            torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state())
    else:
        probe = torch.Generator(device=dev)
        state = torch.empty_like(probe.get_state())  # the state size is fixed per generator type
    buf = state.to(device)
    ev.broadcast(buf)
    if ev.is_root:
        return generator
    probe.set_state(buf.cpu())
    return probe


class PinnedStage:
    """Page-locked host rows for noise drawn by a CPU generator for a CUDA latent (diffusers draws on the CPU and
    copies). Two sets of rows are used in turn, each guarded by an event recorded after its copies were queued:
    the host waits on that event before writing the set again, so it never overwrites a row whose asynchronous
    copy to the device has not run yet (the copies queue behind the round's model call)."""

    def __init__(self, rows: int, shape, dtype, event=None):
        self.sets = [torch.empty(rows, *shape, dtype=dtype, pin_memory=torch.cuda.is_available()) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0
        self.event = event or (lambda: torch.cuda.Event())

    def take(self) -> torch.Tensor:
        """The next set of rows, safe to write."""
        s = self.turn
        if self.events[s] is not None:
            self.events[s].synchronize()
            self.events[s] = None
        return self.sets[s]

    def queued(self):
        """Call after queueing the copies out of the set `take` returned."""
        e = self.event()
        e.record()
        self.events[self.turn] = e
        self.turn ^= 1


def draw_noise(out: torch.Tensor, generator, dtype=None, host: torch.Tensor | None = None) -> torch.Tensor:
    """Fill `out` as diffusers' randn_tensor(out.shape, generator, device=out.device, dtype) would, cast to out's
    dtype (dtype None: out's). A CPU generator with a CUDA `out` draws on the CPU, into `host` (a pinned row of
    PinnedStage) when given, and copies asynchronously."""
    dtype = dtype or out.dtype
    gen_dev = generator.device.type if generator is not None else out.device.type
    if gen_dev == out.device.type:
        if dtype == out.dtype:
            return torch.randn(out.shape, generator=generator, dtype=dtype, device=out.device, out=out)
        return out.copy_(torch.randn(out.shape, generator=generator, dtype=dtype, device=out.device))
    if host is None or host.dtype != dtype:
        host = torch.empty(out.shape, dtype=dtype)
    torch.randn(out.shape, generator=generator, dtype=dtype, out=host)
    return out.copy_(host, non_blocking=host.is_pinned())
