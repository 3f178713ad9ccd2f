"""Table of bad recipes: each gives a one-line-per-problem error naming the file and field,
before any model is built (``radio_core.run --validate``)."""
import copy

import pytest
import yaml

from radio_core.run import main

GOOD = {
    "output_dir": "runs/x",
    "student": {"name": "vit", "args": {"model": "vit_tiny_patch16_224"}, "resolution": 224},
    "teachers": {
        "clip": {"plugin": "clip", "args": {"model": "ViT-B-16", "pretrained": "openai"}},
        "dino": {"plugin": "dinov2", "args": {"model": "facebook/dinov2-small"}},
    },
}


def edit(path, value):
    """Copy of GOOD with ``path`` (dotted) set to ``value`` (``DELETE`` removes it)."""
    data = copy.deepcopy(GOOD)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value == "DELETE":
        node.pop(last)
    else:
        node[last] = value
    return data


CASES = [
    # (recipe, expected fragment(s) of the message)
    (edit("trian", {"steps": 1}), ["trian: unknown key", "did you mean 'train'"]),
    (edit("train.stpes", 5), ["train.stpes: unknown key", "'steps'"]),
    (edit("train.steps", "many"), ["train.steps", "'many'"]),
    (edit("train.steps", 0), ["train.steps", "greater than or equal to 1"]),
    (edit("optim.lr", -1), ["optim.lr", "greater than 0"]),
    (edit("optim.name", "sgd"), ["optim.name", "'adamw'"]),
    (edit("train.mixed_precision", "fp8"), ["train.mixed_precision", "'no', 'fp16' or 'bf16'"]),
    (edit("student", "DELETE"), ["student: Field required"]),
    (edit("teachers", {}), ["teachers", "at least one teacher"]),
    (edit("teachers", "DELETE"), ["teachers: Field required"]),
    (edit("teachers.dino.plugin", "dinov22"), ["teachers.dino.plugin: unknown teacher 'dinov22'", "Did you mean 'dinov2'"]),
    (edit("student.name", "vitt"), ["student.name: unknown student 'vitt'", "Did you mean 'vit'"]),
    (edit("adaptor.name", "mpl"), ["adaptor.name: unknown adaptor 'mpl'", "Did you mean 'mlp'"]),
    (edit("teachers.clip.summary_loss", {"name": "cosin"}), ["teachers.clip.summary_loss.name", "Did you mean 'cosine'"]),
    (edit("data.source", {"name": "imagefolder"}), ["data.source.name", "Did you mean 'image_folder'"]),
    (edit("teachers.dino.weight", -2), ["teachers.dino.weight", "greater than or equal to 0"]),
    (edit("teachers.dino.wieght", 2), ["teachers.dino.wieght: unknown key", "did you mean 'weight'"]),
    (edit("student.resolution", 230), ["student.resolution: 230x230", "multiple of 16", "nearest valid: 224x224"]),
    (edit("student.resolution", [320, 470]), ["student.resolution: 320x470", "nearest valid: 320x464"]),
    (edit("augment.scale", [0.8, 0.2]), ["augment", "scale must satisfy"]),
    (edit("augment.hflip", 2), ["augment.hflip", "less than or equal to 1"]),
    (edit("data.batch_size", 0), ["data.batch_size", "greater than or equal to 1"]),
    (edit("groups", {"a": {"teachers": ["clip"]}}), ["groups: teachers ['dino'] are in no group"]),
    (edit("groups", {"a": {"teachers": ["clip", "sam"]}, "b": {"teachers": ["dino"]}}),
     ["groups.a.teachers: teacher 'sam' is not defined under teachers"]),
    (edit("groups", {"a": {"teachers": ["clip"], "share": 0.7}, "b": {"teachers": ["dino"], "share": 0.7}}),
     ["groups: group shares sum to 1.4, not 1"]),
    (edit("groups", {"a": {"teachers": ["clip"], "ranks": 2}, "b": {"teachers": ["dino"], "ranks": 1}}),
     ["impossible rank partition"]),  # 3 fixed ranks, validated with --world-size 2
    (edit("stages", [{"steps": 10, "teachers": ["clipp"]}]), ["stages.0.teachers", "did you mean 'clip'"]),
    (edit("stages", [{"steps": 10}, {"steps": 5}]) | {"train": {"steps": 20}},
     ["train.steps is 20 but the stages add up to 15 steps"]),
    (edit("checkpoint.keep", 0), ["checkpoint.keep", "greater than or equal to 1"]),
    (edit("student.args", "vit_base"), ["student.args", "valid dictionary"]),
    # plugin args, bound to the factory's signature without building anything
    (edit("teachers.dino.args.modle", "x"),
     ["teachers.dino.args (teacher 'dinov2'): unknown argument 'modle'. Did you mean 'model'?"]),
    (edit("teachers.dino.args.resolution", 224), ["teachers.dino.args (teacher 'dinov2'): 'resolution' is set by "
                                                  "the framework"]),
    (edit("student.args.depth", "deep"), ["student.args (student 'vit'): depth='deep' does not fit int | None"]),
    (edit("teachers.clip.spatial_loss", {"name": "smooth_l1", "args": {"betta": 1}}),
     ["teachers.clip.spatial_loss.args (loss 'smooth_l1'): unknown argument 'betta'", "'beta'"]),
    (edit("data.source", {"name": "image_folder"}),
     ["data.source.args (dataset 'image_folder'): missing required argument 'root' (str)"]),
]


@pytest.mark.parametrize("recipe,expected", CASES, ids=[f"case{i:02d}" for i in range(len(CASES))])
def test_bad_recipe_is_reported_before_any_model_is_built(recipe, expected, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main([str(path), "--validate", "--world-size", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_good_recipe_validates(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main([str(path), "--validate"]) == 0
    assert "OK (2 teachers: clip, dino)" in capsys.readouterr().out


def test_yaml_cannot_name_python_objects(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("student: !!python/object/apply:os.system ['echo pwned']\n")
    assert main([str(path), "--validate"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
