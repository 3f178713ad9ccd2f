"""Building what a run trains with: the Accelerator, the teacher dtype, the optimiser and its
parameter groups, and the teacher-feature cache a recipe points to."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..data.cache import CacheMismatchError, FeatureCache, run_identity
from ..models.teachers import build_teacher
from ..recipe import Recipe
from ..registry import Registry


def make_accelerator(recipe: Recipe) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    plugin = fsdp_plugin(recipe.train.fsdp) if recipe.train.fsdp.enabled else None
    acc = Accelerator(
        # Without this, torchrun on a machine with no GPU silently gives N single processes.
        cpu=not torch.cuda.is_available(),
        mixed_precision=recipe.train.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        fsdp_plugin=plugin)
    if plugin is not None and acc.distributed_type.value == "MULTI_CPU":
        _fsdp_on_cpu(acc, plugin)
    return acc


def fsdp_plugin(spec: Any) -> Any:
    """Accelerate's FSDP2 plugin from ``train.fsdp``."""
    from accelerate import FullyShardedDataParallelPlugin

    kwargs: dict[str, Any] = dict(
        fsdp_version=2, reshard_after_forward=spec.reshard_after_forward, cpu_offload=spec.cpu_offload,
        state_dict_type="SHARDED_STATE_DICT" if spec.checkpoint == "sharded" else "FULL_STATE_DICT")
    if spec.wrap:
        kwargs.update(auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(spec.wrap))
    else:
        kwargs.update(auto_wrap_policy="size_based_wrap", min_num_params=spec.min_num_params)
    return FullyShardedDataParallelPlugin(**kwargs)


def _fsdp_on_cpu(acc: Any, plugin: Any) -> None:
    """Accelerate (1.x) selects FSDP only for accelerator backends and gives CPU ranks DDP, while
    torch's FSDP2 itself runs on CPU over gloo. Selecting it here lets CPU clusters (and the
    test suite) run the same sharded code path as GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def check_fsdp_wrap(recipe: Recipe, model: torch.nn.Module) -> None:
    """``train.fsdp.wrap`` names module classes of the student or heads (else Accelerate fails
    later with a message that names neither the field nor the choices)."""
    names = {type(m).__name__ for m in model.modules()}
    missing = [n for n in recipe.train.fsdp.wrap if n not in names]
    if missing:
        raise ValueError(f"train.fsdp.wrap: no module of class {', '.join(missing)} in the student or heads "
                         f"(classes: {', '.join(sorted(names))})")


def set_cpu_threads(recipe: Recipe, accelerator: Any) -> tuple[int, str]:
    """torch CPU threads for this process (``radio_core.train.threads``) and why; see that module."""
    from .threads import choose_threads, local_process_count

    n, why = choose_threads(recipe.train.cpu_threads, local_process_count(accelerator.num_processes))
    torch.set_num_threads(n)
    return n, why


def teacher_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    choice = recipe.train.teacher_dtype
    if choice == "auto":
        mp = recipe.train.mixed_precision
        choice = mp if mp != "no" and device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and tokens (1-d or named so)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "register", "token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_fused(recipe: Recipe, device: torch.device, sharded: bool) -> bool:
    """``optim.fused``, or by default: torch's fused AdamW wherever it has a kernel for the
    device (one kernel per parameter instead of a dozen; it also skips a non-finite step on the
    device, see ``radio_core.train.guard``). Sharded (FSDP) runs keep torch's own default."""
    if recipe.optim.fused is not None:
        return recipe.optim.fused
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return not sharded and device.type in _get_fused_kernels_supported_devices()


def build_optimizer(recipe: Recipe, model: torch.nn.Module, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``; ``fused``: see ``use_fused`` (None: torch decides)."""
    o = recipe.optim
    kwargs: dict[str, Any] = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(param_groups(model, o.weight_decay), **kwargs)


def open_cache(recipe: Recipe, all_teachers: list[str]) -> tuple[Optional[FeatureCache], set[str]]:
    """The recipe's teacher-feature cache and the teachers read from it (not built)."""
    spec = recipe.cache
    if spec is None:
        return None, set()
    cache = FeatureCache(spec.path)
    names = spec.teachers if spec.teachers is not None else [t for t in all_teachers if t in cache.teachers]
    for n in names:
        if n not in cache.teachers:
            raise CacheMismatchError(f"cache.teachers: {n!r} is not in the cache at {spec.path} "
                                     f"(it holds {', '.join(cache.teachers)})")
    views = recipe.augment.views
    if views is not None and views != cache.views:
        raise CacheMismatchError(f"augment.views is {views} but the cache at {spec.path} holds {cache.views} views")
    return cache, set(names)


def verify_cache(recipe: Recipe, registry: Registry, cache: FeatureCache, cached: set[str], source: Any,
                 crops: set[tuple[int, int]]) -> None:
    """Rebuild each cached teacher once (weights, no forward) and compare fingerprints, data,
    augmentation, seed and crop size with the cache's index."""
    torch.manual_seed(recipe.train.seed)
    teachers = {n: build_teacher(recipe, n, registry) for n in cached}
    crop = tuple(cache.index["augment"]["crop_size"])
    if crops != {crop}:
        raise CacheMismatchError(f"data.crop_size: this run crops {sorted(crops)}, the cache at "
                                 f"{cache.path} holds {crop[0]}x{crop[1]} crops; set data.crop_size "
                                 f"to [{crop[0]}, {crop[1]}]")
    cache.verify(run_identity(recipe, source, teachers, crop, cache.views))
