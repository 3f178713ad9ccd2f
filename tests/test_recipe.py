"""Recipe loading: base includes, dotted overrides, and errors that name the field and file."""
from pathlib import Path

import pytest
import yaml

from radio_core.plan.checks import check_plugins
from radio_core.recipe import RecipeError, apply_overrides, load_raw, load_recipe, validate

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "student": {"name": "vit", "resolution": 224},
    "teachers": {"dino": {"plugin": "dinov2"}},
}


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_recipe_gets_paper_defaults():
    r = validate(MINIMAL)
    assert r.student.resolution == [(224, 224)]
    t = r.teachers["dino"]
    assert t.summary_loss.name == "cosine" and t.spatial_loss.name == "cosine_smooth_l1"
    assert r.optim.weight_decay == 0.02 and r.adaptor.name == "mlp"


def test_unknown_key_names_field_file_and_suggestion(tmp_path):
    p = write(tmp_path, "bad.yaml", {**MINIMAL, "train": {"stesp": 10}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "train.stesp" in msg and "unknown key" in msg and "'steps'" in msg


def test_unknown_key_inside_a_teacher(tmp_path):
    p = write(tmp_path, "bad.yaml", {**MINIMAL, "teachers": {"dino": {"plugin": "dinov2", "wieght": 2}}})
    with pytest.raises(RecipeError, match=r"teachers\.dino\.wieght: unknown key \(did you mean 'weight'\?\)"):
        load_recipe(p)


def test_wrong_type_names_field_and_value(tmp_path):
    p = write(tmp_path, "bad.yaml", {**MINIMAL, "optim": {"lr": "fast"}})
    with pytest.raises(RecipeError, match=r"optim\.lr: .*'fast'"):
        load_recipe(p)


def test_base_include_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", {**MINIMAL, "train": {"steps": 50, "log_every": 5},
                                  "teachers": {"dino": {"plugin": "dinov2"}, "clip": {"plugin": "clip"}}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "train": {"steps": 7},
                                           "teachers": {"clip": None}})
    r = load_recipe(child, ["teachers.dino.weight=0.5", "optim.lr=3e-4", "student.resolution=[256, 320]"])
    assert r.train.steps == 7 and r.train.log_every == 5  # merged, not replaced
    assert list(r.teachers) == ["dino"]  # null removed the inherited teacher
    assert r.teachers["dino"].weight == 0.5 and r.optim.lr == 3e-4
    assert r.student.resolution == [(256, 320)]


def test_naming_another_plugin_drops_the_old_plugins_inherited_args(tmp_path):
    base = {"student": {"name": "vit", "resolution": 64, "args": {"model": "vit_tiny", "depth": 4}},
            "teachers": {"dino": {"plugin": "dinov2", "args": {"model": "facebook/dinov2-small"}}}}
    write(tmp_path, "base.yaml", base)
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "student": {"name": "eradio_lite", "args": {"variant": "s"}},
                                           "teachers": {"dino": {"args": {"layer": 2}}}})
    r = load_recipe(child)
    assert r.student.name == "eradio_lite" and r.student.args == {"variant": "s"} and r.student.resolution == [(64, 64)]
    assert r.teachers["dino"].args == {"model": "facebook/dinov2-small", "layer": 2}  # same plugin: merged
    # on the command line, in either order: the new plugin keeps only the args given with it
    for overrides in (["student.name=eradio_lite", "student.args.variant=s"],
                      ["student.args.variant=s", "student.name=eradio_lite"]):
        assert apply_overrides(base, overrides)["student"]["args"] == {"variant": "s"}, overrides
    assert apply_overrides(base, ["student.name=vit", "student.args.depth=2"])["student"]["args"] == \
        {"model": "vit_tiny", "depth": 2}  # the same name again is no rename
    assert apply_overrides(base, ["teachers.dino.plugin=dinov3"])["teachers"]["dino"] == {"plugin": "dinov3", "args": {}}
    assert base["student"]["args"] == {"model": "vit_tiny", "depth": 4}  # the input is not changed


def test_circular_base_is_reported(tmp_path):
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(RecipeError, match="circular"):
        load_raw(tmp_path / "a.yaml")


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(RecipeError, match="not a mapping"):
        apply_overrides({"train": 3}, ["train.steps=1"])


def test_unknown_plugin_name_lists_available_and_suggests(registry):
    r = validate({**MINIMAL, "teachers": {"dino": {"plugin": "dinov2"}}, "adaptor": {"name": "mpl"}})
    with pytest.raises(RecipeError) as e:
        check_plugins(r, registry, origin="x.yaml")
    msg = str(e.value)
    assert "x.yaml: adaptor.name: unknown adaptor 'mpl'" in msg and "Did you mean 'mlp'" in msg and "linear" in msg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").rglob("*.yaml")))
def test_shipped_recipes_validate(name, registry):
    path = next((REPO / "recipes").rglob(name))
    raw = load_raw(path)
    if "student" not in raw:  # sweep files and partial bases are checked by their own tests
        pytest.skip("not a full recipe")
    r = load_recipe(path)
    check_plugins(r, registry, origin=str(path))
