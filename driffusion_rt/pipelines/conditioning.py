"""Image tasks through the runtime: img2img, inpainting, ControlNet and editing, with the semantics of diffusers'
pipelines.

A pipeline's task comes from its class (tasks.py: `task_of`, `require`, `for_task`). A task's inputs are read and checked into one object before any work (`img2img`, `inpainting`, `control`, `edit`, or
`from_call` with a wrapped pipeline's own argument names). prepare.check calls its `begin` (the checks that need the
step count and batch, then `fit`: the output size and what only the loaded pipeline can tell; a service whose
request was checked already calls `fit` alone), prepare.encode its `encode_inputs` (what the prompt encoder reads
besides the prompt: an edit's image) and, once the prompt is encoded, its `prepare` (start state, trajectory, extra
model kwargs, and the mask blend of inpainting with a 4-channel UNet).

Under torchrun the image is VAE-encoded on rank 0 only (it draws from the request's generator, as the pipelines
do); the states built from it are broadcast, so every rank starts from rank 0's tensors.

    img2img(pipe, image, strength=0.6)              # any sd / sdxl / sd3 / flux pipeline
    inpainting(pipe, image, mask_image)             # sd / sdxl (4- or 9-channel UNet)
    control(cn_pipe, control_image)                 # a (Multi)ControlNet sd / sdxl pipeline
    edit(edit_pipe, image)                          # a qwen-image-edit pipeline
(api.py's image_to_image, inpaint, control_to_image and edit_image run them through the runtime.)
"""
import dataclasses
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..blend import MaskBlend
from ..distributed import collective, current, is_root
from ..evaluator import PerStep
from ..strength import check_strength, kept_steps, noised
from ..trajectory import Trajectory
from .family import get_family
from .images import first_image, image_count, read_image
from .prepare import choose_trajectory
from .tasks import default_strength, nets_of, require, task_class, task_of


# ---------------------------------------------------------------------------------------------- images


def _size(processor, image, height=None, width=None) -> tuple:
    """(height, width) the processor resizes `image` to (its own size, rounded down to the processor's factor,
    where height / width are None)."""
    return tuple(processor.get_default_height_width(first_image(image), height, width))


def _check_batch(n: int, batch: int, what: str):
    if batch % n:
        raise ValueError(f"{n} {what}s cannot be spread over {batch} images per request: pass one, or a number "
                         f"that divides the number of images (prompts x images per prompt)")


def _mask_processor(pipe):
    """The inpainting pipelines' mask processor (binarized grayscale in [0, 1]); a text-to-image pipeline has
    none, so it is built the same way."""
    proc = getattr(pipe, "mask_processor", None)
    if proc is None:
        from diffusers.image_processor import VaeImageProcessor  # heavy: diffusers takes seconds to import
        proc = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)
    return proc


def _control_processor(pipe):
    return pipe.control_image_processor


# ---------------------------------------------------------------------------------------------- shared parts


def _share(tensors: list) -> list:
    """Rank 0's tensors on every rank (one broadcast each under torchrun; nothing otherwise)."""
    if current() is None:
        return tensors
    out = [t.contiguous() for t in tensors]
    for t in out:
        collective("broadcast", dist.broadcast, t, 0)  # the runtime's group and timeout
    return out


def latent_channels(vae) -> int:
    """Channels of a VAE's latents (video VAEs such as Qwen-Image's name them z_dim)."""
    return vae.config.get("latent_channels") or vae.config["z_dim"]


