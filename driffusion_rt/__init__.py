"""driffusion_rt: DRiffusion draft-and-refine parallel sampling for diffusers models."""
from . import _source_tree  # noqa: F401  (first: driffusion_rt.kernels when imported from a source checkout)
from .evaluator import Shared
from .gmm import GaussianMixture, GaussianMixtureModel
from .plan import MODES, Plan, Round, make_plan
from .results import NonFiniteOutputError, SampleOutput, SampleStats
from .sampler import Sampler, sample
from .trajectory import Trajectory, UnsupportedScheduler

__all__ = ["sample", "Sampler", "SampleOutput", "SampleStats", "Trajectory", "UnsupportedScheduler", "make_plan",
           "Plan", "Round", "MODES", "GaussianMixture", "GaussianMixtureModel", "NonFiniteOutputError", "Shared"]
