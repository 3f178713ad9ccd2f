"""What commands read from a run folder can be anything: ``radio export`` and ``radio eval report``
cope with malformed ``metrics.jsonl``, ``report/fidelity.json`` and ``eval/*.json`` (and FIFOs in
their place) by leaving out what they cannot read; an ``--out`` that is an existing file, a FIFO
or a symlink loop is one error line; and the model card escapes every string that came from a
recipe or a run's files (no HTML or script survives, no code fence can be closed early)."""
import json
import os
import re
import shutil

import pytest

from radio_core.cli import main as radio
from radio_core.recipe import dump_recipe

from test_loading_errors import export_dir, run_dir  # noqa: F401 - fixtures
from test_model_api import make_recipe


@pytest.fixture
def run(export_dir, tmp_path):  # noqa: F811 - the fixture imported above
    """A finished run's folder: recipe.yaml + export/ (+ what each case adds)."""
    run = tmp_path / "run"
    shutil.copytree(export_dir, run / "export")
    (run / "recipe.yaml").write_text(dump_recipe(make_recipe()))
    return run


def _fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


MALFORMED = {
    "metrics_garbage": lambda r: (r / "metrics.jsonl").write_text('{"step": 1, "loss/total": "high"}\n[1, 2]\n'
                                                                   '"text"\n{"step": 2, "loss/total": 0.5,\n'
                                                                   '{"step": "x", "samples": [1]}\n'),
    "metrics_fifo": lambda r: _fifo(r / "metrics.jsonl"),
    "fidelity_list": lambda r: ((r / "report").mkdir(), (r / "report" / "fidelity.json").write_text("[1, 2, 3]")),
    "fidelity_nested_garbage": lambda r: ((r / "report").mkdir(),
                                          (r / "report" / "fidelity.json").write_text('{"64": {"clip": 3}, "x": 1}')),
    "fidelity_fifo": lambda r: _fifo(r / "report" / "fidelity.json"),
    "eval_list": lambda r: ((r / "eval").mkdir(), (r / "eval" / "knn.json").write_text("[0.5]")),
    "eval_not_json": lambda r: ((r / "eval").mkdir(), (r / "eval" / "knn.json").write_bytes(b"\x80\x81 not json")),
    "eval_fifo": lambda r: _fifo(r / "eval" / "knn.json"),
    "eval_huge_number": lambda r: ((r / "eval").mkdir(), (r / "eval" / "knn.json").write_text('{"top1": ' + "9" * 5000
                                                                                              + "}")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_export_writes_its_card_whatever_the_run_files_hold(case, run, capsys):
    MALFORMED[case](run)
    assert radio(["export", str(run), "--format", "radio-distill", "--out", str(run / "copy")]) == 0, \
        capsys.readouterr().err
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
    card = (run / "copy" / "README.md").read_text()
    assert "## How to load" in card


@pytest.mark.parametrize("kind", ["file", "fifo", "loop"])
def test_export_refuses_an_out_that_is_not_a_folder_in_one_line(kind, run, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out.symlink_to(out)
    assert radio(["export", str(run), "--format", "transformers", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and str(out) in lines[0], err
    if kind == "file":
        assert out.read_text() == "mine"


def test_eval_report_copes_with_a_malformed_training_log(run_dir, tmp_path, capsys):  # noqa: F811
    from radio_core.eval.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    MALFORMED["metrics_garbage"](run)
    assert main([str(run), "report", "--images", "1", "--resolutions", "64"]) == 0, capsys.readouterr().err
    assert (run / "report" / "report.md").is_file()


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>|`[x](javascript:alert(3))`"


def test_the_model_card_escapes_strings_from_the_recipe_and_run_files(run, capsys):
    from radio_core.formats.model_card import CARD_NAME

    recipe = make_recipe().model_dump(mode="json")
    recipe["teachers"]["clip"]["args"] = {"model": HOSTILE, "pretrained": "```\n<script>fenced</script>\n```"}
    (run / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML: the recipe as a file could say it
    (run / "eval").mkdir()
    (run / "eval" / f"{HOSTILE[:8]}.json").write_text(json.dumps({HOSTILE: HOSTILE, "top1": 0.5}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "samples": HOSTILE, "loss/total": 0.25,
                                                   f"loss/{HOSTILE}": 0.5}) + "\n")
    assert radio(["export", str(run), "--format", "radio-distill", "--out", str(run / "copy")]) == 0, \
        capsys.readouterr().err
    card = (run / "copy" / CARD_NAME).read_text()
    fence = re.search(r"^(`{3,})yaml$", card, re.M).group(1)
    outside = card.split(fence + "yaml")[0]  # everything but the recipe's own code block
    assert "<" not in outside and ">" not in outside, outside  # no tag, script or attribute survives
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in outside
    assert "&#91;x&#93;(javascript" in outside and "&#124;" in outside  # no link, no extra table cell
    block = card.split(fence + "yaml\n")[1]
    assert len(fence) > 3 and block.index("<script>fenced</script>") < block.index("\n" + fence)  # fence holds
