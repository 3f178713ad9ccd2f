"""Model cards: the ``README.md`` written into every export.

The card says what the model is and how it was made, from what the run left on disk: the
resolved recipe (``recipe.yaml``), the teachers and their dimensions (the export config), the
training steps and final losses (``metrics.jsonl``), fidelity to each teacher
(``report/fidelity.json``, else the last ``fidelity/*`` numbers logged in training), the scores
of ``radio eval`` tasks saved under ``eval/`` (proxy benchmarks), and how to load it. Missing
pieces are left out, never invented. The YAML front matter is the Hugging Face Hub's card metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

CARD_NAME = "README.md"


def _last_metrics(run_dir: Path) -> dict:
    """The last logged line of ``metrics.jsonl`` and the last fidelity numbers logged."""
    path = run_dir / "metrics.jsonl"
    last: dict = {}
    fidelity: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            last = row
            found = {k: v for k, v in row.items() if k.startswith("fidelity/")}
            if found:
                fidelity = found
    return {"last": last, "fidelity": fidelity}


def _fidelity_rows(run_dir: Path, logged: dict) -> list[tuple[str, str, float, Optional[float]]]:
    """(resolution, head, cosine, relative MSE) from the report, else from the training log."""
    rows = []
    report = run_dir / "report" / "fidelity.json"
    if report.is_file():
        for res, heads in json.loads(report.read_text()).items():
            for head, m in heads.items():
                rows.append((str(res), head, m.get("cosine"), m.get("rel_mse")))
        return rows
    by_key: dict[tuple[str, str], dict] = {}
    for key, value in logged.items():  # fidelity/<res>/<teacher>/<head>/<metric>
        parts = key.split("/")
        if len(parts) >= 4:
            by_key.setdefault((parts[1], "/".join(parts[2:-1])), {})[parts[-1]] = value
    return [(res, head, m.get("cosine"), m.get("rel_mse")) for (res, head), m in by_key.items()]


def _eval_results(run_dir: Path) -> list[tuple[str, dict]]:
    folder = run_dir / "eval"
    out = []
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            try:
                out.append((f.stem, json.loads(f.read_text())))
            except json.JSONDecodeError:
                continue
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def render_model_card(config: dict, run_dir: Optional[Path] = None, fmt: str = "radio-distill",
                      location: str = "EXPORT_DIR") -> str:
    """The card's text for an export ``config`` (``radio_core.model.export_config``) of the run in
    ``run_dir`` (None: only what the config tells); ``fmt``: radio-distill | transformers | radio | onnx."""
    student = config.get("student", {})
    teachers = config.get("teachers", {})
    run_dir = Path(run_dir) if run_dir is not None else None
    recipe_text = ""
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():
        recipe_text = (run_dir / "recipe.yaml").read_text()
    logged = _last_metrics(run_dir) if run_dir is not None else {"last": {}, "fidelity": {}}
    tags = ["radio-distill", "agglomerative-distillation", "vision", "feature-extraction"]
    lines = ["---", f"library_name: {'transformers' if fmt == 'transformers' else 'radio-distill'}",
             "pipeline_tag: image-feature-extraction", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    name = student.get("name", "?")
    args = student.get("args", {})
    lines += [f"# {args.get('model', name)} student distilled with radio-distill", "",
              f"An agglomerative student (plugin `{name}`, {student.get('num_cls_tokens', 1)} summary token(s)) "
              f"trained without labels to reproduce {len(teachers)} frozen teacher(s) through per-teacher "
              f"adaptor heads (AM-RADIO, Ranzinger et al., CVPR 2024).", ""]

    lines += ["## Teachers", "", "| teacher | plugin | model | summary dim | spatial dim | input |",
              "|---|---|---|---|---|---|"]
    recipe_teachers = _recipe_teachers(recipe_text)
    for tname, t in teachers.items():
        targs = recipe_teachers.get(tname, {})
        model = targs.get("model") or ("tiny random-init (offline)" if targs.get("tiny") not in (None, False) else "")
        if targs.get("pretrained"):
            model = f"{model} ({targs['pretrained']})"
        size = "x".join(str(s) for s in t.get("input_size", [])) or ""
        lines.append(f"| {tname} | {t.get('plugin') or ''} | {_fmt(model)} | {_fmt(t.get('summary_dim'))} | "
                     f"{_fmt(t.get('spatial_dim'))} | {size} |")
    lines.append("")

    last = logged["last"]
    lines += ["## Training", ""]
    if last:
        losses = ", ".join(f"{k} = {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
        lines.append(f"{last.get('step', '?')} optimiser steps, {last.get('samples', '?')} images seen; "
                     f"final losses: {losses or 'not logged'}.")
    else:
        lines.append("No training log was found beside this export.")
    res = config.get("resolution")
    if res:
        lines.append(f"Student resolution in training: {res[0]}x{res[1]}.")
    lines.append("")

    rows = _fidelity_rows(run_dir, logged["fidelity"]) if run_dir is not None else []
    if rows:
        lines += ["## Fidelity to the teachers", "",
                  "Cosine similarity and relative MSE of each adaptor head against its teacher on held-out images.",
                  "", "| resolution | head | cosine | relative MSE |", "|---|---|---|---|"]
        lines += [f"| {r} | {h} | {_fmt(c)} | {_fmt(m)} |" for r, h, c, m in rows]
        lines.append("")
    results = _eval_results(run_dir) if run_dir is not None else []
    if results:
        lines += ["## Benchmarks", "", "| task | result |", "|---|---|"]
        for task, result in results:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if not isinstance(v, (dict, list)))
            lines.append(f"| {task} | {shown} |")
        lines.append("")

    lines += ["## How to load", "", _how_to_load(fmt, location), ""]
    if recipe_text:
        lines += ["## Recipe", "", "The resolved recipe of the run (`radio train` input after `base:` and overrides):",
                  "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _how_to_load(fmt: str, location: str) -> str:
    ours = ("```python\nfrom radio_core.model import RadioModel\n\n"
            f"model = RadioModel.load(\"{location}\")            # or RadioModel.from_pretrained(...)\n"
            "summary, spatial = model(images)                  # [0, 1] RGB, sides multiples of model.size_multiple\n"
            "per_teacher = model.adaptor_outputs(images)       # {\"backbone\": ..., teacher: (summary, spatial)}\n```")
    if fmt == "transformers":
        return ("The backbone loads in transformers (no remote code):\n\n```python\nfrom transformers import AutoModel\n\n"
                f"model = AutoModel.from_pretrained(\"{location}\")\n"
                "out = model(pixel_values=images)                  # [0, 1] RGB\n"
                "out.summary, out.features                         # (B, k*D), (B, h*w, D)\n```\n\n"
                "With the adaptor heads (radio_adaptors.safetensors), through radio-distill:\n\n" + ours)
    if fmt == "radio":
        return ("An official-RADIO-layout checkpoint: `RadioModel.load(\"model.pth.tar\")` here, or the official "
                "loader (`torch.hub.load(\"NVlabs/RADIO\", \"radio_model\", version=PATH)`).")
    if fmt == "onnx":
        return ("```python\nimport onnxruntime\n\n"
                f"session = onnxruntime.InferenceSession(\"{location}/model.onnx\")\n"
                "outputs = session.run(None, {\"images\": images})   # float32 (B, 3, H, W) RGB in [0, 1]\n```\n\n"
                "The outputs are named in `model.onnx.json`: the backbone's summary and spatial features, then "
                "each teacher's heads.")
    return ours


def _recipe_teachers(recipe_text: str) -> dict:
    if not recipe_text:
        return {}
    try:
        import yaml

        data = yaml.safe_load(recipe_text) or {}
        return {k: dict((v or {}).get("args") or {}) for k, v in (data.get("teachers") or {}).items()}
    except Exception:  # noqa: BLE001 - a card without model names beats no card
        return {}


def write_model_card(directory: str | Path, config: dict, run_dir: Optional[str | Path] = None,
                     fmt: str = "radio-distill") -> Path:
    """Write ``README.md`` into ``directory`` (replacing an older card); returns its path."""
    directory = Path(directory)
    path = directory / CARD_NAME
    text = render_model_card(config, Path(run_dir) if run_dir is not None else None, fmt, location=str(directory))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


__all__ = ["render_model_card", "write_model_card", "CARD_NAME"]
