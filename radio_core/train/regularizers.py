"""Robustness regularisers the C-RADIO reports list, as named steps of a training step.

* **MESA** (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free"; reference code
  AngusDujw/SAF, ``MESA_train.py``): an EMA copy of the model is a second target. Facts from the
  reference: the EMA is timm's ``ModelEmaV2`` (a deep copy in eval mode, updated after every
  optimiser step, decay 0.9998), the extra term is ``reinforce`` (0.8 in its ImageNet run) x the
  distance between the model's and the EMA's outputs on the same input, from ``kl_start_epoch``
  on. The reference distils logits with a temperature-5 KL divergence; a feature student has
  no logits, so here (our choice) the distance is the cosine distance of every head's output to
  the EMA's, summary vectors and spatial grids alike (cosine is AM-RADIO's summary loss and most
  of its spatial one), averaged over the heads of the teachers in the batch. Parameters are
  averaged; buffers (target-norm statistics, power-iteration vectors) are copied (our choice;
  timm averages them too). The EMA is saved beside each checkpoint (``mesa_ema.safetensors``),
  so a resumed run continues it exactly.
* **DAMP** (Trinh et al., NeurIPS 2024, "Improving robustness to corruptions with
  multiplicative weight perturbations"; reference code trungtrinh44/DAMP): each micro-batch's
  forward and backward run with weights ``w * (1 + std * z)``, ``z ~ N(0, 1)``, a fresh draw per
  micro-batch and device, and the gradient taken at the perturbed weights updates the clean
  ones (``optimizers/optims.py``: the loss gradient is evaluated at the noisy parameters). The
  reference perturbs kernels and norm scales; the official RADIO code registers its DAMP
  parametrisation on every ``nn.Linear`` of the backbone (``radio/enable_damp.py``), which is
  what is perturbed here: the student's Linear weights (under σReparam, the raw weight before
  the spectral rescaling). The noise is a function of (seed, step, slot, micro-step), so a
  resumed run draws the same noise as an uninterrupted one.

Off by default; when off the trainer holds ``None`` for each and a step does no work for them.
"""
from __future__ import annotations

import contextlib
import copy
import random
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sampling import _mix
from ..utils import linear_weights, read_safetensors

#: tags DAMP's seed so that its noise is independent of every other per-step draw.
DAMP_STREAM = 0xDA3B
EMA_FILE = "mesa_ema.safetensors"


class Damp:
    """Multiplicative Gaussian noise on the student's Linear weights for one micro-step."""

    def __init__(self, student: nn.Module, std: float, seed: int) -> None:
        self.std, self.seed = std, seed
        self.weights = linear_weights(student)

    @contextlib.contextmanager
    def perturbed(self, step: int, slot_offset: int, micro: int) -> Iterator[None]:
        """Inside: the weights are perturbed; on exit the clean weights are put back (gradients,
        taken at the perturbed weights, stay)."""
        seed = _mix(self.seed, step, slot_offset, micro, DAMP_STREAM)
        generators: dict[torch.device, torch.Generator] = {}
        saved = []
        with torch.no_grad():
            for p in self.weights:
                gen = generators.get(p.device)
                if gen is None:
                    gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                saved.append(p.detach().clone())
                noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                p.mul_(noise.mul_(self.std).add_(1).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, clean in zip(self.weights, saved):
                    p.copy_(clean)


class Mesa:
    """The EMA model (student + heads) and the MESA term of the objective."""

    def __init__(self, model: nn.Module, weight: float, decay: float, start_step: int) -> None:
        self.weight, self.decay, self.start_step = weight, decay, start_step
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self._pairs = [(e, m) for (_, e), (_, m) in zip(self.ema.named_parameters(), model.named_parameters())]
        self._buffers = [(e, m) for (_, e), (_, m) in zip(self.ema.named_buffers(), model.named_buffers())]

    def active(self, step: int) -> bool:
        return step >= self.start_step

    @torch.no_grad()
    def update(self, applied: Optional[Tensor] = None) -> None:
        """After an optimiser step: ema <- decay * ema + (1 - decay) * model. ``applied``: a 0-d
        device tensor, 0 when the optimiser skipped the step on the device (the EMA then stays
        as it was, as after a step skipped on the host), 1 otherwise."""
        if self._pairs:
            ema, model = [e for e, _ in self._pairs], [m.detach() for _, m in self._pairs]
            if applied is None:
                torch._foreach_lerp_(ema, model, 1 - self.decay)
            else:  # a weight per tensor (a single tensor weight would be read on the host)
                torch._foreach_lerp_(ema, model, [applied * (1 - self.decay)] * len(ema))
        for e, m in self._buffers:
            e.copy_(m if applied is None else torch.where(applied > 0, m, e))

    @torch.no_grad()
    def targets(self, images: Tensor, active: set[str]) -> dict[str, tuple[Optional[Tensor], Optional[Tensor]]]:
        """The EMA model's head outputs on the student's input. The RNG is forked, so the
        student's own forward afterwards draws exactly what it would without MESA."""
        python_state = random.getstate()
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                _, preds = self.ema(images, return_predictions=True, active=active)
        finally:
            random.setstate(python_state)
        return preds

    def distance(self, preds: dict, ema_preds: dict, active: set[str], keep: Optional[Tensor] = None) -> Tensor:
        """Mean cosine distance between the heads' outputs and the EMA's (teachers in
        ``active``; ``keep``: indices of the readable samples)."""
        parts = []
        for name in active:
            for pred, target in zip(preds[name], ema_preds[name]):
                if pred is None or target is None:
                    continue
                if keep is not None:
                    pred, target = pred[keep], target[keep]
                if pred.shape[0]:
                    parts.append((1 - F.cosine_similarity(pred.float(), target.float(), dim=1)).mean())
        if not parts:
            return next(p for pair in preds.values() for p in pair if p is not None).new_zeros(())
        return torch.stack(parts).mean()

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone().cpu() for k, v in self.ema.state_dict().items()},
                  str(Path(directory) / EMA_FILE))

    def load(self, directory: Path) -> None:
        path = Path(directory) / EMA_FILE
        state = read_safetensors(path, "MESA EMA")
        own = self.ema.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"{path}: the EMA does not match this recipe's model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        self.ema.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in state.items()})


def build(recipe, model: nn.Module) -> tuple[Optional[Mesa], Optional[Damp]]:
    """The recipe's regularisers (None where off); ``model``: the unwrapped student + heads."""
    t = recipe.train
    mesa = Mesa(model, t.mesa.weight, t.mesa.decay, t.mesa.start_step) if t.mesa is not None else None
    damp = Damp(model.student, t.damp.std, t.seed) if t.damp is not None else None
    return mesa, damp
