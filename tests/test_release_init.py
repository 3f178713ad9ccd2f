"""Starting a run from a released model (``student.init``): a tiny official-format RADIO model with
three teachers (clip, dino, sam) is the release; a continued run reproduces it exactly at step 0,
trains with a fourth teacher, and exports back in the official and the transformers format."""
import pytest
import torch

from helpers import tiny_recipe
from official_fixtures import seeded_
from radio_core.formats.export import FeatureNormalizer, export_config
from radio_core.formats.release import ReleaseError
from radio_core.model import RadioModel
from radio_core.models.distiller import build_distiller
from radio_core.models.teachers import build_teacher
from radio_core.recipe import load_recipe
from radio_core.registry import get_registry
from radio_core.train.loop import Trainer

IMAGES = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
#: a fourth teacher the release does not know (a second tiny DINOv2)
FOURTH = ["teachers.dino_b.plugin=dinov2", "teachers.dino_b.args.tiny=true", "teachers.dino_b.resolution=56"]


def release(tmp_path, normalizer=False):
    """The release: a tiny official-format model of tiny_random's teachers, seeded weights."""
    (tmp_path / "release").mkdir(exist_ok=True)
    recipe = load_recipe(tiny_recipe(tmp_path / "release", "student.args.register_multiple=8"))
    registry = get_registry()
    dims = {n: (t.summary_dim, t.spatial_dim) for n, t in
            ((n, build_teacher(recipe, n, registry, meta=True)) for n in recipe.teachers)}
    distiller = seeded_(build_distiller(recipe, dims, registry), 1).eval()
    feature_normalizer = None
    if normalizer:
        feature_normalizer = FeatureNormalizer(distiller.student.embed_dim)
        seeded_(feature_normalizer, 2)
    path = tmp_path / "release.pth.tar"
    RadioModel(distiller, export_config(distiller, recipe), feature_normalizer).save_radio(path)
    return path


