"""The evaluation ladder on a user's own data: image folders, webdataset shards (radio pack output
and plain tars), Hugging Face dataset folders; every task's library metric against hand-computed
values; evaluators as plugins (a third party's through `radio eval`); the feature cache."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import env_with, fake_distribution, tiny_recipe
from PIL import Image

from radio_core.eval import metrics
from radio_core.eval.data import open_data
from radio_core.eval.ladder import run_task
from radio_core.eval.subjects import StudentSubject, extract, view

#: five digits named so that alphabetical (folder) order is label order
DIGITS, CLASSES = [8, 5, 4, 9, 1], ["eight", "five", "four", "nine", "one"]
PER_CLASS = 8


# --------------------------------------------------------------------------- the hand-written metrics
# These are the project's own implementations that the library calls replaced, kept here as the
# reference they are checked against.

def old_topk(scores, labels, ks=(1, 5)):
    out = {}
    for k in ks:
        hit = (scores.topk(min(k, scores.shape[1]), dim=-1).indices == labels[:, None]).any(-1)
        out[f"top{k}"] = float(hit.float().mean())
    return out


def old_miou(pred, target, num_classes, ignore_index=255):
    keep = target != ignore_index
    conf = torch.bincount(target[keep].long() * num_classes + pred[keep].long(),
                          minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter / union.clamp(min=1))[present].mean()), float(inter.sum() / conf.sum())


def old_knn(train, train_labels, test, num_classes, k=20, t=0.07):
    train, test = F.normalize(train.float(), dim=-1), F.normalize(test.float(), dim=-1)
    sim, idx = (test @ train.T).topk(min(k, len(train)), dim=-1)
    votes = torch.zeros(len(test), num_classes)
    votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
    return votes


def test_library_metrics_equal_the_hand_written_ones_on_fixed_inputs():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    assert metrics.topk_accuracy(scores, labels) == pytest.approx(old_topk(scores, labels), abs=1e-7)
    target, pred = torch.randint(0, 5, (4, 32, 32), generator=g), torch.randint(0, 5, (4, 32, 32), generator=g)
    target[0, :5] = 255  # ignored pixels
    pred[pred == 3], target[target == 3] = 1, 1  # class 3 absent everywhere: not averaged
    ours = metrics.SegmentationScores(6)
    ours.update(pred[:2], target[:2])  # accumulated over batches
    ours.update(pred[2:], target[2:])
    got = ours.compute()
    miou, acc = old_miou(pred, target, 6)
    assert got["miou"] == pytest.approx(miou, abs=1e-6) and got["pixel_acc"] == pytest.approx(acc, abs=1e-6)
    assert np.isnan(got["per_class_iou"][3]) and np.isnan(got["per_class_iou"][5])
    tr, te = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    trl = torch.randint(0, 4, (300,), generator=g)
    ref = old_knn(tr, trl, te, 4)
    for backend in ("torch", "faiss"):
        assert torch.allclose(metrics.knn_predict(tr, trl, te, 4, backend=backend), ref, rtol=1e-4, atol=1e-5), backend


def test_boundary_f_of_segments_by_hand():
    truth = torch.zeros(1, 6, 6, dtype=torch.long)
    truth[0, :, 3:] = 1  # one vertical edge: column 3 is a boundary pixel (differs from its left)
    pred = truth.clone()
    pred[0, :3, 3] = 0  # the edge moved right by one pixel in the top half: within 1 px
    pred[0, 5, :] = 1  # a false horizontal region in the last row
    tb, pb = metrics.label_boundaries(truth), metrics.label_boundaries(pred)
    assert tb.sum() == 6 and tb[0, :, 3].all()
    # predicted boundaries: column 4 in rows 0-2, column 3 in rows 3-4, row 5 has none horizontally;
    # row 5 differs from row 4 in columns 0-2 (label 1 under 0): three more
    assert pb.sum() == 8
    bf = metrics.boundary_f_score(pb.float(), tb, thresholds=(0.5,))
    precision = 6 / 8  # all but row 5's columns 0 and 1 lie within 1 px of column 3
    recall = 6 / 6  # every true one has a predicted one within 1 px
    assert bf["precision"] == pytest.approx(precision) and bf["recall"] == pytest.approx(recall)
    assert bf["boundary_f"] == pytest.approx(2 * precision * recall / (precision + recall))
    far = truth.clone()
    far[0, :, 3:5] = 0  # edge moved 2 px: out of tolerance
    fb = metrics.label_boundaries(far)
    got = metrics.boundary_f_score(fb.float(), tb, thresholds=(0.5,))
    assert got["precision"] == 0 and got["recall"] == 0 and got["boundary_f"] == 0


# --------------------------------------------------------------------------- data in every format


def digit_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    out = {c: [] for c in range(len(CLASSES))}
    for img, digit in zip(d.images, d.target):
        label = DIGITS.index(digit) if digit in DIGITS else None
        if label is not None and len(out[label]) < PER_CLASS:
            arr = (img / 16.0 * 255).astype(np.uint8)
            out[label].append(np.asarray(Image.fromarray(arr).resize((32, 32), Image.BICUBIC).convert("RGB")))
    return out


def digit_mask(rgb: np.ndarray, label: int) -> np.ndarray:
    """Foreground strokes = 1 + (label % 2), background 0, a band of ignore at the top."""
    m = np.where(rgb[..., 0] > 100, 1 + label % 2, 0).astype(np.uint8)
    m[:2] = 255
    return m


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def datasets_on_disk(tmp_path_factory):
    """The same 40 digit images as a class folder, radio pack shards, plain webdataset tars with
    cls + seg.png, a Hugging Face dataset folder, and ADE20K's layout."""
    import webdataset as wds

    from radio_core.data.shards import pack_folder

    root = tmp_path_factory.mktemp("data")
    digits = digit_images()
    folder = root / "folder"
    for label, imgs in digits.items():
        (folder / CLASSES[label]).mkdir(parents=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(folder / CLASSES[label] / f"{i:02d}.png")
    pack_folder(str(folder), str(root / "packed"), shard_size=16, progress=False)
    plain = root / "plain"
    plain.mkdir()
    with wds.TarWriter(str(plain / "000000.tar")) as sink:
        for label, imgs in digits.items():
            for i, a in enumerate(imgs):
                sink.write({"__key__": f"s{label}_{i:02d}", "png": png(a), "cls": str(label).encode(),
                            "seg.png": png(digit_mask(a, label))})
    (plain / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    import datasets

    rows = [(a, label) for label, imgs in digits.items() for a in imgs]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "annotation": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a, _ in rows], "label": [lab for _, lab in rows],
                                     "annotation": [Image.fromarray(digit_mask(a, lab)) for a, lab in rows]},
                                    features=features)
    ds.train_test_split(test_size=0.3, seed=0).save_to_disk(str(root / "hf"))
    ade = root / "ade"
    for split, sl in (("training", slice(0, 5)), ("validation", slice(5, 8))):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for label, imgs in digits.items():
            for i, a in enumerate(imgs[sl]):
                Image.fromarray(a).save(ade / "images" / split / f"{label}_{i}.jpg", quality=95)
                Image.fromarray(digit_mask(a, label)).save(ade / "annotations" / split / f"{label}_{i}.png")
    return {"folder": folder, "packed": root / "packed", "plain": plain, "hf": root / "hf", "ade": ade}


