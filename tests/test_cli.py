"""The generated CLI: help for every subcommand, config precedence, and errors that name the key."""

import subprocess
import sys

import pytest
import yaml

from deepslicing.cli import COMMANDS, main


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"deepslicing {command}" in out and "--set KEY=VALUE" in out


def test_console_script_lists_the_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "deepslicing.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for c in COMMANDS:
        assert c.name in out.stdout


def test_precedence_defaults_file_flags_set(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("episodes: 4\nseed: 9\nenv:\n  episode_length: 30\n  num_slices: 5\n")
    code = main(
        ["evaluate", "--config", str(config), "--episodes", "2", "--set", "env.num_slices=7"]
        + ["--print-config"]
    )
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["episodes"] == 2  # flag beats file
    assert resolved["seed"] == 9  # file beats default
    assert resolved["env"]["episode_length"] == 30
    assert resolved["env"]["num_slices"] == 7  # --set beats all
    assert resolved["out"] == "eval_out"  # default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--set", "env.colour=red"], "colour: unknown key"),
        (["evaluate", "--set", "episodes=many"], "episodes: must be an integer"),
        (["evaluate", "--set", "env.num_slices=21"], "num_slices: must be between 1 and 20"),
        (["evaluate", "--policy", "magic"], "policy"),
        (["bench", "gpu"], "target: must be one of"),
    ],
)
def test_bad_config_exits_2_naming_the_key(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print-config"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_yaml_file_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("episodes: [1,\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(config), "--print-config"])
    assert exit_info.value.code == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_list_flags_take_words_or_comma_lists(capsys):
    assert main(["evaluate", "--policy", "equal", "oracle,static", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["policy"] == ["equal", "oracle", "static"]
