"""Evaluation on real pixels: kNN on scikit-learn's digits after a short distillation, zero-shot
through a tiny CLIP text tower, mIoU against hand-checked masks, the report."""
import json

import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image
from test_train import train

from radio_core.eval import metrics
from radio_core.eval.__main__ import main as eval_main
from radio_core.eval.data import open_data
from radio_core.eval.ladder import run_task
from radio_core.eval.loading import load_run

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits (real handwriting, 8x8) upsampled to 32x32 RGB, one folder per class."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    per_class = {c: 0 for c in range(10)}
    for img, label in zip(d.images, d.target):
        if per_class[label] >= 40:
            continue
        per_class[label] += 1
        arr = (img / 16.0 * 255).astype(np.uint8)
        folder = root / CLASSES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(arr).resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{per_class[label]:03d}.png")
    return root


@pytest.fixture(scope="module")
def distilled(digits, tmp_path_factory):
    """A tiny student distilled for 200 steps from a random-init DINOv2 on the digit images."""
    tmp = tmp_path_factory.mktemp("knn")
    path = tiny_recipe(tmp, "teachers={dino: {plugin: dinov2, args: {tiny: true}, resolution: 56}, "
                            "clip: {plugin: clip, args: {tiny: true}, resolution: 64}}",
                       f"data.source={{name: image_folder, args: {{root: {digits}}}}}", "augment.scale=[0.7, 1.0]",
                       "augment.hflip=0.0", "train.steps=200", "train.log_every=50", "data.batch_size=16",
                       "optim.lr=1e-3", "schedule.warmup_steps=10", "student.args.embed_dim=96",
                       "student.args.depth=4", "student.args.num_heads=3")
    trainer, _ = train(path)
    return tmp / "run", trainer


@pytest.mark.slow
def test_knn_beats_chance_and_approaches_the_teacher(digits, distilled):
    run_dir, trainer = distilled
    # the backbone summary (concatenated CLS tokens), RADIO's image embedding for kNN
    result = run_task(run_dir, "knn", str(digits), [64], teachers=True, data_options={"test_fraction": 0.4})
    rows = {r["subject"]: r for r in result["rows"]}
    student, teacher = rows["student@64"], rows["teacher/dino"]
    assert student["top1"] > 0.35 and teacher["top1"] > 0.35, (student, teacher)  # chance is 0.1
    assert student["top1"] >= teacher["top1"] - 0.1, (student, teacher)
    assert student["top5"] >= student["top1"]


@pytest.mark.slow
def test_zero_shot_runs_end_to_end_with_a_tiny_clip_text_tower(digits, distilled, capsys):
    run_dir, _ = distilled
    run = load_run(run_dir)
    emb = torch.nn.functional.normalize(run.teachers["clip"].encode_text(["a photo of a zero."]).float(), dim=-1)
    assert emb.shape[-1] == run.teachers["clip"].summary_dim
    capsys.readouterr()
    assert eval_main([str(run_dir), "zeroshot", "--data", str(digits), "--resolutions", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["rows"][0]
    assert {"top1", "top5"} <= set(row) and out["task"] == "zeroshot" and row["task"] == "zeroshot"
    assert row["classes"] == 10 and row["resolution"] == [64, 64] and "openai_imagenet" in row["prompts"]
    data = open_data(str(digits))
    assert row["test_images"] == len(data.test)
    assert json.loads((run_dir / "eval" / "zeroshot.json").read_text()) == out
    assert eval_main([str(run_dir), "zeroshot", "--data", str(digits), "--resolutions", "64"]) == 0  # a table
    table = capsys.readouterr().out
    assert "task: zeroshot" in table and "student@64  64x64" in table and "top1" in table


def test_miou_against_hand_checked_masks():
    gt = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 0, 1, 2],
                         [2, 0, 0, 1]])
    # pixels not ignored: 10. class 0 -> gt {00,01,10,11}, pred {00,10,11,21}: inter 3, union 5
    # class 1 -> gt {02,03,12,13}, pred {01,02,03,12}: inter 3, union 5
    # class 2 -> gt {20,21}, pred {13,20}: inter 1, union 3
    scores = metrics.SegmentationScores(3, ignore_index=255)
    scores.update(pred[None], gt[None])
    res = scores.compute()
    assert res["per_class_iou"] == pytest.approx([3 / 5, 3 / 5, 1 / 3])
    assert res["miou"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 3) / 3)
    assert res["pixel_acc"] == pytest.approx(7 / 10)


@pytest.mark.slow
def test_linear_probe_segmentation_end_to_end(distilled, tmp_path, capsys):
    """ADE20K-layout folder of real photos with two-region masks (left / right half)."""
    import skimage.data

    run_dir, _ = distilled
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for split, items in (("training", photos[:3]), ("validation", photos[3:])):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for i, arr in enumerate(items):
            img = Image.fromarray(arr).resize((64, 64))
            a = np.asarray(img).copy()
            # a dark left half and a bright right half (the student learned from grey digits)
            a[:, :32] = a[:, :32] // 3
            a[:, 32:] = 255 - a[:, 32:] // 3
            Image.fromarray(a).save(tmp_path / "images" / split / f"{i}.jpg")
            mask = np.zeros((64, 64), np.uint8)
            mask[:, 32:] = 1
            Image.fromarray(mask).save(tmp_path / "annotations" / split / f"{i}.png")
    assert eval_main([str(run_dir), "segment", "--data", str(tmp_path), "--classes", "2", "--resolutions", "64",
                      "--epochs", "300", "--arg", "mask_size=64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["rows"][0]
    assert row["test_images"] == 1 and row["miou"] > 0.6 and 0 <= row["boundary_f"] <= 1


def test_reduce_zero_label_follows_ade20k():
    from radio_core.eval.data import _mask_loader

    labels = np.array([[0, 1, 2], [150, 255, 3]])
    assert _mask_loader(True)(labels).tolist() == [[255, 0, 1], [149, 255, 2]]
    assert _mask_loader(False)(labels).tolist() == labels.tolist()


@pytest.mark.slow
def test_report_and_sweep_pictures(distilled, capsys):
    run_dir, _ = distilled
    assert eval_main([str(run_dir), "report", "--resolutions", "64", "96", "--images", "2"]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    for png in ("loss_curves.png", "pca.png", "resolution_sweep.png"):
        assert (run_dir / "report" / png).stat().st_size > 5000 and png in report
    assert "| 64 |" in report and "dino/spatial" in report
