"""Body of a test-only plugin distribution that breaks the plugin contract on request, the way a
careless third-party package would: it sleeps (a hang) or calls ``sys.exit`` at import, in a
factory or in its N-th forward; its student returns wrong shapes or NaN. Environment:

* ``MISBEHAVE_AT``: ``import`` | ``build`` | ``forward`` (the teacher ``toy``'s forward);
* ``MISBEHAVE_HOW``: ``sleep`` (300 s) | ``exit`` (``sys.exit(0)``);
* ``MISBEHAVE_AFTER``: forward calls to let through first (default 0);
* ``MISBEHAVE_MARKER``: a file touched just before misbehaving (the test waits for it);
* ``MISBEHAVE_STUDENT``: ``shape`` | ``nan`` | ``type`` for the student ``toy_student``.

The loss ``toy_nan`` is always NaN.
"""
import os
import sys
import time
from pathlib import Path

from radio_core import Student, StudentOutput, Teacher, TeacherOutput, hookimpl


def _misbehave(where: str) -> None:
    if os.environ.get("MISBEHAVE_AT") != where:
        return
    marker = os.environ.get("MISBEHAVE_MARKER")
    if marker:
        Path(marker).touch()
    if os.environ.get("MISBEHAVE_HOW") == "exit":
        sys.exit(0)
    time.sleep(300)


_misbehave("import")


def _toy_teacher_class():
    import torch
    from torch import nn

    class ToyTeacher(Teacher):
        """A patchify conv: 16-dim summary and 16-channel grid at 64 px."""

        def __init__(self) -> None:
            super().__init__()
            self.input_size, self.patch_size = (64, 64), 16
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
            self.summary_dim = self.spatial_dim = 16
            torch.manual_seed(0)
            self.embed = nn.Conv2d(3, 16, 16, stride=16)
            self.calls = 0

        def forward(self, images):
            self.calls += 1
            if self.calls > int(os.environ.get("MISBEHAVE_AFTER", "0")):
                _misbehave("forward")
            x = self.embed(images)
            return TeacherOutput(summary=x.mean((2, 3)), spatial=x)

    return ToyTeacher


def build_toy(resolution=None):
    """A toy teacher."""
    _misbehave("build")
    return _toy_teacher_class()()


def build_toy_student(num_cls_tokens: int = 1):
    """A toy student (patchify conv) that breaks its contract as MISBEHAVE_STUDENT says."""
    import torch
    from torch import nn

    class ToyStudent(Student):
        def __init__(self) -> None:
            super().__init__()
            self.embed_dim, self.patch_size, self.num_cls_tokens = 16, 16, num_cls_tokens
            self.embed = nn.Conv2d(3, 16, 16, stride=16)

        def forward(self, images):
            x = self.embed(images)
            b, d, h, w = x.shape
            patches = x.flatten(2).transpose(1, 2)
            summary = patches.mean(1, keepdim=True).expand(b, self.num_cls_tokens, d)
            how = os.environ.get("MISBEHAVE_STUDENT")
            if how == "shape":
                patches = patches[:, :-1]  # one patch short of its grid
            elif how == "nan":
                patches = patches * float("nan")
            elif how == "type":
                return {"summary": summary, "patches": patches}
            return StudentOutput(summary=summary, patches=patches, grid=(h, w))

    _misbehave("build_student")
    return ToyStudent()


def build_nan_loss():
    """A loss that is always NaN (what a broken loss plugin, or a diverged run, gives)."""
    from radio_core import Loss

    class NanLoss(Loss):
        def forward(self, pred, target):
            return (pred - target).abs().mean() * float("nan")

    return NanLoss()


@hookimpl
def radio_register(registry):
    registry.add("teacher", "toy", build_toy)
    registry.add("student", "toy_student", build_toy_student)
    registry.add("loss", "toy_nan", build_nan_loss)
