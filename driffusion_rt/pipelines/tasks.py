"""Which pipeline class serves which image task, and what a task needs of a family and a pipeline.

Each family maps the diffusers classes it serves to a task: "text2img", "img2img", "inpaint", "controlnet" or
"edit" (Family.pipeline_classes). `task_of` reads a loaded pipeline's, `require` checks that a family (and a loaded
pipeline) can run a task, `for_task` builds another task's pipeline from the same components, `default_strength`
reads the strength a pipeline's __call__ defaults to. The tasks' inputs are in conditioning.py.
"""
import inspect

from .family import FAMILIES, REGISTRY, family_of, get_family, pipeline_classes

TASKS = ("text2img", "img2img", "inpaint", "controlnet", "edit")
TASK_NAMES = {"img2img": "img2img", "inpaint": "inpainting", "controlnet": "ControlNet", "edit": "editing"}


def nets_of(pipe) -> list:
    """The ControlNets of a pipeline (a MultiControlNet's nets), none without."""
    net = getattr(pipe, "controlnet", None)
    return [] if net is None else list(getattr(net, "nets", [net]))


def task_of(pipe) -> str:
    """The task of a loaded pipeline (one of TASKS), by its class."""
    for cls in type(pipe).__mro__:
        fam = FAMILIES.get(cls.__name__)
        if fam is not None:
            return pipeline_classes(REGISTRY[fam])[cls.__name__]
    family_of(pipe)  # raises: unsupported family
    return "text2img"


def task_class(family, task: str) -> str | None:
    """The diffusers class name serving `task` in a family, None when the family has none."""
    return next((name for name, t in pipeline_classes(family).items() if t == task), None)


def families_with(task: str) -> str:
    return ", ".join(f.name for f in REGISTRY.values() if task_class(f, task) is not None)


def require(family, task: str, pipe=None):
    """ValueError unless the family has `task`, and the loaded pipeline (when given) can run it."""
    if task_class(family, task) is None:
        raise ValueError(f"{TASK_NAMES[task]} is supported for the {families_with(task)} families; the "
                         f"{family.name} pipeline has none")
    if pipe is not None and task != "controlnet" and nets_of(pipe):
        raise ValueError(f"{TASK_NAMES[task]} on a ControlNet pipeline ({type(pipe).__name__}) is not supported: "
                         f"use the family's own pipeline")
    unet = getattr(pipe, "unet", None)
    if task == "img2img" and unet is not None and unet.config.in_channels != unet.config.out_channels:
        raise ValueError(f"img2img needs a UNet whose input is the latent alone; this one takes "
                         f"{unet.config.in_channels} channels (an inpainting UNet: use inpaint)")


def for_task(pipe, task: str, **components):
    """The family's pipeline for `task` on `pipe`'s components (diffusers' from_pipe: no weights are copied).
    components: what the task adds, e.g. controlnet=ControlNetModel (or a list of them) for "controlnet"."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    family = get_family(pipe)
    if task != "text2img":
        require(family, task)
    if task_of(pipe) == task and not components:
        return pipe
    import diffusers  # heavy: seconds to import
    return getattr(diffusers, task_class(family, task)).from_pipe(pipe, **components)


def default_strength(pipe, task: str) -> float:
    """The strength the pipeline's own __call__ defaults to (SD img2img 0.8, SDXL img2img 0.3, SD3 / Flux 0.6,
    inpainting SD 1.0, SDXL 0.9999)."""
    if task_of(pipe) == task:
        return float(inspect.signature(type(pipe).__call__).parameters["strength"].default)
    return family_default_strength(get_family(pipe), task)


def family_default_strength(family, task: str) -> float:
    """default_strength of the family's pipeline class for `task`, known without a loaded pipeline."""
    import diffusers  # heavy: seconds to import
    cls = getattr(diffusers, task_class(family, task))
    return float(inspect.signature(cls.__call__).parameters["strength"].default)
