"""CUDA-graph replay logic on CPU: a stand-in capture with the same static-buffer semantics as a real graph.

A real graph replays recorded kernels on the captured buffers; the stand-in recomputes from those same buffers
into the same output storage. So copy-in, keying and copy-out are checked here; perf/gpu_selfcheck.sh checks real
graphs against eager on a GPU.
"""
import torch
from diffusers import DDIMScheduler

from driffusion_rt import Trajectory
from driffusion_rt.cuda_graphs import GraphCache
from driffusion_rt.evaluator import ModelCall


def stand_in_capture(run):
    y = run()
    return (lambda: y.copy_(run())), y


def test_replayed_calls_equal_eager_calls_across_rounds_and_requests():
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 10)
    w = torch.randn(3, 3)
    calls = []

    def model(x, t, emb, scale):
        calls.append(x.data_ptr())
        return x * scale + emb.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000

    graphs = GraphCache(capture=stand_in_capture)
    latent = torch.randn(2, 3, 4, 4)
    for request in range(3):  # new prompt embeddings per request, same shapes: the graph is reused
        emb = torch.randn(2, 5, 3) @ w
        eager = ModelCall(model, traj, latent, {"emb": emb, "scale": 0.5})
        graphed = ModelCall(model, traj, latent, {"emb": emb, "scale": 0.5}, graphs)
        for idx in [(0,), (1, 2), (3, 4), (5,)]:
            states = torch.randn(len(idx), *latent.shape)
            a, b = torch.empty_like(states), torch.empty_like(states)
            eager(states, idx, a)
            graphed(states, idx, b)
            assert torch.equal(a, b), (request, idx)
    assert len(graphs.graphs) == 2  # one capture per (rows, shapes, kwargs signature): widths 1 and 2
    # a different non-tensor argument is baked into the graph, so it is captured separately
    ModelCall(model, traj, latent, {"emb": emb, "scale": 2.0}, graphs)(torch.randn(1, *latent.shape), (0,),
                                                                        torch.empty(1, *latent.shape))
    assert len(graphs.graphs) == 3
