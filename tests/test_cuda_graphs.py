"""CUDA-graph replay logic on CPU: a stand-in capture with the same static-buffer semantics as a real graph.

A real graph replays recorded kernels on the captured buffers; the stand-in recomputes from those same buffers
into the same output storage. So copy-in, keying, the shared pool, eviction and tensor scalars are checked here;
perf/gpu_proof.py checks real graphs against eager on a GPU.
"""
import pytest
import torch
from diffusers import DDIMScheduler

import tiny_pipelines as tp
from driffusion_rt import Trajectory, pipelines, services
from driffusion_rt.cuda_graphs import GraphCache
from driffusion_rt.evaluator import ModelCall
from driffusion_rt.fixed_cost import FixedCostModel
from driffusion_rt.gmm import GaussianMixtureModel


class StandIn:
    """capture(run, pool) -> (replay, static output), recording the pools it was given."""

    def __init__(self):
        self.pools = []

    def __call__(self, run, pool):
        self.pools.append(pool)
        y = run()
        return (lambda: y.copy_(run())), y


def cache(size=16):
    return GraphCache(capture=StandIn(), size=size, new_pool=object)


def test_replayed_calls_equal_eager_calls_across_rounds_and_requests():
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 10)
    w = torch.randn(3, 3)
    calls = []

    def model(x, t, emb, scale):
        calls.append(x.data_ptr())
        return x * scale + emb.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000

    graphs = cache()
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
    # a model without tensor_scalars gets its float kwargs baked into the graph: a new value is a new capture
    ModelCall(model, traj, latent, {"emb": emb, "scale": 2.0}, graphs)(torch.randn(1, *latent.shape), (0,),
                                                                        torch.empty(1, *latent.shape))
    assert len(graphs.graphs) == 3


def test_tensor_scalars_replay_a_new_float_without_capturing_again():
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 10)
    seen = []

    class Model:
        tensor_scalars = True

        def __call__(self, x, t, scale, flag):
            seen.append(type(scale))
            return x * scale if flag else x - scale

    graphs, latent = cache(), torch.randn(2, 3, 4, 4)
    states = torch.randn(1, *latent.shape)
    for scale in (0.5, 7.25, -3.0):
        a, b = torch.empty_like(states), torch.empty_like(states)
        ModelCall(Model(), traj, latent, {"scale": scale, "flag": True})(states, (0,), a)
        ModelCall(Model(), traj, latent, {"scale": scale, "flag": True}, graphs)(states, (0,), b)
        assert torch.equal(a, b) and torch.equal(a, states * scale)
    assert graphs.captures == 1
    assert float in seen and torch.Tensor in seen  # eager calls see the float, captured ones a 0-d tensor
    # a bool is a decision: keyed by value, it captures again
    ModelCall(Model(), traj, latent, {"scale": 1.0, "flag": False}, graphs)(states, (0,), torch.empty_like(states))
    assert graphs.captures == 2


def test_graphs_share_one_pool_and_the_cache_is_bounded():
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 10)
    graphs, latent = cache(size=2), torch.randn(1, 2, 4, 4)
    model = lambda x, t: x * 2  # noqa: E731
    call = ModelCall(model, traj, latent, None, graphs)
    for idx in [(0,), (1, 2), (3, 4, 5), (6,), (7, 8, 9)]:  # widths 1, 2, 3, 1, 3
        states = torch.randn(len(idx), *latent.shape)
        out = torch.empty_like(states)
        call(states, idx, out)
        assert torch.equal(out, states * 2)
    assert len(graphs.graphs) == 2 and graphs.captures == 4  # width 2 was evicted; width 1 came back recaptured
    assert sorted(k[0][0] for k in graphs.graphs) == [1, 3]
    pools = graphs.capture.pools
    assert len(pools) == 4 and all(p is pools[0] for p in pools)  # one pool for every capture
    with pytest.raises(ValueError, match="size must be >= 1"):
        GraphCache(size=0)


def test_a_model_that_cannot_be_captured_runs_eagerly():
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 10)

    class Syncing:
        cuda_graphs = False

        def __call__(self, x, t):
            return x + t.tolist()[0]

    graphs, latent = cache(), torch.randn(1, 2, 4, 4)
    states = torch.randn(1, *latent.shape)
    out = torch.empty_like(states)
    ModelCall(Syncing(), traj, latent, None, graphs)(states, (3,), out)
    assert graphs.captures == 0 and torch.equal(out, states + traj.timesteps[3].item())
    assert FixedCostModel.cuda_graphs and GaussianMixtureModel.cuda_graphs  # both capturable (device-side work only)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs_pipes")
    out = {}
    for kind in ("sd15", "flux"):
        pipe = pipelines.load_pipeline(tp.build(kind, str(root / kind)))
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe
    return out


@pytest.mark.parametrize("kind,opts", [
    ("sd15", dict(negative_prompt="blurry", guidance_rescale=0.7)),
    ("sd15", dict()),
    ("flux", dict(negative_prompt="ugly", true_cfg_scale=3.0, max_sequence_length=tp.T5_MAX_LEN)),
], ids=["sd-cfg-rescale", "sd-cfg", "flux-true-cfg"])
def test_pipeline_adapters_take_guidance_as_tensors(tiny, kind, opts):
    """The adapters under graphs (guidance as 0-d tensors) equal their eager calls bit for bit, and a new guidance
    value replays the graph already captured."""
    pipe = tiny[kind]
    model = pipelines.model_adapter(pipe)
    graphs = cache()
    for g in (4.0, 6.5):
        req = pipelines.prepare(pipe, "a red cat", steps=6, guidance_scale=g, height=32, width=32, seed=1, **opts)
        kw = req.model_kwargs
        assert not any(isinstance(v, torch.Tensor) and v.dim() == 0 for v in kw.values())
        for idx in [(0,), (1, 2)]:
            states = torch.randn(len(idx), *req.latents.shape, generator=torch.Generator().manual_seed(len(idx)))
            a, b = torch.empty_like(states), torch.empty_like(states)
            ModelCall(model, req.trajectory, req.latents, kw)(states, idx, a)
            ModelCall(model, req.trajectory, req.latents, kw, graphs)(states, idx, b)
            assert torch.equal(a, b), (g, idx)
    assert graphs.captures == 2  # widths 1 and 2, once each: the second guidance value captured nothing


def test_gmm_service_requests_carry_their_trajectory():
    """A replayed graph runs the model object it captured with the new request's inputs: the Gaussian-mixture
    service must put the trajectory in those inputs (earlier, the swapped-in model of a later request was
    ignored by the replay of the first one)."""
    from driffusion_rt.requests import parse
    service = services.load_service("gmm", torch.device("cpu"))
    first = service.prepare(parse({"steps": 10, "scheduler": "ddim"}, service))
    captured = service.model.inner  # what a graph captured on the first request would replay
    second = service.prepare(parse({"steps": 10, "scheduler": "euler"}, service))
    x = torch.randn(2, *second.latents.shape[1:])
    t = second.trajectory.timesteps[[3, 3]]
    right = service.model.inner(x, t, **{k: v.value for k, v in second.model_kwargs.items()})
    replayed = captured(x, t, **{k: v.value for k, v in second.model_kwargs.items()})
    assert torch.equal(replayed, right)
    assert first.model_kwargs["trajectory_table"].value.shape == second.model_kwargs["trajectory_table"].value.shape
    with pytest.raises(ValueError, match="not on this model's trajectory"):
        captured(x, t)  # without the table the first model does not know the second trajectory's timesteps
