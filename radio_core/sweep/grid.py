"""Grid expansion: arms (grid point x run entry) times seeds, their names, resolved overrides,
validated recipes and teacher-feature cache keys."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..recipe import Recipe, RecipeError, apply_overrides, load_raw, validate
from ..utils import real_path
from .spec import SEED_KEY, RunEntry, SweepError, SweepSpec

MAX_NAME = 96


@dataclass
class PlannedRun:
    name: str
    #: the overrides that distinguish this run (as written in the sweep file, seed last).
    overrides: list[str]
    #: sweep-wide + run overrides with '*' expanded: what radio_core.run receives.
    resolved_overrides: list[str]
    run_dir: Path
    #: the arm this run belongs to (its name without the seed); equals ``name`` without seeds.
    arm: str = ""
    seed: Optional[int] = None
    recipe: Optional[Recipe] = None
    #: why the run cannot start (invalid overrides); it is then recorded as failed.
    error: Optional[str] = None
    cache_key: Optional[str] = None
    cache_identity: dict = field(default_factory=dict)
    #: the run entry's own ``eval`` (merged over the sweep's by ``SweepSpec.eval_for``).
    eval_override: dict = field(default_factory=dict)


def override_string(key: str, value: Any) -> str:
    """``key=value`` with the value written so that YAML reads it back unchanged."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        text = value if same else json.dumps(value)
    else:
        text = json.dumps(value)  # JSON is YAML: numbers, booleans, null, lists, mappings
    return f"{key}={text}"


def slug(text: str) -> str:
    """Filesystem-safe on Linux, macOS and Windows, and free of '=' (a run folder is passed on
    command lines as ``output_dir=<path>`` and often as a job name)."""
    text = re.sub(r"[^A-Za-z0-9._,+-]+", "_", text)
    return text.strip("_.") or "run"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix (at least two parts) that no other key shares."""
    def parts(k: str) -> list[str]:
        return [p for p in k.split(".") if p != "*"] or [k]

    out = {}
    for k in keys:
        p = parts(k)
        for n in range(min(2, len(p)), len(p) + 1):
            cand = ".".join(p[-n:])
            if all(o == k or not ".".join(parts(o)).endswith(cand) for o in keys):
                break
        out[k] = cand
    return out


def derive_name(overrides: Sequence[str], short: dict[str, str]) -> str:
    """``optim.lr=0.001`` -> ``optim.lr-0.001``; several joined by ','."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{short.get(key, key)}-{value}")
    name = slug(",".join(parts)) if parts else "base"
    if len(name) > MAX_NAME:  # stays unique and stable: the hash is of the full overrides
        name = name[:MAX_NAME - 9] + "-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return name


def expand_wildcards(data: dict, item: str) -> list[str]:
    """``teachers.*.summary_loss.name=mse`` -> one override per key under ``teachers``."""
    key, _, value = item.partition("=")
    parts = key.split(".")
    if "*" not in parts:
        return [item]
    found: list[str] = []

    def walk(node: Any, i: int, prefix: list[str]) -> None:
        if i == len(parts):
            found.append(".".join(prefix))
            return
        if parts[i] == "*":
            for k in node if isinstance(node, dict) else {}:
                walk(node[k], i + 1, prefix + [str(k)])
        else:
            walk(node.get(parts[i]) if isinstance(node, dict) else None, i + 1, prefix + [parts[i]])

    walk(data, 0, [])
    if not found:
        raise RecipeError(f"override {item!r}: '*' matches no key (at {'.'.join(parts[:parts.index('*')])})")
    return [f"{k}={value}" for k in found]


def resolve_overrides(base: dict, overrides: Sequence[str], source: str) -> tuple[dict, list[str]]:
    """Apply overrides one by one (a wildcard sees the keys earlier overrides created)."""
    data, resolved = base, []
    for item in overrides:
        expanded = expand_wildcards(data, item)
        data = apply_overrides(data, expanded, source)
        resolved += expanded
    return data, resolved


