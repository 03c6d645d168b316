"""What --model names, found out without loading weights: a built-in model, a pipeline directory's configs, or a
hub id's configs (failing fast and saying why when it cannot be found), with the LoRA weights and ControlNets to load
into it. Its `rules` are what requests are checked against before the model loads (requests.parse)."""
import dataclasses
import json
import os
from dataclasses import dataclass, field

import huggingface_hub as hub
from huggingface_hub import constants, errors

from .pipelines import HUB_ID, REGISTRY, check_model_dir, family_of_class
from .pipelines.family import check_sequence as check_family_sequence
from .pipelines.tasks import families_with, task_class
from .pipelines.family import pipeline_classes
from .pipelines.lora import check_lora_path, parse_lora
from .requests import PipelineRules, RequestError, scheduler_name

BUILTIN = ("digits", "gmm", "fixed")
HUB_TIMEOUT_S = 10.0  # one attempt to reach the hub before saying there is no network


class ModelUnavailable(RequestError):
    """--model names nothing that can be loaded: a missing local path, a hub id without network, an unknown id."""


@dataclass(frozen=True)
class ModelRef:
    """What --model names, found out without loading weights."""
    arg: str                          # as given
    name: str                         # short name for output files and logs
    kind: str                         # digits, gmm, fixed or pipeline
    source: str = "builtin"           # builtin, local (a directory) or hub
    rules: PipelineRules | None = None
    loras: tuple = ()                 # (path, scale) of each LoRA loaded at start
    controlnets: tuple = ()           # ControlNetModel directories (the pipeline becomes the family's ControlNet one)
    configs: dict | None = field(default=None, compare=False)  # the pipeline's component configs, as read

    def check_sequence(self, resolved: dict | None, ulysses: int, ring: int):
        """Before loading: whether sequence groups of ulysses x ring ranks can split this model's calls (for a
        request's resolved values; None: the model alone). Raises ValueError naming the rule; the loaded model is
        checked again per request (services.check_sequence), with what only it knows (a video's frame count)."""
        if ulysses * ring == 1:
            return
        if self.kind != "pipeline":
            raise ValueError(f"--ulysses / --ring split a diffusers transformer's tokens across ranks; --model "
                             f"{self.arg} is a built-in model without one")
        check_family_sequence(REGISTRY[self.rules.family], self.configs or {}, resolved, ulysses, ring)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _component_files(index: dict) -> dict:
    """The config files of the components a size check needs: VAE, denoiser, scheduler."""
    files = {}
    for comp in ("vae", "unet", "transformer"):
        if isinstance(index.get(comp), (list, tuple)) and index[comp][0] is not None:
            files[comp] = f"{comp}/config.json"
    files["scheduler"] = "scheduler/scheduler_config.json"
    return files


def _local_configs(path: str) -> dict:
    try:
        index = check_model_dir(path)
    except (FileNotFoundError, ValueError) as e:
        raise ModelUnavailable(str(e)) from None
    configs = {"model_index": index}
    for comp, rel in _component_files(index).items():
        f = os.path.join(path, rel)
        if os.path.isfile(f):
            configs[comp] = _read_json(f)
    return configs


