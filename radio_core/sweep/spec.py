"""The sweep file: its pydantic schema and loading, with errors that name the file and field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from ..utils import real_path


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
    #: this entry's evaluation, merged over the sweep's ``eval`` entry by entry (e.g. more
    #: resolutions for the arms a comparison reads there).
    eval: dict[str, Any] = Field(default_factory=dict)


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


#: options of any ``eval:`` entry that choose data and subjects rather than evaluator arguments
LADDER_KEYS = ("data", "test_fraction", "max_per_class", "max_images", "head", "resolutions", "reduce_zero_label",
               "classes")


class SweepEval(Strict):
    """Evaluation of each finished run (radio_core.eval): ``fidelity``, ``knn``, ``zeroshot`` as
    below, and any other registered evaluator by name (``linear: {data: DIR, epochs: 50}``,
    ``seg: {data: DIR}``, a third party's): its ``LADDER_KEYS`` pick the data, the rest are the
    evaluator's arguments (checked against its factory when the sweep file is read)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    fidelity: Union[bool, FidelityEval] = False
    knn: Optional[KnnEval] = None
    zeroshot: Optional[LabelledEval] = None

    @model_validator(mode="after")
    def _other_evaluators(self) -> "SweepEval":
        from ..arguments import check_args
        from ..registry import PluginError, get_registry

        for name, value in (self.model_extra or {}).items():
            if value is None or value is False:
                continue
            if value is not True and not isinstance(value, dict):
                raise ValueError(f"eval.{name}: expected a mapping of the evaluator's arguments (or true), "
                                 f"got {type(value).__name__}")
            try:
                factory = get_registry().get("evaluator", name).factory
            except PluginError as exc:
                raise ValueError(f"eval.{name}: {exc}") from None
            args = {k: v for k, v in (value if isinstance(value, dict) else {}).items() if k not in LADDER_KEYS}
            problems = check_args("evaluator", name, factory, args, f"eval.{name}")
            if problems:
                raise ValueError(problems[0])
        return self

    @property
    def fidelity_spec(self) -> Optional[FidelityEval]:
        if self.fidelity is True:
            return FidelityEval()
        return self.fidelity or None

    def tasks(self) -> list[tuple[str, dict]]:
        """(evaluator name, options: LADDER_KEYS and evaluator arguments) of every enabled entry."""
        out = []
        fid = self.fidelity_spec
        if fid:
            out.append(("fidelity", fid.model_dump(exclude_none=True)))
        for name, entry in (("knn", self.knn), ("zeroshot", self.zeroshot)):
            if entry is not None:
                out.append((name, entry.model_dump(exclude_none=True)))
        for name, value in (self.model_extra or {}).items():
            if value is not None and value is not False:
                out.append((name, dict(value) if isinstance(value, dict) else {}))
        return out

    @property
    def enabled(self) -> bool:
        return bool(self.tasks())


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


class ComparisonRow(Strict):
    """One paired difference: ``a``'s value minus ``b``'s, per seed. A value is ``metric`` (for
    ``b``: ``b_metric`` if given), minus ``minus`` when given (a within-run change, e.g. the drop
    from 64 to 128 px; ``a`` and ``b`` then give a difference in differences)."""

    a: str
    b: str
    metric: str
    b_metric: Optional[str] = None
    minus: Optional[str] = None

    @property
    def label(self) -> str:
        m = self.metric if self.b_metric in (None, self.metric) else f"{self.metric} vs {self.b_metric}"
        return f"({m} - {self.minus})" if self.minus else m


Margin = Union[float, dict[str, float]]


def _check_margin(v: Margin) -> Margin:
    if isinstance(v, dict):
        if set(v) != {"fraction"} or not 0 < v["fraction"] < 1:
            raise ValueError("margin must be a number (absolute) or {fraction: f} with 0 < f < 1 (of the metric's gap)")
    elif not v > 0:
        raise ValueError("margin must be > 0")
    return v


class Comparison(Strict):
    """A published finding, tested on paired differences over seeds."""

    name: str
    #: what the paper (or report) claims, in words.
    finding: str = ""
    #: ``higher``: a > b; ``not_worse``: a no worse than b by more than the margin;
    #: ``equivalent``: |a - b| below the margin (two one-sided tests).
    claim: Literal["higher", "not_worse", "equivalent"]
    rows: list[ComparisonRow] = Field(min_length=1)
    #: smallest effect of interest for this comparison (default: the analysis's).
    margin: Optional[Annotated[Margin, AfterValidator(_check_margin)]] = None


class References(Strict):
    """Rows every arm is measured against, scored once by the sweep's evaluators (file
    ``references.json``): the teachers, raw pixels, and the student's architecture at random
    initialisation (one per seed of ``arm``'s finished runs), plus each evaluator's chance level."""

    #: the arm whose finished runs supply the teachers and the random initialisations.
    arm: str
    teachers: bool = True
    baselines: list[Literal["pixels", "random"]] = Field(default_factory=lambda: ["pixels", "random"])


class Analysis(Strict):
    """How comparisons are judged (see radio_core.sweep.stats.Judgement)."""

    #: no verdict below this many paired seeds.
    min_seeds: int = Field(5, ge=2)
    level: float = Field(0.95, gt=0.5, lt=1)
    #: smallest effect of interest: a number in the metric's units, or ``{fraction: f}`` of the
    #: metric's gap (``gaps``) between a floor and a ceiling reference.
    margin: Annotated[Margin, AfterValidator(_check_margin)] = Field(default_factory=lambda: {"fraction": 0.1})
    #: per metric name (before ``@``): ``[floor, ceiling]`` reference rows, e.g.
    #: ``miou: [raw, teacher/dino]``; the gap is ceiling - floor at the compared resolution (or
    #: at the reference's own one).
    gaps: dict[str, list[str]] = Field(default_factory=dict)
    #: arms whose retention (arm - floor) / (ceiling - floor) is reported, per ``retention_metrics``.
    retention_arms: list[str] = Field(default_factory=list)
    retention_metrics: list[str] = Field(default_factory=list)
    #: the arm whose seed-to-seed spread is set against the test-set noise.
    noise_arm: Optional[str] = None

    @field_validator("gaps")
    @classmethod
    def _gaps(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for metric, pair in v.items():
            if len(pair) != 2:
                raise ValueError(f"gaps.{metric}: give [floor, ceiling], two reference rows")
        return v


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
    #: the base recipe (relative to this file; a ``base:`` sweep file's own is relative to it).
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
    #: published findings tested on the arms (paired over seeds), and how they are judged.
    comparisons: list[Comparison] = Field(default_factory=list)
    analysis: Analysis = Field(default_factory=Analysis)
    references: Optional[References] = None

    def eval_for(self, entry_eval: Optional[dict] = None) -> "SweepEval":
        """The sweep's ``eval`` with a run entry's own merged over it, entry by entry."""
        if not entry_eval:
            return self.eval
        merged = self.eval.model_dump(mode="json", exclude_none=True)
        for name, value in entry_eval.items():
            base = merged.get(name)
            merged[name] = {**base, **value} if isinstance(base, dict) and isinstance(value, dict) else value
        return SweepEval.model_validate(merged)

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
        for r in self.runs:
            if r.eval:
                try:
                    self.eval_for(r.eval)
                except ValidationError as exc:
                    raise ValueError(f"runs: {r.name or r.overrides}: eval: {exc.errors()[0]['msg']}") from None
        if self.comparisons and (self.grid or any(r.name is None for r in self.runs)):
            raise ValueError("comparisons name arms: give every run entry a name and no grid")
        arms = {a for a in names}
        if self.references is not None and self.references.arm not in arms:
            raise ValueError(f"references.arm: {self.references.arm!r} is not a run (runs: {', '.join(names)})")
        for c in self.comparisons:
            for row in c.rows:
                for arm in (row.a, row.b):
                    if arm not in names:
                        raise ValueError(f"comparisons: {c.name!r} names arm {arm!r}, which is not a run "
                                         f"(runs: {', '.join(names)})")
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


def _read_sweep_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A sweep file's mapping with its ``base:`` chain merged in (mappings key by key, ``null``
    drops a key, lists are replaced); a base's ``recipe`` stays relative to the base's folder."""
    from ..recipe.loader import MAX_RECIPE_BYTES, deep_merge, parse_yaml
    from ..recipe.schema import RecipeError
    from ..utils import UserFileError, read_user_text

    real = real_path(path)
    if real in chain:
        raise SweepError(f"{path}: base: include cycle ({' -> '.join(str(p) for p in (*chain, real))})")
    if not path.exists() and not path.is_symlink():
        raise SweepError(f"sweep file not found: {path}")
    try:  # a FIFO, /dev/zero, a symlink loop or a huge file: one line, never a hang
        data = parse_yaml(read_user_text(path, "sweep file", MAX_RECIPE_BYTES), str(path))
    except (UserFileError, RecipeError) as exc:
        raise SweepError(str(exc)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SweepError(f"{path}: base: expected a path to another sweep file, got {type(base).__name__}")
    if len(chain) >= 8:
        raise SweepError(f"{path}: base: more than 8 levels of base files")
    base_path = path.parent / base
    parent = _read_sweep_mapping(base_path, (*chain, real))
    if isinstance(parent.get("recipe"), str) and "recipe" not in data:
        parent["recipe"] = str(real_path(base_path.parent / parent["recipe"]))
    return deep_merge(parent, data)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    data = _read_sweep_mapping(path)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(format_errors(exc, str(path), data)) from None
    if not (path.parent / spec.recipe).is_file():
        raise SweepError(f"{path}: recipe: base recipe {spec.recipe!r} not found (looked for "
                         f"{real_path(path.parent / spec.recipe)}; the path is relative to the sweep file)")
    return spec