def cache_identity(recipe: Recipe, views: int) -> dict:
    """What determines teacher targets: teachers (plugin, weights args, resolution), data,
    augmentation, seed and crop size. Losses and weights do not, so loss ablations share."""
    def res(v: Any) -> Any:
        return [list(x) for x in v] if v else None

    return {
        "teachers": {n: {"plugin": t.plugin, "args": t.args, "resolution": list(t.resolution) if t.resolution else None}
                     for n, t in sorted(recipe.teachers.items())},
        "data": recipe.data.source.model_dump(mode="json"),
        "augment": {"scale": list(recipe.augment.scale), "ratio": list(recipe.augment.ratio),
                    "hflip": recipe.augment.hflip, "views": views},
        "seed": recipe.train.seed,
        # the crop is the largest teacher/student size unless data.crop_size fixes it
        "crop_size": list(recipe.data.crop_size) if recipe.data.crop_size else None,
        "student_resolution": res(recipe.student.resolution),
        "group_resolutions": {g: res(s.student_resolution) for g, s in sorted((recipe.groups or {}).items())},
        "stage_resolutions": [res(s.student_resolution) for s in recipe.stages or []],
    }


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _arms(spec: SweepSpec, out: Path) -> list[PlannedRun]:
    """One entry per arm and seed, named; names made unique without losing any run."""
    axes = [[override_string(k, v) for v in values] for k, values in spec.grid.items()]
    entries = spec.runs or [RunEntry()]
    short = short_keys(list(spec.grid) + [o.partition("=")[0] for e in entries for o in e.overrides])
    arms: list[tuple[str, list[str], dict]] = []
    for entry, combo in itertools.product(entries, itertools.product(*axes)):
        overrides = entry.overrides + list(combo)
        if entry.name is None:
            arms.append((derive_name(overrides, short), overrides, entry.eval))
        else:
            arms.append((slug(entry.name) + ("," + derive_name(list(combo), short) if combo else ""), overrides,
                         entry.eval))
    names = [a for a, _, _ in arms]
    arms = [(a + "-" + hashlib.sha1("\n".join(o).encode()).hexdigest()[:8] if names.count(a) > 1 else a, o, e)
            for a, o, e in arms]  # two arms slugged alike: keep both, told apart by their overrides

    runs = []
    for arm, overrides, entry_eval in arms:
        for seed in spec.seeds or [None]:
            if seed is None:
                runs.append(PlannedRun(arm, overrides, [], out / "runs" / arm, arm=arm, eval_override=entry_eval))
            else:
                name = f"{arm},seed-{seed}"
                runs.append(PlannedRun(name, overrides + [override_string(SEED_KEY, seed)], [], out / "runs" / name,
                                       arm=arm, seed=seed, eval_override=entry_eval))
    return runs


def plan(spec: SweepSpec, sweep_path: str | Path, output_dir: Optional[str | Path] = None) -> list[PlannedRun]:
    sweep_path = Path(sweep_path)
    out = Path(output_dir or spec.output_dir).absolute()
    base_path = real_path(sweep_path.parent / spec.recipe)
    try:
        base = load_raw(base_path)
        base, sweep_overrides = resolve_overrides(base, spec.overrides, f"{sweep_path}: overrides")
    except RecipeError as exc:
        raise SweepError(str(exc)) from None
    runs = _arms(spec, out)
    for r in runs:
        origin = f"{sweep_path} (run {r.name})"
        try:
            data, resolved = resolve_overrides(base, r.overrides, origin)
            r.recipe = validate(apply_overrides(data, [override_string("output_dir", str(r.run_dir))]), origin=origin)
            r.resolved_overrides = sweep_overrides + resolved
        except RecipeError as exc:
            r.error = str(exc)
            continue
        if spec.cache is not None:
            r.cache_identity = cache_identity(r.recipe, spec.cache.views)
            r.cache_key = identity_key(r.cache_identity)
            r.recipe = validate(apply_overrides(r.recipe.model_dump(mode="json"), [
                override_string("cache.path", str(out / "cache" / r.cache_key)),
                f"augment.views={spec.cache.views}"]), origin=origin)
    baseline_arm(spec, runs, sweep_path)  # a misspelt baseline fails before anything runs
    return runs


def baseline_arm(spec: SweepSpec, runs: Sequence[PlannedRun], sweep_path: str | Path = "sweep") -> Optional[str]:
    """The arm named by ``baseline``: an arm name, or the one arm holding that override."""
    if spec.baseline is None:
        return None
    arms = list(dict.fromkeys(r.arm for r in runs))
    if spec.baseline in arms:
        return spec.baseline
    holding = list(dict.fromkeys(r.arm for r in runs if spec.baseline in r.overrides))
    if len(holding) == 1:
        return holding[0]
    why = f"matches {len(holding)} arms ({', '.join(holding)})" if holding else "names no arm"
    raise SweepError(f"{sweep_path}: baseline: {spec.baseline!r} {why}; arms are: {', '.join(arms)}")