def continued(tmp_path, source, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_recipe(tiny_recipe(tmp_path, f"student.init.source={source}", "train.steps=2", *overrides))


def outputs(model: RadioModel) -> dict:
    with torch.no_grad():
        return model.eval().adaptor_outputs(IMAGES)


def step0(trainer) -> RadioModel:
    d = trainer.unwrapped
    return RadioModel(d, export_config(d, trainer.recipe))


def worst(ours: dict, theirs: dict, names) -> float:
    out = 0.0
    for name in names:
        for a, b in zip(ours[name], theirs[name]):
            assert (a is None) == (b is None), name
            if a is not None:
                out = max(out, float((a - b).abs().max()))
    return out


@pytest.mark.parametrize("train", ["all", "lora"])
def test_step_0_reproduces_the_release_exactly_with_a_fourth_teacher(tmp_path, train):
    path = release(tmp_path)
    released = RadioModel.load(path)
    trainer = Trainer(continued(tmp_path, path, f"student.init.train={train}", *FOURTH))
    assert trainer.recipe.student.init.teachers == {"clip": "clip", "dino": "dino", "sam": "sam"}
    model = step0(trainer)
    assert sorted(model.adaptors) == ["clip", "dino", "dino_b", "sam"]
    # the fourth teacher's CLS token is a released register: the prefix keeps its length
    assert model.student.num_cls_tokens == 3 and model.student.num_registers == 5
    assert worst(outputs(model), outputs(released), ["clip", "dino", "sam"]) == 0.0
    trainable = {n for n, p in trainer.unwrapped.student.named_parameters() if p.requires_grad}
    if train == "lora":
        assert trainable and all(".lora_" in n for n in trainable)


def test_a_feature_normaliser_is_folded_into_the_reused_heads(tmp_path):
    path = release(tmp_path, normalizer=True)
    released = RadioModel.load(path)
    model = step0(Trainer(continued(tmp_path, path)))
    assert worst(outputs(model), outputs(released), ["clip", "dino", "sam"]) <= 1e-5


@pytest.mark.parametrize("train", ["new_heads", "lora"])
def test_a_fourth_teacher_trains_and_exports_back_in_both_formats(tmp_path, train):
    from radio_core.cli import main as radio

    from official_radio import OfficialRadio, max_abs_diff

    path = release(tmp_path)
    recipe = continued(tmp_path, path, f"student.init.train={train}", *FOURTH)
    trainer = Trainer(recipe)
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    trainer.fit()
    trainer.close()
    after = trainer.unwrapped.state_dict()
    kept = ("student.", "summary_heads.clip", "spatial_heads.sam") if train == "new_heads" else ("student.",)
    frozen = [k for k in before if k.startswith(kept) and ".lora_" not in k]
    assert all(torch.equal(after[k], before[k]) for k in frozen)  # what does not train is untouched
    assert not torch.equal(after["summary_heads.dino_b.fc1.weight"], before["summary_heads.dino_b.fc1.weight"])
    if train == "lora":  # the adapters trained, and the export merged them
        assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
        assert not any("lora" in k for k in RadioModel.load(tmp_path / "run" / "export").state_dict())
    run = tmp_path / "run"
    trained = outputs(RadioModel.load(run / "export"))
    for fmt in ("radio", "transformers"):
        out = tmp_path / f"out_{fmt}"
        assert radio(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        back = RadioModel.load(out / "model.pth.tar" if fmt == "radio" else out)
        assert sorted(back.adaptors) == ["clip", "dino", "dino_b", "sam"]
        assert worst(outputs(back), trained, ["clip", "dino", "dino_b", "sam"]) <= 1e-5, fmt
    with torch.no_grad():  # the official loader's function of the written file
        official = OfficialRadio(tmp_path / "out_radio" / "model.pth.tar").eval()(IMAGES)
        assert max_abs_diff(RadioModel.load(tmp_path / "out_radio" / "model.pth.tar").adaptor_outputs(IMAGES),
                            official) == 0.0


def test_heads_and_lora_freeze_what_they_should(tmp_path):
    path = release(tmp_path)
    for train in ("heads", "lora"):
        trainer = Trainer(continued(tmp_path / train, path, f"student.init.train={train}"))
        student = trainer.unwrapped.student
        trainable = [n for n, p in student.named_parameters() if p.requires_grad]
        assert (not trainable) if train == "heads" else all(".lora_" in n for n in trainable)
        assert all(p.requires_grad for p in trainer.unwrapped.summary_heads.parameters())


def test_a_transformers_radio_model_folder_starts_a_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.RadioConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                                      max_img_size=256, num_cls_tokens=2, num_registers=6, summary_idxs=[0, 1])
    torch.manual_seed(4)
    hf = transformers.RadioModel(config).eval()
    hf.save_pretrained(tmp_path / "c-radio")
    trainer = Trainer(continued(tmp_path, tmp_path / "c-radio"))
    assert trainer.recipe.student.init.teachers == {}  # the folder holds no heads: all fresh
    student = trainer.unwrapped.student.eval()
    with torch.no_grad():
        ours, ref = student(IMAGES), hf(pixel_values=IMAGES)
    assert float((ours.patches - ref.features).abs().max()) <= 1e-5


@pytest.mark.parametrize("override, match", [
    ("student.init.source={missing}", "student.init.source: .* does not exist"),
    ("student.name=eradio", "student.name: 'eradio', but the release .* holds a 'vit' student"),
    ("teachers.dino.target_norm=phi_s", "teachers.dino.target_norm: the released 'dino' summary head predicts the "
                                        "teacher space; set summary: none"),
    ("student.init.teachers.dino=siglip", r"student.init.teachers.dino: the release has no heads for 'siglip'"),
])
def test_a_release_that_does_not_fit_is_refused_in_one_line(tmp_path, override, match):
    path = release(tmp_path)
    recipe = continued(tmp_path, path, override.format(missing=tmp_path / "nope.pth.tar"))
    with pytest.raises((ReleaseError, ValueError), match=match) as info:
        Trainer(recipe)
    assert "\n" not in str(info.value)