def _encode(pipe, family, image, generator, batch, dtype, task):
    """VAE latents of a preprocessed image batch, expanded to the request's batch as the pipelines expand them
    (the whole batch repeated; img2img with one generator per image expands the images first, inpainting
    encodes them as given). Only rank 0 runs the VAE (its samples draw from the generator); the others get
    zeros of the same shape, which the caller's broadcast overwrites."""
    n, vae = image.shape[0], pipe.vae
    if image.shape[1] == latent_channels(vae):  # already latents, as the pipelines accept them
        lat = image.to(dtype)
    else:
        if isinstance(generator, list) and n < batch and task == "img2img":
            image, n = torch.cat([image] * (batch // n)), batch
        vsf = int(pipe.vae_scale_factor)
        if is_root():
            lat = family.encode_image(pipe, image, generator, task=task).to(dtype)
        else:
            lat = torch.zeros(n, latent_channels(vae), image.shape[2] // vsf, image.shape[3] // vsf,
                              dtype=dtype, device=image.device)
    return torch.cat([lat] * (batch // lat.shape[0])) if lat.shape[0] < batch else lat


def _noise(shape, generator, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers takes seconds to import
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)


def _geometry(pipe, family, kw, batch, height, width, device):
    """(shape-only latent, geometry kwargs) of the request, from the family's prepare with a throwaway generator
    (the request's generator must not be touched: the pipelines draw from it only for the image and noise)."""
    like, geometry = family.prepare(pipe, kw, batch=batch, height=height, width=width,
                                    generator=torch.Generator().manual_seed(0), latents=None, device=device)
    return like, geometry


def _from_noise(pipe, family, kw, sched, named_scheduler, steps, step_kwargs, *, batch, height, width, generator,
                latents, device):
    """(x, scheduler, trajectory) of a task that starts from noise as text-to-image does (ControlNet, editing): the
    family's noise and geometry kwargs (added to kw), the trajectory over the whole schedule."""
    x, geometry = family.prepare(pipe, kw, batch=batch, height=height, width=width, generator=generator,
                                 latents=latents, device=device)
    kw.update(geometry)
    sched, traj = choose_trajectory(family, sched, named_scheduler, steps,
                                    family.timesteps_kwargs(pipe, sched, x, steps), step_kwargs)
    return x, sched, traj


def _from_start(pipe, family, sched, named_scheduler, steps, tkw, step_kwargs, t_start):
    """The trajectory over timesteps[t_start * order:], the start index the pipelines' get_timesteps computes
    (re-probed if the scheduler had to be replaced by one of another order)."""
    order = lambda s: int(getattr(s, "order", 1))  # noqa: E731
    new, traj = choose_trajectory(family, sched, named_scheduler, steps, tkw, step_kwargs, t_start * order(sched))
    if order(new) != order(sched):
        traj = Trajectory.from_scheduler(new, steps, tkw, t_start * order(new), **step_kwargs)
    return new, traj


def _given_state(traj):
    """A trajectory whose start state is given as is: with start 0 (strength 1) the sampler would otherwise
    scale it by init_noise_sigma, which the img2img pipelines never apply to their noised image."""
    return traj if traj.start or traj.init_noise_sigma == 1.0 else dataclasses.replace(traj, init_noise_sigma=1.0)


class Task:
    """What every task's inputs share: by default the prompt encoder reads the prompt alone."""

    def encode_inputs(self, pipe, family) -> dict:
        """Keyword arguments for family.encode besides the prompt (an edit's image)."""
        return {}

    def resolved(self) -> dict:
        """What a rule counted from a request's resolved values needs of these inputs (an edit's image size: the
        sequence split's token rule), named as requests.py resolves them."""
        return {}


# ---------------------------------------------------------------------------------------------- img2img


@dataclass
class Img2Img(Task):
    """img2img inputs: the init image and the strength (the fraction of the schedule run on it)."""
    image: object
    strength: float
    task = "img2img"

    def begin(self, pipe, family, *, height, width, steps, batch, num_images, latents):
        if latents is not None:
            raise ValueError("latents cannot be given with an init image: img2img starts from the image, noised to "
                             "the strength's level")
        kept_steps(steps, self.strength, family.strength_rule)
        return self.fit(pipe, family, height=height, width=width, batch=batch, num_images=num_images)

    def fit(self, pipe, family, *, height, width, batch, num_images) -> tuple:
        """The output size (SD / SDXL: the image's own unless asked otherwise) and the image count's fit."""
        _check_batch(image_count(self.image), batch, "init image")
        if family.img2img_size_from_image:  # SD / SDXL img2img: the image's own size unless asked otherwise
            height, width = _size(pipe.image_processor, self.image, height, width)
        return height, width

    def prepare(self, pipe, family, kw, *, sched, named_scheduler, steps, step_kwargs, batch, height, width,
                generator, latents, device):
        like, geometry = _geometry(pipe, family, kw, batch, height, width, device)
        kw.update(geometry)
        tkw = family.timesteps_kwargs(pipe, sched, like, steps)
        t_start, _ = kept_steps(steps, self.strength, family.strength_rule)
        sched, traj = _from_start(pipe, family, sched, named_scheduler, steps, tkw, step_kwargs, t_start)
        dtype = kw["prompt_embeds"].dtype
        image = pipe.image_processor.preprocess(self.image, height=height, width=width)
        image = image.to(torch.float32).to(device=device, dtype=dtype)
        init = _encode(pipe, family, image, generator, batch, dtype, "img2img")
        noise = _noise(init.shape, generator, device, dtype)
        x = noised(sched, steps, traj.start, init, noise, tkw)
        if hasattr(family, "pack"):
            x = family.pack(pipe, x)
        x, = _share([x])
        return x, sched, _given_state(traj), None


# ---------------------------------------------------------------------------------------------- inpainting


@dataclass
class Inpaint(Task):
    """Inpainting inputs: the image, its mask (white / 1: repaint) and the strength."""
    image: object
    mask: object
    strength: float
    task = "inpaint"

    def begin(self, pipe, family, *, height, width, steps, batch, num_images, latents):
        if latents is not None:
            raise ValueError("latents cannot be given with inpainting: it starts from the image (noise where "
                             "strength is 1)")
        kept_steps(steps, self.strength, family.strength_rule)
        return self.fit(pipe, family, height=height, width=width, batch=batch, num_images=num_images)

    def fit(self, pipe, family, *, height, width, batch, num_images) -> tuple:
        """The image and mask counts' fit and the UNet's input channels; the output keeps the size asked for."""
        _check_batch(image_count(self.image), batch, "image")
        _check_batch(image_count(self.mask), batch, "mask image")
        if pipe.unet.config.in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a UNet with 4 (mask blend) or 9 (inpainting UNet) input channels, "
                             f"got {pipe.unet.config.in_channels}")
        return height, width  # the pipelines' default size is the model's, the image is resized to it

    def prepare(self, pipe, family, kw, *, sched, named_scheduler, steps, step_kwargs, batch, height, width,
                generator, latents, device):
        t_start, _ = kept_steps(steps, self.strength, family.strength_rule)
        like, geometry = _geometry(pipe, family, kw, batch, height, width, device)
        kw.update(geometry)
        tkw = family.timesteps_kwargs(pipe, sched, like, steps)
        sched, traj = _from_start(pipe, family, sched, named_scheduler, steps, tkw, step_kwargs, t_start)
        dtype, vsf = kw["prompt_embeds"].dtype, int(pipe.vae_scale_factor)
        shape = (batch, pipe.vae.config.latent_channels, height // vsf, width // vsf)
        full, four = self.strength == 1.0, pipe.unet.config.in_channels == 4
        init_image = pipe.image_processor.preprocess(self.image, height=height, width=width).to(torch.float32)
        mask = _mask_processor(pipe).preprocess(self.mask, height=height, width=width)
        masked_image = init_image * (mask < 0.5)
        # the pipelines' draws in their order: the image's latents (when used), the noise, the masked image's
        image_latents = None
        if four or not full:
            image_latents = _encode(pipe, family, init_image.to(device=device, dtype=dtype), generator, batch, dtype,
                                    "inpaint")
        noise = _noise(shape, generator, device, dtype)
        x = noise if full else noised(sched, steps, traj.start, image_latents, noise, tkw)
        masked = _encode(pipe, family, masked_image.to(device=device, dtype=dtype), generator, batch, dtype,
                         "inpaint")
        mask = torch.nn.functional.interpolate(mask, size=(height // vsf, width // vsf)).to(device=device, dtype=dtype)
        mask = torch.cat([mask] * (batch // mask.shape[0])) if mask.shape[0] < batch else mask
        x, noise, masked, *rest = _share([x, noise, masked] + ([] if image_latents is None else [image_latents]))
        blend = None
        if four:
            blend = MaskBlend.for_schedule(sched, steps, traj.start, mask, rest[0], noise, tkw)
        else:
            kw.update(mask=mask, masked_image_latents=masked)
        return x, sched, traj if full else _given_state(traj), blend


# ---------------------------------------------------------------------------------------------- ControlNet


def per_net(value, nets: int, name: str, kind=numbers.Real) -> list:
    """One float per ControlNet from a value or a list of them (ValueError naming `name` otherwise)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
    if len(values) != nets:
        raise ValueError(f"{name} has {len(values)} values for {nets} ControlNet(s)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"{name} must be a number (or one per ControlNet), got {v!r}")
    return [float(v) for v in values]


@dataclass
class Control(Task):
    """ControlNet inputs: one control image per net, and how strongly and over which part of the schedule each
    net steers (diffusers' controlnet_conditioning_scale, guess_mode, control_guidance_start / end)."""
    images: list
    scales: list
    guess_mode: bool
    starts: list
    ends: list
    task = "controlnet"

    def begin(self, pipe, family, *, height, width, steps, batch, num_images, latents):
        return self.fit(pipe, family, height=height, width=width, batch=batch, num_images=num_images)

    def fit(self, pipe, family, *, height, width, batch, num_images) -> tuple:
        """The output size (the control images' unless asked otherwise), which every control image must have."""
        proc = _control_processor(pipe)
        sizes = [_size(proc, im) for im in self.images]
        height = sizes[0][0] if height is None else height
        width = sizes[0][1] if width is None else width
        for k, (im, size) in enumerate(zip(self.images, sizes)):
            if size != (height, width):
                which = f"control image {k}" if len(self.images) > 1 else "the control image"
                raise ValueError(f"{which} is {size[0]}x{size[1]} (height x width, rounded down to a multiple of "
                                 f"{proc.config.vae_scale_factor}) but the output is {height}x{width}: pass control "
                                 f"images of the output size")
            n = image_count(im)
            if n != 1 and n * num_images != batch:
                raise ValueError(f"{n} control images for {batch // num_images} prompt(s): pass one, or one per "
                                 f"prompt")
        return height, width

    def prepare(self, pipe, family, kw, *, sched, named_scheduler, steps, step_kwargs, **start):
        x, sched, traj = _from_noise(pipe, family, kw, sched, named_scheduler, steps, step_kwargs, **start)
        batch, height, width, device = start["batch"], start["height"], start["width"], start["device"]
        nets, proc = nets_of(pipe), _control_processor(pipe)
        images = []
        for im in self.images:
            t = proc.preprocess(im, height=height, width=width).to(dtype=torch.float32)
            t = t.repeat_interleave(batch if t.shape[0] == 1 else batch // t.shape[0], dim=0)
            images.append(t.to(device=device, dtype=pipe.controlnet.dtype))
        n = traj.steps  # the pipelines' keep rule, by each step's index in the loop
        table = torch.tensor([[s * (1.0 - float(i / n < a or (i + 1) / n > b))
                               for s, a, b in zip(self.scales, self.starts, self.ends)] for i in range(n)],
                             dtype=torch.float32)
        guess = bool(self.guess_mode or nets[0].config.global_pool_conditions)
        kw.update(control_image=images, control_scale=PerStep(table), guess_mode=guess)
        return x, sched, traj, None


# ---------------------------------------------------------------------------------------------- editing


@dataclass
class Edit(Task):
    """Editing inputs: the image to edit, which the family's prompt encoder reads with the prompt and whose
    latents condition every call (qwen_image_edit.py)."""
    image: object
    task = "edit"

    def begin(self, pipe, family, *, height, width, steps, batch, num_images, latents):
        return self.fit(pipe, family, height=height, width=width, batch=batch, num_images=num_images)

    def fit(self, pipe, family, *, height, width, batch, num_images) -> tuple:
        """One image and one prompt; the output size defaults to the size the image is resized to."""
        if image_count(self.image) != 1 or batch != num_images:
            raise ValueError(f"an edit takes one image and one prompt per request (num_images for several results); "
                             f"got {image_count(self.image)} image(s) for {batch // num_images} prompt(s)")
        im = first_image(self.image)
        h, w = family.edit_size(im.height, im.width)
        return (h if height is None else height), (w if width is None else width)

    def encode_inputs(self, pipe, family) -> dict:
        return {"image": family.prompt_image(pipe, first_image(self.image))}

    def resolved(self) -> dict:
        im = first_image(self.image)
        return {"image": {"height": im.height, "width": im.width}}

    def prepare(self, pipe, family, kw, *, sched, named_scheduler, steps, step_kwargs, **start):
        x, sched, traj = _from_noise(pipe, family, kw, sched, named_scheduler, steps, step_kwargs, **start)
        dtype = kw["prompt_embeds"].dtype
        image = family.edit_pixels(pipe, first_image(self.image)).to(device=start["device"], dtype=dtype)
        lat, = _share([_encode(pipe, family, image, start["generator"], start["batch"], dtype, "edit")])
        family.condition(pipe, kw, lat)
        return x, sched, traj, None


# ---------------------------------------------------------------------------------------------- making inputs


def img2img(pipe, image, strength=None) -> Img2Img:
    """Checked img2img inputs for `pipe` (any pipeline of a family with img2img); strength None: the pipeline's
    own default."""
    family = get_family(pipe)
    require(family, "img2img", pipe)
    strength = default_strength(pipe, "img2img") if strength is None else check_strength(strength)
    return Img2Img(read_image(image, "image"), strength)


def inpainting(pipe, image, mask_image, strength=None) -> Inpaint:
    """Checked inpainting inputs for `pipe` (an sd / sdxl pipeline, text-to-image or inpainting)."""
    family = get_family(pipe)
    require(family, "inpaint", pipe)
    strength = default_strength(pipe, "inpaint") if strength is None else check_strength(strength)
    if mask_image is None:
        raise ValueError("inpainting needs mask_image (white: repaint, black: keep)")
    return Inpaint(read_image(image, "image"), read_image(mask_image, "mask_image"), strength)


def control(pipe, control_image, controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
            control_guidance_end=1.0) -> Control:
    """Checked ControlNet inputs for a ControlNet pipeline: one control image per net (MultiControlNet: a list
    with one entry per net, each an image or a list of images)."""
    family = get_family(pipe)
    require(family, "controlnet")
    nets = nets_of(pipe)
    if not nets:
        raise ValueError(f"a control image needs a ControlNet pipeline ({task_class(family, 'controlnet')}); "
                         f"this {type(pipe).__name__} has no controlnet: build one with "
                         f"for_task(pipe, 'controlnet', controlnet=ControlNetModel.from_pretrained(...))")
    if control_image is None:
        raise ValueError("a ControlNet pipeline needs a control image (image=)")
    if len(nets) > 1:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
            raise ValueError(f"a MultiControlNet of {len(nets)} nets takes a list of {len(nets)} control images "
                             f"(one per net)")
        images = [read_image(im, f"control image {k}") for k, im in enumerate(control_image)]
    else:
        images = [read_image(control_image, "control image")]
    scales = per_net(controlnet_conditioning_scale, len(nets), "controlnet_conditioning_scale", numbers.Real)
    starts = per_net(control_guidance_start, len(nets), "control_guidance_start", numbers.Real)
    ends = per_net(control_guidance_end, len(nets), "control_guidance_end", numbers.Real)
    for a, b in zip(starts, ends):
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"control_guidance_start {a:g} and control_guidance_end {b:g} must satisfy "
                             f"0 <= start < end <= 1")
    if not isinstance(guess_mode, bool):
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    return Control(images, scales, guess_mode, starts, ends)


def edit(pipe, image) -> Edit:
    """Checked editing inputs for an editing pipeline (qwen-image-edit)."""
    require(get_family(pipe), "edit", pipe)
    if image is None:
        raise ValueError(f"{type(pipe).__name__} edits an image: pass image= (the picture to edit)")
    return Edit(read_image(image, "image"))


def from_call(pipe, *, image=None, strength=None, mask_image=None, controlnet_conditioning_scale=1.0,
              guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0):
    """The inputs of a call with the wrapped pipeline's own argument names (what its __call__ takes by task;
    `image` is the control image of a ControlNet pipeline), or None for a text-to-image pipeline."""
    task, name = task_of(pipe), type(pipe).__name__
    controls = dict(controlnet_conditioning_scale=(controlnet_conditioning_scale, 1.0), guess_mode=(guess_mode, False),
                    control_guidance_start=(control_guidance_start, 0.0),
                    control_guidance_end=(control_guidance_end, 1.0))
    takes = {"text2img": (), "img2img": ("image", "strength"), "inpaint": ("image", "mask_image", "strength"),
             "controlnet": ("image",) + tuple(controls), "edit": ("image",)}[task]
    given = dict(image=(image, None), strength=(strength, None), mask_image=(mask_image, None), **controls)
    extra = [k for k, (v, default) in given.items() if k not in takes and v != default]
    if extra:
        raise TypeError(f"{name} does not take {', '.join(extra)}"
                        + (f" (it takes {', '.join(takes)})" if takes else ""))
    if task != "text2img" and image is None:
        raise ValueError(f"{name} needs image= ({'the control image' if task == 'controlnet' else 'the input image'})")
    if task == "img2img":
        return img2img(pipe, image, strength)
    if task == "inpaint":
        return inpainting(pipe, image, mask_image, strength)
    if task == "controlnet":
        return control(pipe, image, controlnet_conditioning_scale, guess_mode, control_guidance_start,
                       control_guidance_end)
    if task == "edit":
        return edit(pipe, image)
    return None


def lora_scale_of(pipe, cross_attention_kwargs=None, joint_attention_kwargs=None, attention_kwargs=None):
    """The per-call LoRA scale from diffusers' cross_attention_kwargs (SD, SDXL) / joint_attention_kwargs (SD3,
    Flux, Z-Image) / attention_kwargs (Qwen-Image, Flux.2) {"scale": s}; other keys are not supported through the
    runtime."""
    family = get_family(pipe)
    own = family.lora_kwargs
    given = {"cross_attention_kwargs": cross_attention_kwargs, "joint_attention_kwargs": joint_attention_kwargs,
             "attention_kwargs": attention_kwargs}
    other = [k for k, v in given.items() if k != own and v is not None]
    if other:
        raise TypeError(f"{type(pipe).__name__} does not take {other[0]} (it takes {own})")
    value = given[own]
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"scale"}:
        raise ValueError(f"{own} supports only {{'scale': s}} (the LoRA scale) through the runtime, got {value!r}")
    s = value.get("scale")
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise ValueError(f"{own}['scale'] must be a number, got {s!r}")
    return float(s)
