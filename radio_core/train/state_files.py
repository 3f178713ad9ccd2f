"""A checkpoint's training state on disk, with no pickle anywhere: a checkpoint folder handed over by
someone else (a shared run, a download) can hold wrong numbers, never code.

Accelerate's ``save_state`` writes the optimiser and RNG states with ``torch.save`` and, under
FSDP, ``torch.distributed.checkpoint``'s ``.metadata`` file, a plain pickle that ``dcp.load``
unpickles. Checksums do not help: whoever plants a payload rewrites them. So a checkpoint here is
only safetensors (tensors) and JSON (everything else):

* ``model.safetensors``: the full state dict of the trained module (student + heads + losses'
  statistics), keys as ``Distiller.state_dict()``: what ``radio eval`` reads;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimiser state in torch's flattened
  fully-qualified form (``state.<param>.<key>`` tensors; ``param_groups.<param>.<key>`` values),
  which resumes on any world size;
* ``rng_rank<R>.safetensors``: each rank's torch (and CUDA) generator states, with Python's and
  NumPy's in its JSON header; plus the grad scaler's state in ``optimizer.json`` (fp16 runs);
* under FSDP, instead of the first two: ``sharded/``, one safetensors file per rank written and
  read by ``torch.distributed.checkpoint``'s Hugging Face storage (offsets in each file's JSON
  header, no metadata pickle; it reshards on load), and ``optimizer.json``; with
  ``train.fsdp.checkpoint: full`` also the gathered ``model.safetensors`` (what ``radio eval``
  reads). Resume always reads the shards.

Every rank calls ``save_state`` / ``load_state`` (collectives inside under FSDP).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import WeightsError, check_finite, read_safetensors, read_user_json

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SHARDED_DIR = "sharded"
#: files of Accelerate's own checkpoints (pickles): never read; a checkpoint holding them is refused.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".distcp", ".metadata")


class StateFileError(ValueError):
    """A checkpoint whose state files are missing, malformed or of another model."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, flatten_optimizer_state_dict=True)


def raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def _split(osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in osd.items() if k not in tensors}
    return tensors, values


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_state(folder: Path, accelerator: Any, model: Any, optimizer: Any, sharded: bool,
               gather: bool = False) -> None:
    """Write the model, optimiser, scaler and RNG states into ``folder`` (which exists).
    ``sharded``: FSDP (every rank writes its shard); ``gather``: under FSDP, also the full
    weights in ``model.safetensors``."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    folder = Path(folder)
    msd, osd = get_state_dict(model, raw_optimizer(optimizer), options=_options())
    tensors, values = _split(osd)
    if sharded:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save({**{f"model.{k}": v for k, v in msd.items()}, **{f"optim.{k}": v for k, v in tensors.items()}},
                 storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED_DIR), save_distributed=True))
        full = get_model_state_dict(model, options=_options(full=True)) if gather else None  # a collective
    if accelerator.is_main_process:
        if not sharded:
            save_file(_cpu(msd), str(folder / MODEL_FILE), metadata={"format": "pt"})
            save_file(_cpu(tensors), str(folder / OPTIMIZER_FILE), metadata={"format": "pt"})
        elif full is not None:
            save_file(_cpu(full), str(folder / MODEL_FILE), metadata={"format": "pt"})
        scaler = getattr(accelerator, "scaler", None)
        meta = {"param_groups": values, "scaler": scaler.state_dict() if scaler is not None else None}
        (folder / OPTIMIZER_META).write_text(json.dumps(meta))
    _save_rng(folder, accelerator.process_index)


def load_state(folder: Path, accelerator: Any, model: Any, optimizer: Any, sharded: bool) -> None:
    """Load what ``save_state`` wrote into the prepared ``model`` and ``optimizer``. Raises
    StateFileError (one line) for a missing or malformed file, a pickle file in the folder, or
    weights of another model; nothing is unpickled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.suffix in PICKLE_SUFFIXES or p.name in PICKLE_SUFFIXES)
    if pickles:
        raise StateFileError(f"holds pickle files ({', '.join(pickles[:3])}), which are never loaded: written by an "
                             "older radio-distill (Accelerate's format) or planted")
    meta = read_user_json(folder / OPTIMIZER_META, "optimizer state")
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), dict):
        raise StateFileError(f"{OPTIMIZER_META} is not an optimizer state (no param_groups mapping)")
    # The targets: this model's (sharded or full) state dicts, optimiser states initialised.
    msd, osd = get_state_dict(model, raw_optimizer(optimizer), options=_options())
    if sharded:
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        if not (folder / SHARDED_DIR).is_dir():
            raise StateFileError(f"no {SHARDED_DIR}/ folder: this checkpoint was not written by a sharded run")
        target = {**{f"model.{k}": v for k, v in msd.items()},
                  **{f"optim.{k}": v for k, v in _split(osd)[0].items()}}
        try:
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED_DIR)))
        except Exception as exc:  # noqa: BLE001 - dcp wraps per-rank failures: one line
            raise StateFileError(f"{SHARDED_DIR}/ does not match this model: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
        _all_finite(target, accelerator, f"{folder / SHARDED_DIR}")
    else:  # replicated (one process, DDP): the full tensors are this rank's own
        msd = read_safetensors(folder / MODEL_FILE, "checkpoint weights")
        osd = {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}
        osd.update(read_safetensors(folder / OPTIMIZER_FILE, "optimizer state"))
    osd.update(_param_groups(meta["param_groups"], osd))
    try:
        set_state_dict(model, raw_optimizer(optimizer), model_state_dict=msd, optim_state_dict=osd,
                       options=_options())
    except (RuntimeError, KeyError, ValueError) as exc:  # shapes or names of another model
        raise StateFileError(f"does not match the model this recipe builds: {' '.join(str(exc).split())[:300]}") \
            from None
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and isinstance(meta.get("scaler"), dict):
        scaler.load_state_dict(meta["scaler"])
    _load_rng(folder, accelerator.process_index)


def _param_groups(saved: dict, target: dict) -> dict:
    """The saved ``param_groups.*`` values, as the types the optimiser holds (tuples)."""
    out = {}
    for key, value in saved.items():
        if not key.startswith("param_groups."):
            raise StateFileError(f"{OPTIMIZER_META}: unexpected entry {key[:80]!r}")
        out[key] = tuple(value) if isinstance(target.get(key), tuple) and isinstance(value, list) else value
    return out


def _all_finite(state: dict[str, torch.Tensor], accelerator: Any, origin: str) -> None:
    """Every rank's shard finite; all ranks raise together (a lone raise would leave the others
    waiting in the next collective)."""
    local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()}
    problem = ""
    try:
        check_finite(local, origin)
    except WeightsError as exc:
        problem = str(exc)
    flag = torch.tensor([1.0 if problem else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    if float(flag.item()) > 0:
        raise StateFileError(problem or f"{origin}: non-finite values in another rank's shard")


# ----------------------------------------------------------------------------------- RNG
def _save_rng(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    header = {"python": json.dumps([version, list(internal), gauss]),
              "numpy": json.dumps([kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(folder / rng_file(rank)), metadata=header)


def _load_rng(folder: Path, rank: int) -> None:
    """This rank's generators, if the checkpoint has a file for it (a run resumed on more ranks
    than it was saved with reseeds the new ranks: the loop reseeds every step anyway)."""
    from safetensors import safe_open

    path = folder / rng_file(rank)
    if not path.is_file():
        return
    tensors = read_safetensors(path, "RNG state")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        version, internal, gauss = json.loads(header["python"])
        kind, keys, pos, has_gauss, cached = json.loads(header["numpy"])
        if not (isinstance(internal, list) and len(internal) == 625 and all(isinstance(i, int) for i in internal)
                and isinstance(keys, list) and len(keys) == 624):
            raise ValueError("wrong sizes")
        state = tensors["torch"]
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError("torch state is not a byte vector")
        random.setstate((int(version), tuple(internal), gauss))
        np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(state)
        cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateFileError(f"{path.name}: not a usable RNG state ({' '.join(str(exc).split())[:200]})") from None