def test_every_format_reads_the_same_labelled_images(datasets_on_disk):
    reads = {k: open_data(str(v)) for k, v in datasets_on_disk.items() if k != "ade"}
    for kind, data in reads.items():
        assert data.classes == CLASSES, kind
        assert len(data.train) + len(data.test) == len(CLASSES) * PER_CLASS, kind
        counts = torch.bincount(torch.cat([data.train.labels, data.test.labels]), minlength=len(CLASSES))
        assert counts.tolist() == [PER_CLASS] * len(CLASSES), kind
        assert np.asarray(data.test.images[0]).shape == (32, 32, 3)
        assert data.source.startswith({"folder": "folder", "packed": "webdataset", "plain": "webdataset",
                                       "hf": "hf"}[kind])
    assert reads["plain"].has_masks and reads["hf"].has_masks and not reads["folder"].has_masks
    assert reads["plain"].mask_classes == 3 and set(np.unique(reads["plain"].test.masks[0])) <= {0, 1, 2, 255}
    ade = open_data(str(datasets_on_disk["ade"]), reduce_zero_label=True)
    assert len(ade.train) == 25 and len(ade.test) == 15 and not ade.has_labels
    m = ade.train.masks[0]  # 0 -> ignore, 1..2 -> 0..1
    assert set(np.unique(m)) <= {0, 1, 255} and ade.mask_classes == 2
    smoke = open_data(str(datasets_on_disk["folder"]), max_per_class=2)
    assert len(smoke.train) + len(smoke.test) == 2 * len(CLASSES)
    assert open_data(str(datasets_on_disk["folder"])).fingerprint != smoke.fingerprint


