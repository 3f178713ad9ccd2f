"""Registration of the proxy benchmark's components (light: heavy imports happen in factories).

* dataset ``proxy_world``: the images of one split of the proxy world (``split``, ``world``);
* evaluator ``proxy``: its downstream scores (``radio eval RUN proxy --teachers --baselines pixels random``);
* teachers ``proxy_clip``, ``proxy_dinov2``, ``proxy_sam``: specialist teachers trained on the
  proxy world on first use (cached by fingerprint), then loaded by the built-in ``clip``,
  ``dinov2`` and ``sam`` plugins through their local-checkpoint path.
"""
from __future__ import annotations

from typing import Any, Optional

from radio_core import hookimpl


def build_proxy_world(split: str = "train", world: Optional[dict] = None):
    from .world import ProxyWorldSource

    return ProxyWorldSource(split=split, world=world)


def _teacher_factory(kind: str):
    def factory(preset: str = "standard", world: Optional[dict] = None, resolution=None, meta: bool = False,
                **kwargs: Any):
        from .teachers import build_proxy_teacher

        return build_proxy_teacher(kind, preset=preset, world=world, resolution=resolution, meta=meta, **kwargs)

    factory.__name__ = f"build_proxy_{kind}_teacher"
    factory.__doc__ = (f"The proxy world's {kind} teacher (preset 'standard', or 'tiny' for tests), trained on first use "
                       "and loaded through the built-in plugin's local-checkpoint path.")
    return factory


def build_proxy_evaluator(world: Optional[dict] = None, limit: Optional[int] = None,
                          metrics: Optional[list[str]] = None, corruptions: Optional[list[str]] = None):
    """The proxy world's downstream scores: zero-shot (split into colour and shape), kNN, linear probe,
    mIoU, parts mIoU, each with its test-set standard error. world: the proxy world's options
    (default: the run's). limit: only the first N val and test images (smoke runs). metrics: a
    subset of zeroshot, knn, linear, miou, parts_miou. corruptions: also score on corrupted test
    images, NAME:SEVERITY each (gaussian_noise, gaussian_blur, jpeg; 1-5)."""
    from .downstream import build_proxy_evaluator as build

    return build(world, limit, metrics, corruptions)


@hookimpl
def radio_register(registry) -> None:
    registry.add("dataset", "proxy_world", build_proxy_world)
    registry.add("evaluator", "proxy", build_proxy_evaluator)
    for kind in ("clip", "dinov2", "sam"):
        registry.add("teacher", f"proxy_{kind}", _teacher_factory(kind))


#: the teacher plugins of this package, by kind
_TEACHER_PLUGINS = {f"proxy_{k}": k for k in ("clip", "dinov2", "sam")}


@hookimpl
def radio_prepare(recipe, teachers) -> None:
    """Train the run's missing proxy teachers in parallel before the factories ask for them."""
    jobs = []
    for name in teachers:
        spec = recipe.teachers[name]
        kind = _TEACHER_PLUGINS.get(spec.plugin.rsplit(":", 1)[-1])
        if kind is not None:
            args = spec.args or {}
            jobs.append((kind, args.get("preset", "standard"), args.get("world"), args.get("config")))
    if len(jobs) > 1:
        from .teachers import prepare_teachers

        prepare_teachers(jobs)
