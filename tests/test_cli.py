"""The `radio` command: every subcommand has its own --help; validate and plan run without training."""
import subprocess
import sys

import pytest

from radio_core.cli import COMMANDS, main

from helpers import QUICKSTART, env


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: radio {command} "), out[:200]
    assert "--validate" not in out and ("--dry-run" not in out or command == "sweep")


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n  {command} " in out
    assert main(["trian"]) == 2
    assert "unknown command 'trian'. Did you mean 'train'?" in capsys.readouterr().err


def test_validate_and_plan_commands(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "OK (3 teachers: clip, dino, sam)" in capsys.readouterr().out
    assert main(["plan", str(QUICKSTART), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: world size 2") and "teacher sam" in out


def test_console_script_and_module_entry_point_agree():
    """`python -m radio_core.run` (accelerate's entry point) still parses recipes the same way."""
    a = subprocess.run([sys.executable, "-m", "radio_core.run", str(QUICKSTART), "--validate"], env=env(),
                       capture_output=True, text=True, timeout=120)
    b = subprocess.run([sys.executable, "-m", "radio_core.cli", "validate", str(QUICKSTART)], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_elastic_launch_with_the_shared_store_is_warned_about():
    """torchrun's worker environment: the agent-store flag is "True" unless the launch set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (then "False")."""
    from radio_core.run import elastic_store_warning

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in elastic_store_warning(shared)
    assert elastic_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert elastic_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None  # nothing restarts
    assert elastic_store_warning({}) is None  # not under torchrun