# --------------------------------------------------------------------------- a run to evaluate


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random-init tiny student (two training resolutions) with a tiny CLIP (text tower) and a
    tiny DINOv2, written as a finished run: the metrics are checked by hand, so no training."""
    from safetensors.torch import save_file

    from radio_core.models.distiller import build_distiller
    from radio_core.models.teachers import build_teacher
    from radio_core.recipe import dump_recipe, load_recipe
    from radio_core.registry import get_registry

    tmp = tmp_path_factory.mktemp("ladder")
    path = tiny_recipe(tmp, "teachers={dino: {plugin: dinov2, args: {tiny: true}, resolution: 56}, "
                            "clip: {plugin: clip, args: {tiny: true}, resolution: 64}}",
                       "student.resolution=[[64, 64], [96, 96]]")
    recipe = load_recipe(path)
    reg = get_registry()
    torch.manual_seed(0)
    dims = {}
    for name in recipe.teachers:
        t = build_teacher(recipe, name, reg, meta=True)
        dims[name] = (t.summary_dim, t.spatial_dim)
    distiller = build_distiller(recipe, dims, reg)
    run = tmp / "run"
    (run / "export").mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, str(run / "export" / "model.safetensors"))
    return run


def loaded(run_dir, teachers=True):
    from radio_core.eval.loading import load_run

    return load_run(run_dir, with_teachers=teachers)


def hand_features(run, data, split, res, how="crop"):
    subject = StudentSubject(run.distiller, res, run.teachers, run=run)
    from radio_core.models import preprocess

    x = preprocess.to_float(torch.stack([view(im, subject.resolution, how) for im in getattr(data, split).images]))
    return subject.features(x)


def test_knn_and_linear_on_a_folder_equal_hand_computed_values(tiny_run, datasets_on_disk):
    from radio_core.eval.tasks import linear_probe_classification

    run = loaded(tiny_run)
    data = open_data(str(datasets_on_disk["folder"]))
    result = run_task(tiny_run, "knn", str(datasets_on_disk["folder"]), [64], args={"k": 5}, loaded=run)
    row = result["rows"][0]
    assert row["subject"] == "student@64" and row["k"] == 5 and row["search"] == "torch"
    assert row["train_images"] == len(data.train) and row["test_images"] == len(data.test) and row["classes"] == 5
    tr, te = hand_features(run, data, "train", 64), hand_features(run, data, "test", 64)
    votes = old_knn(tr.summary, data.train.labels, te.summary, 5, k=5)
    assert row["top1"] == pytest.approx(old_topk(votes, data.test.labels)["top1"], abs=1e-6)
    assert row["top5"] == 1.0  # five classes
    lin = run_task(tiny_run, "linear", str(datasets_on_disk["folder"]), [64], args={"epochs": 30}, loaded=run)
    ref = linear_probe_classification(tr.summary, data.train.labels, te.summary, data.test.labels, 5, epochs=30)
    assert lin["rows"][0]["top1"] == pytest.approx(ref["top1"], abs=1e-6)


def test_zero_shot_on_radio_pack_shards_uses_open_clips_templates(tiny_run, datasets_on_disk):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    run = loaded(tiny_run)
    shards = str(datasets_on_disk["packed"])
    result = run_task(tiny_run, "zeroshot", shards, [64], teachers=True, loaded=run)
    rows = {r["subject"]: r for r in result["rows"]}
    assert "80 templates" in rows["student@64"]["prompts"] and "'a bad photo of a eight.'" in rows["student@64"]["prompts"]
    assert "no text tower" in rows["teacher/dino"]["skipped"]
    data = open_data(shards)
    clip = run.teachers["clip"]
    weights = torch.stack([F.normalize(F.normalize(clip.encode_text([t(c) for t in OPENAI_IMAGENET_TEMPLATES]).float(),
                                                   dim=-1).mean(0), dim=-1) for c in CLASSES])
    emb = F.normalize(hand_features(run, data, "test", 64).embedding, dim=-1)
    expected = old_topk(emb @ weights.T, data.test.labels)
    assert rows["student@64"]["top1"] == pytest.approx(expected["top1"], abs=1e-6)
    assert rows["student@64"]["top5"] == pytest.approx(expected["top5"], abs=1e-6)
    assert 0 <= rows["teacher/clip"]["top1"] <= 1


def test_segmentation_on_plain_webdataset_equals_the_hand_written_miou(tiny_run, datasets_on_disk):
    from radio_core.eval.evaluators import build_seg
    from radio_core.eval.tasks import segmentation_probe

    run = loaded(tiny_run, teachers=False)
    path = str(datasets_on_disk["plain"])
    result = run_task(tiny_run, "seg", path, [64], args={"epochs": 3, "mask_size": 32}, loaded=run)
    row = result["rows"][0]
    assert result["scores"] == ["miou", "pixel_acc", "boundary_f"] and row["classes"] == 3
    data = open_data(path)
    ev = build_seg(epochs=3, mask_size=32)
    ftr, fte = hand_features(run, data, "train", 64, "resize"), hand_features(run, data, "test", 64, "resize")
    ref = segmentation_probe(ftr.spatial, ev.masks(data.train), fte.spatial, ev.masks(data.test), 3, epochs=3,
                             return_predictions=True)
    miou, acc = old_miou(ref["predictions"], ev.masks(data.test), 3)
    assert row["miou"] == pytest.approx(miou, abs=1e-6) and row["pixel_acc"] == pytest.approx(acc, abs=1e-6)
    assert 0 <= row["boundary_f"] <= 1 and row["boundary_f"] == pytest.approx(ref["boundary_f"], abs=1e-6)
    with pytest.raises(ValueError, match="has no segmentation masks"):
        run_task(tiny_run, "seg", str(datasets_on_disk["folder"]), [64], loaded=run)


def test_a_second_task_on_the_same_data_reads_the_cached_features(tiny_run, datasets_on_disk, tmp_path):
    run = loaded(tiny_run, teachers=False)
    data = open_data(str(datasets_on_disk["hf"]))

    class Counting(StudentSubject):
        calls = 0

        def features(self, images):
            Counting.calls += 1
            return super().features(images)

    subject = Counting(run.distiller, 64, run=run)
    first = extract(subject, data, "train", "crop", batch_size=8, cache_dir=tmp_path)
    n = Counting.calls
    again = extract(subject, data, "train", "crop", batch_size=8, cache_dir=tmp_path)
    assert n > 0 and Counting.calls == n  # not run again
    assert torch.equal(first.summary, again.summary) and torch.equal(first.spatial, again.spatial)
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["resolution"] == [64, 64] and meta["split"] == "train" and meta["data"].startswith("hf:")
    assert not list(tmp_path.glob("*.pkl")) and len(list(tmp_path.glob("*.safetensors"))) == 1
    other = Counting(run.distiller, 96, run=run)  # another resolution: another key
    extract(other, data, "train", "crop", batch_size=8, cache_dir=tmp_path)
    assert Counting.calls > n and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cli_scores_every_resolution_teachers_and_baselines_with_a_plot(tiny_run, datasets_on_disk, capsys):
    from radio_core.cli import main

    assert main(["eval", str(tiny_run), "knn", "--data", str(datasets_on_disk["plain"]), "--teachers",
                 "--baselines", "pixels", "random", "--smoke", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [r["subject"] for r in out["rows"]]
    assert names == ["student@64", "student@96", "teacher/clip", "teacher/dino", "random@64", "pixels@64",
                     "random@96", "pixels@96"]
    assert out["tier"] == "smoke" and all(r["train_images"] + r["test_images"] <= 20 for r in out["rows"])
    assert (tiny_run / "eval" / "knn.json").is_file() and (tiny_run / "eval" / "knn_resolution.png").is_file()
    assert main(["eval", str(tiny_run), "fidelity"]) == 0  # every trained resolution, not only the first
    table = capsys.readouterr().out
    assert "student@64" in table and "student@96" in table and "clip/summary/cosine" in table
    assert main(["eval", str(tiny_run), "nope"]) == 2
    assert "unknown evaluator 'nope'" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "fidelity", "--k", "3"]) == 2  # not an argument of fidelity
    from radio_core.formats.model_card import render_model_card

    card = render_model_card({"student": {"name": "vit"}, "teachers": {}, "resolution": [64, 64]}, tiny_run)
    assert "Student resolutions in training: 64x64, 96x96." in card
    assert "| knn | subject=student@96" in card


THIRD_PARTY = """
    import torch
    from radio_core import hookimpl
    from radio_core.protocols import Evaluator

    class FeatureNorm(Evaluator):
        name, needs, scores = "feature_norm", (), ("norm",)

        def __init__(self, images: int = 2):
            self.images = images

        def __call__(self, subject, data):
            x = torch.rand(self.images, 3, *subject.resolution, generator=torch.Generator().manual_seed(0))
            return {"task": "feature_norm", "images": self.images,
                    "norm": float(subject.features(x).summary.norm(dim=-1).mean())}

    def build_feature_norm(images: int = 2) -> FeatureNorm:
        \"\"\"Mean summary norm on random images. images: how many.\"\"\"
        return FeatureNorm(images)

    @hookimpl
    def radio_register(registry):
        registry.add("evaluator", "feature_norm", build_feature_norm)
