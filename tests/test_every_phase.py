"""Every phase of a command ends through README's exit-code table with one ``error:`` line naming
the phase: SIGTERM and Ctrl-C while plugins import, while models are built, while the report or
the export of a finished run is written (resumable: 75), a full disk while checkpointing (3,
no temp folder left), a stalled plugin (a watchdog warning names phase and plugin), and a plugin
that calls ``sys.exit`` (its failure, by name). The misbehaving plugin is a real installed
distribution (``tests/misbehaving_plugin.py``)."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import env_with, fake_distribution, metrics, tiny_recipe

from radio_core.run import main

TOY = ["teachers={toy: {plugin: toy, resolution: 64}}", "student.resolution=64", "train.steps=2",
       "checkpoint.every=1000"]


def install_misbehaving(root: Path) -> Path:
    return fake_distribution(root / "site", "misbehaving-plugin", "misbehaving_plugin",
                             (Path(__file__).parent / "misbehaving_plugin.py").read_text(), entry_point="misbehaving")


def start(site: Path, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "radio_core.cli", *args], env=env_with(site, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "the plugin never reached the point it was told to stop at"
        time.sleep(0.2)


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# (phase the plugin blocks in, signal, exit status, fragment of the message)
STOPS = [  # (either signal in either phase takes the same path: two of the four suffice)
    ("import", signal.SIGINT, 130, "stopped by Ctrl-C (SIGINT) while importing plugin 'misbehaving'"),
    ("build", signal.SIGTERM, 143, "stopped by SIGTERM while building teacher 'toy'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("at,sig,status,fragment", STOPS, ids=[f"{a}-{s.name}" for a, s, _, _ in STOPS])
def test_a_stop_signal_in_any_phase_is_one_line_and_its_status(at, sig, status, fragment, tmp_path):
    site = install_misbehaving(tmp_path)
    marker = tmp_path / "reached"
    recipe = tiny_recipe(tmp_path, *TOY)
    proc = start(site, ["train", str(recipe)], MISBEHAVE_AT=at, MISBEHAVE_MARKER=str(marker))
    try:
        wait_for(marker, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-3000:]
    line = one_error(err)
    assert fragment in line and "no checkpoint was written" in line, line


@pytest.mark.slow
def test_sigterm_while_writing_the_report_of_a_finished_run_is_resumable(tmp_path):
    site = install_misbehaving(tmp_path)
    marker = tmp_path / "reached"
    recipe = tiny_recipe(tmp_path, *TOY, "eval.report=true")
    # 2 training steps = 2 teacher forwards; the 3rd is the report's
    proc = start(site, ["train", str(recipe)], MISBEHAVE_AT="forward", MISBEHAVE_AFTER="2",
                 MISBEHAVE_MARKER=str(marker))
    try:
        wait_for(marker, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    line = one_error(err)
    assert "stopped by SIGTERM while forward of teacher 'toy' (plugin misbehaving-plugin:misbehaving)" in line and "--resume writes what is missing" in line
    assert not (tmp_path / "run" / "export").exists()
    again = subprocess.run([sys.executable, "-m", "radio_core.cli", "train", str(recipe), "--resume"],
                           env=env_with(site), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "report" / "report.md").is_file()


@pytest.mark.slow
def test_ctrl_c_while_python_imports_the_command_is_one_line(tmp_path):
    """Ctrl-C moments after start-up, while torch and friends import (some libraries swallow
    what a signal raises there): one line, status 130, whenever it comes."""
    recipe = tiny_recipe(tmp_path, "train.steps=1")
    for module, delay in [(m, d) for m in ("radio_core.run", "radio_core.cli") for d in (0.3, 0.8, 1.6)]:
        args = [str(recipe)] if module == "radio_core.run" else ["train", str(recipe)]
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env_with(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (module, delay, err[-3000:])
        assert "stopped by Ctrl-C (SIGINT) while" in one_error(err)


@pytest.mark.slow
def test_a_stalled_plugin_is_named_by_the_watchdog(tmp_path):
    site = install_misbehaving(tmp_path)
    for at, fragment in (("import", "while importing plugin 'misbehaving' (plugin misbehaving-plugin:misbehaving)"),):
        recipe = tiny_recipe(tmp_path, *TOY)
        proc = start(site, ["train", str(recipe)], MISBEHAVE_AT=at, RADIO_STALL_TIMEOUT="2")
        try:
            deadline, err = time.time() + 240, ""
            while fragment not in err and time.time() < deadline:  # (a slow start-up may be named first)
                err += proc.stderr.readline()
            line = next(ln for ln in err.splitlines() if fragment in ln)
            assert line.startswith("warning: no progress for") and "misbehaving_plugin.py" in line \
                and "in _misbehave" in line, line
        finally:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_a_stalled_teacher_forward_is_named_by_the_watchdog(tmp_path):
    site = install_misbehaving(tmp_path)
    recipe = tiny_recipe(tmp_path, *TOY)
    proc = start(site, ["train", str(recipe)], MISBEHAVE_AT="forward", MISBEHAVE_AFTER="1", RADIO_STALL_TIMEOUT="2")
    try:
        err, deadline = "", time.time() + 240
        fragment = "while forward of teacher 'toy' (plugin misbehaving-plugin:misbehaving)"
        while fragment not in err and time.time() < deadline:
            err += proc.stderr.readline()
        assert "warning: no progress for" in err and fragment in err, err[-3000:]
    finally:
        proc.kill()
        proc.communicate()


# ------------------------------------------------------------------------------ sys.exit
@pytest.mark.parametrize("at,status,fragment", [  # (at import: tests/test_plugin_shadowing.py)
    ("build", 2, "teachers.toy: teacher 'toy' (plugin 'misbehaving', misbehaving-plugin) called sys.exit(0)"),
    ("forward", 3, "plugin misbehaving-plugin (misbehaving) called sys.exit(0) while forward of teacher 'toy' "
                   "(plugin misbehaving-plugin:misbehaving)"),
])
def test_a_plugin_calling_sys_exit_is_that_plugins_failure(at, status, fragment, tmp_path):
    site = install_misbehaving(tmp_path)
    out = subprocess.run([sys.executable, "-m", "radio_core.cli", "train", str(tiny_recipe(tmp_path, *TOY))],
                         env=env_with(site, MISBEHAVE_AT=at, MISBEHAVE_HOW="exit"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == status, out.stderr[-3000:]
    assert fragment in one_error(out.stderr)


# ------------------------------------------------------------------------------ full disk
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch, capsys):
    """ENOSPC injected into the checkpoint's first write (after an intact checkpoint at step 2)."""
    import safetensors.torch

    recipe = tiny_recipe(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.export=false")
    real, calls = safetensors.torch.save_file, []

    def fill_up(tensors, filename, metadata=None):
        calls.append(filename)
        if "step_00000004" in filename:
            Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up)
    assert main([str(recipe)]) == 3
    line = one_error(capsys.readouterr().err)
    assert "checkpoint step_00000004 could not be written" in line and "No space left on device" in line
    assert "the previous checkpoint step_00000002 is intact" in line
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]  # no .tmp-* left behind
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_really_full_file_system_while_checkpointing(tmp_path):
    """The same on a real 160 KiB tmpfs (root only): the first checkpoint does not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        recipe = tiny_recipe(tmp_path, "train.steps=2", "checkpoint.export=false")
        out = subprocess.run([sys.executable, "-m", "radio_core.run", str(recipe), f"output_dir={disk / 'run'}"],
                             env=env_with(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 3, out.stderr[-3000:]
        line = one_error(out.stderr)
        assert "checkpoint step_00000002 could not be written" in line and "No space left on device" in line
        assert [p.name for p in (disk / "run" / "checkpoints").iterdir()] == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
