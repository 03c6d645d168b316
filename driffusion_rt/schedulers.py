"""Schedulers by short name (`--scheduler dpm++2m-karras`), built from a model's own scheduler config.

Every affine diffusers scheduler runs through the runtime (trajectory.py probes it); these names are the ones the
command line, the engine and the pipelines accept. A named scheduler keeps the checkpoint's noise schedule
(betas, prediction type, timestep spacing, shift) and sets only what the name says. Names are grouped by the kind
of model they fit: noise-prediction (VP) models take the VP names; flow-matching models take the flow names.
"""
import inspect

# short name -> (diffusers class, config the name implies)
VP = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "use_karras_sigmas": True}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                "use_karras_sigmas": False}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
}
FLOW = {
    "flow": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-unipc": ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}),
    "flow-dpm++2m": ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                     "algorithm_type": "dpmsolver++", "solver_order": 2}),
}
NAMES = {**VP, **FLOW}
NONLINEAR_OFF = {"clip_sample": False, "thresholding": False}  # options the runtime cannot run, switched off
TOY = ("ddim", "ddpm", "euler", "flow")  # the built-in test models' schedules (gmm, fixed): `toy`


def name_of(scheduler) -> str | None:
    """The short name a scheduler instance answers to (None: a class or configuration without one)."""
    cls, cfg = type(scheduler).__name__, scheduler.config
    flow = cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas", False) \
        or cls.startswith("FlowMatch")
    for name, (c, implied) in (FLOW if flow else VP).items():
        if c == cls and all(cfg.get(k, v) == v for k, v in implied.items()):
            return name
    return None


def build(name: str, config, allowed=None):
    """The scheduler `name` built from a model's scheduler `config` (its schedule kept, the name's options set, and
    clip_sample / thresholding off). allowed: the names a model accepts (ValueError for others)."""
    import diffusers  # heavy: seconds to import

    allowed = tuple(NAMES) if allowed is None else tuple(allowed)
    if name not in NAMES or name not in allowed:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(allowed)}" if name not in NAMES else
                         f"scheduler {name!r} does not fit this model; choose one of {', '.join(allowed)}")
    cls_name, implied = NAMES[name]
    cls = getattr(diffusers, cls_name)
    params = inspect.signature(cls.__init__).parameters
    config = dict(config)
    if name in FLOW and "shift" in config and "flow_shift" in params:
        config.setdefault("flow_shift", config["shift"])  # FlowMatchEuler's shift is UniPC's / DPM's flow_shift
    if name in FLOW and "flow_shift" in config and "shift" in params:
        config.setdefault("shift", config["flow_shift"])  # and the reverse (Wan ships UniPC with a flow_shift)
    extra = {k: v for k, v in {**NONLINEAR_OFF, **implied}.items() if k in params}
    return cls.from_config(config, **extra)


def toy(name: str):
    """The schedule of the built-in test models (gmm, fixed): SD's scaled-linear betas for ddim, ddpm and euler,
    shift 3 for flow."""
    import diffusers  # heavy: seconds to import

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sd),
            "ddpm": lambda: diffusers.DDPMScheduler(clip_sample=False, **sd),
            "euler": lambda: diffusers.EulerDiscreteScheduler(**sd),
            "flow": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)}[name]()