"""


def test_a_third_party_evaluator_runs_through_radio_eval(tiny_run, tmp_path):
    site = fake_distribution(tmp_path / "site", "radio-feature-norm", "radio_feature_norm", THIRD_PARTY)
    e = env_with(site)
    listing = subprocess.run([sys.executable, "-m", "radio_core.cli", "plugins", "--kind", "evaluator"],
                             capture_output=True, text=True, env=e, timeout=300)
    assert "feature_norm" in listing.stdout and "radio-feature-norm" in listing.stdout, listing.stdout
    for builtin in ("knn", "linear", "zeroshot", "seg", "fidelity"):
        assert builtin in listing.stdout
    proc = subprocess.run([sys.executable, "-m", "radio_core.cli", "eval", str(tiny_run), "feature_norm",
                           "--arg", "images=3", "--baselines", "pixels", "--json"],
                          capture_output=True, text=True, env=e, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["subject"] for r in out["rows"]] == ["student@64", "student@96", "pixels@64", "pixels@96"]
    assert all(r["images"] == 3 and r["norm"] > 0 for r in out["rows"])


def test_sweep_files_name_any_evaluator_with_its_arguments(tmp_path):
    from radio_core.sweep.spec import SweepError, load_sweep

    (tmp_path / "base.yaml").write_text("x: 1\n")

    def sweep(eval_section: str):
        (tmp_path / "s.yaml").write_text(f"recipe: base.yaml\noutput_dir: {tmp_path / 'out'}\n"
                                         f"grid: {{train.steps: [1]}}\neval: {eval_section}\n")
        return load_sweep(tmp_path / "s.yaml")

    spec = sweep("{fidelity: {images: 2}, knn: {data: D, k: 5}, linear: {data: D, epochs: 10}, seg: {data: S}}")
    assert spec.eval.tasks() == [("fidelity", {"images": 2}), ("knn", {"data": "D", "test_fraction": 0.3, "k": 5}),
                                 ("linear", {"data": "D", "epochs": 10}), ("seg", {"data": "S"})]
    with pytest.raises(SweepError, match="unknown evaluator 'linaer'.*Did you mean 'linear'"):
        sweep("{linaer: {data: D}}")
    with pytest.raises(SweepError, match="eval.linear.*unknown argument 'epoch'"):
        sweep("{linear: {data: D, epoch: 3}}")


def test_bad_data_is_one_line_naming_the_file(tiny_run, tmp_path, capsys):
    from radio_core.cli import main

    folder = tmp_path / "bad"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for cls in ("a", "b"):
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "b" / "9.png").write_bytes(b"not a png")
    assert main(["eval", str(tiny_run), "knn", "--data", str(folder), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data: ") and "9.png: cannot be read" in err[0], err
    assert main(["eval", str(tiny_run), "knn", "--data", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "knn"]) == 2
    assert "knn needs --data" in capsys.readouterr().err
