"""The sweep file: its pydantic schema and loading, with errors that name the file and field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


SEED_KEY = "train.seed"


def check_override(item: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    if key == "output_dir":
        raise ValueError("output_dir is set by the sweep (OUTPUT_DIR/runs/<name>); set the sweep's output_dir")
    return item


#: a dotted ``key.path=value`` override (the value is YAML), checked one by one.
Override = Annotated[str, AfterValidator(check_override)]


class RunEntry(Strict):
    #: directory name of the run (default: derived from its overrides).
    name: Optional[str] = None
    overrides: list[Override] = Field(default_factory=list)


class CacheShare(Strict):
    """Build one teacher-feature cache per group of runs whose teachers and crops agree."""

    #: fixed augmentations per image (the runs get ``augment.views`` = this).
    views: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)


class FidelityEval(Strict):
    #: held-out images from the recipe's ``eval.source``.
    images: int = Field(4, ge=1)
    #: student resolutions (default: the first training resolution).
    resolutions: Optional[list[int]] = None


class LabelledEval(Strict):
    #: image folder with one sub-folder per class; split into train/test by ``test_fraction``.
    data: str
    test_fraction: float = Field(0.3, gt=0, lt=1)
    #: teacher head whose summary is the embedding (default: backbone for kNN; the CLIP-like
    #: teacher for zero-shot).
    head: Optional[str] = None
    max_per_class: Optional[int] = Field(None, ge=1)


class KnnEval(LabelledEval):
    k: int = Field(20, ge=1)


class SweepEval(Strict):
    """Evaluation of each finished run (radio_core.eval)."""

    fidelity: Union[bool, FidelityEval] = False
    knn: Optional[KnnEval] = None
    zeroshot: Optional[LabelledEval] = None

    @property
    def fidelity_spec(self) -> Optional[FidelityEval]:
        if self.fidelity is True:
            return FidelityEval()
        return self.fidelity or None

    @property
    def enabled(self) -> bool:
        return bool(self.fidelity_spec or self.knn or self.zeroshot)


class LocalLauncher(Strict):
    """Every run on this machine, one after another (the default)."""

    name: Literal["local"] = "local"
    #: command that starts ``-m radio_core.run ...`` (default: this Python interpreter), e.g.
    #: ``[accelerate, launch, --num_processes, "8"]``.
    command: Optional[list[str]] = None


class RemoteLauncher(Strict):
    #: processes per run (default: the ranks the recipe's groups ask for, else 1); more than one
    #: are started with torchrun on the job's node.
    processes: Optional[int] = Field(None, ge=1)
    #: Python interpreter on the workers (default: this one; the paths must exist there).
    python: Optional[str] = None
    #: wait for the jobs and write the tables as they finish (false: submit and return; see
    #: ``--status``).
    wait: bool = True
    #: seconds between two looks at the jobs while waiting.
    poll_s: float = Field(10.0, gt=0)


class SlurmLauncher(RemoteLauncher):
    """Each run an sbatch job through submitit; pre-empted jobs checkpoint and requeue."""

    name: Literal["slurm"]
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    #: the job's time limit; jobs that reach it checkpoint and requeue (at most ``max_timeouts``).
    time_min: int = Field(24 * 60, ge=1)
    max_timeouts: int = Field(3, ge=0)
    gpus_per_node: Optional[int] = Field(None, ge=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, gt=0)
    #: seconds before the time limit at which SLURM warns the job (USR2): checkpoint + requeue.
    signal_delay_s: int = Field(120, ge=1)
    #: shell lines run before the job (``module load ...``, ``source venv/bin/activate``).
    setup: list[str] = Field(default_factory=list)
    #: any other sbatch option, e.g. ``{exclusive: true, mail_type: END}``.
    additional: dict[str, Any] = Field(default_factory=dict)
    #: job files and logs (default: OUTPUT_DIR/jobs).
    folder: Optional[str] = None
    #: ``local``: submitit's local executor (jobs are local processes), to try a sweep file
    #: without a cluster.
    cluster: Literal["slurm", "local"] = "slurm"


class RayLauncher(RemoteLauncher):
    """Each run a Ray job (Job Submission API) on a running Ray cluster."""

    name: Literal["ray"]
    #: the cluster's dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265).
    address: Optional[str] = None
    num_cpus: Optional[float] = Field(None, ge=0)
    num_gpus: Optional[float] = Field(None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    #: a pre-empted run (its node lost, or stopped after a checkpoint) is resubmitted this often.
    max_requeues: int = Field(3, ge=0)


def _launcher_shorthand(v: Any) -> Any:
    """``slurm`` -> ``{name: slurm}``; a list (the old form) -> a local launcher command."""
    if isinstance(v, str):
        return {"name": v}
    if isinstance(v, list):
        return {"name": "local", "command": v}
    if isinstance(v, dict) and "name" not in v:
        return {"name": "local", **v}
    return v


Launcher = Annotated[Union[LocalLauncher, SlurmLauncher, RayLauncher], Field(discriminator="name"),
                     BeforeValidator(_launcher_shorthand)]
LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher, "ray": RayLauncher}


class SweepSpec(Strict):
    recipe: str
    output_dir: str
    overrides: list[Override] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    runs: list[RunEntry] = Field(default_factory=list)
    #: every arm (grid point x run entry) is trained once per seed, as ``train.seed=<seed>``;
    #: tables then show mean and 95% confidence interval per arm.
    seeds: Optional[list[int]] = None
    #: the arm every other arm is compared with (its name, or one ``key=value`` override that
    #: singles it out); each difference is reported as resolved or inconclusive.
    baseline: Optional[str] = None
    cache: Optional[CacheShare] = None
    eval: SweepEval = Field(default_factory=SweepEval)
    #: where runs train: ``local`` (default), ``slurm`` or ``ray``, with their options.
    launcher: Launcher = Field(default_factory=LocalLauncher)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            check_override(f"{key}=x")
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None:
            if not v:
                raise ValueError("give at least one seed (or leave seeds out)")
            dup = sorted({s for s in v if v.count(s) > 1})
            if dup:
                raise ValueError(f"seeds {dup} are given more than once")
        return v

    @model_validator(mode="after")
    def _names(self) -> "SweepSpec":
        names = [r.name for r in self.runs if r.name is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"runs: names {dup} are given more than once")
        if self.seeds is not None:
            sets_seed = [o for o in self.overrides + [o for r in self.runs for o in r.overrides]
                         if o.partition("=")[0] == SEED_KEY] + ([SEED_KEY] if SEED_KEY in self.grid else [])
            if sets_seed:
                raise ValueError(f"seeds: the sweep also sets {SEED_KEY} ({sets_seed[0]}); "
                                 f"give seeds in one place only")
        return self


def _launcher_model(loc: tuple, data: Any) -> Optional[type[BaseModel]]:
    if loc[:1] != ("launcher",) or len(loc) != 2:
        return None
    raw = _launcher_shorthand(data.get("launcher")) if isinstance(data, dict) else None
    return LAUNCHERS.get(raw.get("name")) if isinstance(raw, dict) else None


def format_errors(exc: ValidationError, origin: str, data: Any = None) -> str:
    from ..recipe.loader import _model_at
    from ..utils import closest

    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"][:1] == ("launcher",) and len(err["loc"]) > 1 and err["loc"][1] in LAUNCHERS:
            # the union's tag is not a key of the file: launcher.slurm.partitoin -> launcher.partitoin
            err = {**err, "loc": ("launcher",) + tuple(err["loc"][2:])}
            loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "union_tag_invalid":
            msg = f"unknown launcher {err['input'].get('name')!r} (valid: {', '.join(LAUNCHERS)})"
        elif err["type"] == "extra_forbidden":
            parent = _launcher_model(err["loc"], data) or _model_at(SweepSpec, err["loc"][:-1])
            msg = "unknown key"
            if parent is not None:
                guess = closest(str(err["loc"][-1]), parent.model_fields)
                msg += f" (did you mean {guess!r}?)" if guess else f" (valid keys: {', '.join(parent.model_fields)})"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: {loc}: {msg}")
    return "\n".join(lines)


def load_sweep(path: str | Path) -> SweepSpec:
    from ..recipe.loader import MAX_RECIPE_BYTES, parse_yaml
    from ..recipe.schema import RecipeError
    from ..utils import UserFileError, read_user_text

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise SweepError(f"sweep file not found: {path}")
    try:  # a FIFO, /dev/zero, a symlink loop or a huge file: one line, never a hang
        data = parse_yaml(read_user_text(path, "sweep file", MAX_RECIPE_BYTES), str(path))
    except (UserFileError, RecipeError) as exc:
        raise SweepError(str(exc)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(format_errors(exc, str(path), data)) from None
    if not (path.parent / spec.recipe).is_file():
        raise SweepError(f"{path}: recipe: base recipe {spec.recipe!r} not found (looked for "
                         f"{(path.parent / spec.recipe).resolve()}; the path is relative to the sweep file)")
    return spec
