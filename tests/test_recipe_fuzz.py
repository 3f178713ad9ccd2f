"""A small generative fuzz of the shipped recipes and of overrides (seeded, so reproducible).

Every mutation either validates (``radio validate`` exits 0 and prints OK) or ends with exactly
one ``error:`` line and exit status 2: no traceback, no "internal error", nothing written."""
import copy
import os
import random
from pathlib import Path

import pytest
import yaml

from radio_core.recipe import load_raw
from radio_core.run import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["quickstart.yaml", "dfn_dino_sam.yaml", "bench_distill_step.yaml"]
CASES_PER_RECIPE = 90

VALUES = [True, False, 0, -1, 1, 3, 7, 2**40, -(2**63), 0.5, 1.5, -0.0, 1e-3, float("nan"), float("inf"), "", "x",
          "1e-3", "yes", "no", "a.b", "../..", "/", [], [0], [1, 2], [224, 224], [[96, 96], [128, 128]], {},
          {"a": 1}, {"name": "mlp"}, None, "z" * 3000]
YAML_TEXTS = ["null", "true", "0", "-5", "1e3", "0x10", ".inf", ".nan", "[", "{a: ", "[1, 2]", "{}", "''", "~",
              "!!python/object/apply:os.system ['touch pwned']", "&a [*a]", "[[[[[[]]]]]]", "a: b: c", "yes",
              "'yes'", "{name: cosine, args: {}}", "2024-01-01", "\"\\x00\"", "|\n  text"]
NAMES = ["a.b", "", "keys", "training", "forward", "x" * 100, "ok_name", "1abc", "with space", "ünïcode", "-", "_"]


def leaves(node, prefix=()):
    """(path, value) of every mapping entry, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), v
            yield from leaves(v, prefix + (k,))


def set_path(data, path, value):
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutate(rng: random.Random, data: dict) -> tuple[str, list[str]]:
    """One mutation: (recipe text, overrides)."""
    data = copy.deepcopy(data)
    paths = [p for p, _ in leaves(data)]
    kind = rng.randrange(7)
    overrides: list[str] = []
    if kind == 0:  # a value of another type or out of range
        set_path(data, rng.choice(paths), copy.deepcopy(rng.choice(VALUES)))
    elif kind == 1:  # a key removed
        path = rng.choice(paths)
        node = data
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    elif kind == 2:  # an unknown key added to a mapping
        maps = [p for p, v in leaves(data) if isinstance(v, dict)]
        node = data
        for p in rng.choice(maps) if maps else ():
            node = node[p]
        node[rng.choice(["stpes", "teacher", "lr", "0", "base", "plugin"])] = rng.choice(VALUES)
    elif kind == 3:  # a teacher renamed
        old = rng.choice(list(data["teachers"]))
        data["teachers"][rng.choice(NAMES)] = data["teachers"].pop(old)
    elif kind == 4:  # overrides: an existing path or a near-miss, and a YAML value
        for _ in range(rng.randint(1, 3)):
            path = list(map(str, rng.choice(paths)))
            if rng.random() < 0.2:
                path[-1] = path[-1][:-1] or "x"
            key = ".".join(path) if rng.random() < 0.9 else rng.choice(["", ".", "a..b", "=", "teachers.*.weight"])
            overrides.append(f"{key}={rng.choice(YAML_TEXTS)}")
    elif kind == 5:  # a teacher dropped by override
        overrides.append(f"teachers.{rng.choice(list(data['teachers']) + ['nosuch'])}=null")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if kind == 6:  # the text itself: cut, duplicated block, stray bytes
        cut = rng.randrange(len(text))
        text = rng.choice([text[:cut], text + text[:cut], text[:cut] + rng.choice(["\t", ":", "- ", "{", "&x", "*y"])
                           + text[cut:]])
    return text, overrides


def _files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("name", SHIPPED)
def test_mutated_shipped_recipes_validate_or_fail_with_one_line(name, tmp_path, capsys):
    base = load_raw(REPO / "recipes" / name)
    rng = random.Random(f"radio-fuzz-{name}")
    outcomes = {"ok": 0, "error": 0}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i in range(CASES_PER_RECIPE):
            text, overrides = mutate(rng, base)
            path = tmp_path / f"case{i:03d}.yaml"
            path.write_text(text)
            before = _files(tmp_path)
            code = main([str(path), *overrides, "--validate"])
            out, err = capsys.readouterr()
            where = f"case {i}: overrides {overrides}\n{text[:2000]}\n--- stderr:\n{err[:3000]}"
            assert "Traceback" not in err and "internal error" not in err, where
            assert _files(tmp_path) == before, where
            assert not (tmp_path / "pwned").exists(), where
            if code == 0:
                assert "OK (" in out and "error:" not in err, where
                outcomes["ok"] += 1
            else:
                assert code == 2, where
                assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, where
                assert len(err) < 4000, where
                outcomes["error"] += 1
            path.unlink()
    finally:
        os.chdir(cwd)
    # The fuzz exercises both outcomes (a generator that only breaks recipes tests little).
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 30, outcomes