def _hub_error(repo: str, e: Exception, cached: bool) -> ModelUnavailable:
    """What went wrong reaching a hub model, in words: gated, unknown, another HTTP answer, or no network."""
    where = f"model {repo!r} is not a local directory, and the hub ({constants.ENDPOINT})"
    if isinstance(e, errors.GatedRepoError):
        return ModelUnavailable(f"{where} says it is gated: accept its license on the hub and log in (`hf auth login`)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ModelUnavailable(f"{where} has no such model (check the id; private models need `hf auth login`)")
    if isinstance(e, errors.HfHubHTTPError):
        return ModelUnavailable(f"{where} answered {str(e).splitlines()[0]}")
    # DNS, refused or timed-out connections: the HTTP client's own errors
    hint = ("it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there" if cached else
            "it is not in the local cache either; download it on a machine with network (`hf download`) or give a "
            "local pipeline directory")
    why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
    return ModelUnavailable(f"model {repo!r} is not a local directory, and there is no network to the hub "
                            f"({constants.ENDPOINT}: {why}); {hint}")


def _hub_configs(repo: str) -> dict:
    """model_index.json and the component configs of a hub model, from the cache or the hub: fails fast, saying
    whether the machine is offline, has no network, or the hub has no such model (or will not give it)."""
    cached = isinstance(hub.try_to_load_from_cache(repo, "model_index.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelUnavailable(f"model {repo!r} is not a local directory, and as a hub id it is not in the local "
                                   f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids downloading it")
        fetch = lambda rel: hub.try_to_load_from_cache(repo, rel)  # noqa: E731
    else:
        fetch = lambda rel: hub.hf_hub_download(repo, rel, etag_timeout=HUB_TIMEOUT_S)  # noqa: E731
    try:
        if not constants.HF_HUB_OFFLINE:
            hub.model_info(repo, timeout=HUB_TIMEOUT_S)
        configs = {"model_index": _read_json(fetch("model_index.json"))}
        for comp, rel in _component_files(configs["model_index"]).items():
            try:
                f = fetch(rel)
            except errors.EntryNotFoundError:  # a component without this file; loading will tell if it matters
                continue
            if isinstance(f, str):
                configs[comp] = _read_json(f)
    except ModelUnavailable:
        raise
    except Exception as e:
        raise _hub_error(repo, e, cached) from None
    return configs


def inspect_model(model: str, loras=(), controlnets=()) -> ModelRef:
    """Find out what --model names without loading weights. Raises ModelUnavailable saying what is wrong: a local
    path missing or incomplete, a hub id while offline or without network, or an id the hub does not know; LoRA
    weights ("PATH[:SCALE]") that do not exist, a ControlNet directory without its config, or ControlNets for a
    family that has no ControlNet pipeline."""
    if not isinstance(model, str) or not model:
        raise ModelUnavailable(f"model must be digits, gmm, fixed, a pipeline directory or a hub id; got {model!r}")
    if model in BUILTIN and (loras or controlnets):
        raise ModelUnavailable(f"LoRA weights and ControlNets apply to diffusers pipelines, not --model {model}")
    adapters = check_adapters(loras, controlnets)
    if model in BUILTIN:
        return ModelRef(model, model, model)
    name = model.rstrip("/").split("/")[-1] or model
    if os.path.isdir(model):
        configs, source = _local_configs(model), "local"
    elif os.path.exists(model):
        raise ModelUnavailable(f"model {model!r} is a file, not a pipeline directory (a folder with "
                               f"model_index.json) or a hub id ('org/name')")
    elif not HUB_ID.match(model):
        raise ModelUnavailable(f"model {model!r}: no such local directory, and it is not a hub id of the form "
                               f"'org/name'")
    else:
        configs, source = _hub_configs(model), "hub"
    try:
        rules = rules_of_configs(configs)
    except ValueError as e:  # an unsupported pipeline class
        raise ModelUnavailable(str(e)) from None
    if controlnets:
        if task_class(REGISTRY[rules.family], "controlnet") is None:
            raise ModelUnavailable(f"--controlnet: ControlNet is supported for the "
                                   f"{' and '.join(families_with('controlnet').split(', '))} families; "
                                   f"{model} is a {rules.family} pipeline")
        rules = dataclasses.replace(rules, task="controlnet", nets=len(controlnets))
    return ModelRef(model, name, "pipeline", source, rules, *adapters, configs=configs)


def check_adapters(loras, controlnets) -> tuple:
    """(loras as (path, scale) pairs, ControlNet directories), each checked to exist; raises ModelUnavailable."""
    pairs = []
    try:
        for spec in loras:
            path, scale = parse_lora(spec) if isinstance(spec, str) else tuple(spec)
            check_lora_path(path)
            pairs.append((path, scale))
    except (ValueError, FileNotFoundError) as e:
        raise ModelUnavailable(f"--lora: {e}") from None
    for path in controlnets:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelUnavailable(f"--controlnet {path!r} is not a ControlNetModel directory (no config.json)")
    return tuple(pairs), tuple(controlnets)


def rules_of_configs(configs: dict) -> PipelineRules:
    """PipelineRules from a pipeline's model_index.json and component configs: the family's own rules as
    diffusers' pipelines derive them at load time (Family.rules_from_configs), the shipped scheduler's short name,
    the task of the pipeline class."""
    import diffusers  # heavy: seconds to import (only to name the shipped scheduler)

    cls_name = configs["model_index"].get("_class_name")
    family = REGISTRY[family_of_class(cls_name)]
    cfg = configs.get("scheduler") or {}
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    scheduler = scheduler_name(cls.from_config(cfg)) if cls is not None else str(cfg.get("_class_name"))
    task = pipeline_classes(family).get(cls_name, "text2img")
    nets = 1 if task == "controlnet" else 0  # a saved ControlNet pipeline
    rules = family.rules_from_configs(configs)
    if rules is None:  # its rules come with the loaded pipeline
        return PipelineRules(family.name, None, "", None, scheduler, video=family.video, task=task, nets=nets)
    multiple, why, size, vae_scale = rules
    return PipelineRules(family.name, multiple, why, size, scheduler, task=task, nets=nets, vae_scale=vae_scale)
