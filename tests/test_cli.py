"""The `molmo2-jax` command: its subcommands, the packaged presets and recipes (found by name, or a user's own
YAML by path), and the shared error handling (a Molmo2Error or OSError in one line, any other exception with
its traceback)."""

import importlib
import inspect
import pkgutil
import sys
import types

import pytest

import molmo2_jax
from molmo2_jax import cli
from molmo2_jax.config import CONFIGS, ConfigError, load_preset, packaged_configs
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.training.config import TrainConfigError, load_train_config

COMMANDS = ["build-synthetic", "convert", "convert-dataset", "eval", "eval-synthetic", "export", "generate", "plan",
            "score", "train", "verify"]


def test_every_entry_point_is_a_subcommand():
    assert set(COMMANDS) <= set(cli.command_names())


def test_underscored_names_still_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["build_synthetic", "--help"])
    assert exit_.value.code == 0 and "usage: molmo2-jax build-synthetic" in capsys.readouterr().out


def test_presets_and_recipes_ship_inside_the_package():
    assert CONFIGS.joinpath("molmo2-8b.yaml").is_file()
    assert str(CONFIGS).startswith(str(molmo2_jax.__path__[0]))
    assert {"molmo2-4b", "molmo2-8b", "molmo2-o-7b", "tiny"} <= set(packaged_configs())
    assert {"tiny", "molmo2-8b-sft"} <= set(packaged_configs("train"))
    assert load_preset("molmo2-8b", ["text.num_layers=2"]).text.num_layers == 2
    assert load_train_config("tiny").model.preset == "tiny"


def test_a_users_yaml_file_works(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("text: {num_layers: 3}\n")
    assert load_preset(str(preset)).text.num_layers == 3
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"model: {{preset: {preset}}}\nsteps: 7\n")
    assert load_train_config(recipe).steps == 7


@pytest.mark.parametrize("text, message", [
    (None, r"model preset 'nope' not found; give a YAML file or one of the packaged names: \[.*'molmo2-8b'"),
    ("text: [", r"not valid YAML"),
    ("- 1\n- 2\n", r"a model preset must be a YAML mapping, got list"),
])
def test_bad_presets_are_one_clear_error(tmp_path, text, message):
    name = "nope"
    if text is not None:
        name = tmp_path / "bad.yaml"
        name.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_preset(str(name))
    assert "\n" not in str(error.value)
    with pytest.raises(TrainConfigError, match=message.replace("model preset", "training config")
                       .replace("'molmo2-8b'", "'molmo2-8b-sft'")):
        load_train_config(name)


@pytest.fixture
def command(monkeypatch):
    """A `molmo2-jax boom` subcommand that raises the exception its test sets."""
    module = types.ModuleType("molmo2_jax.commands.boom")
    module.HELP = "raise"
    module.add_arguments = lambda parser: None

    def run(args):
        raise module.error

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "command_names", lambda: ["boom"])
    return module


@pytest.mark.parametrize("error, line", [
    (ConfigError("steps: expected int"), "molmo2-jax boom: error: steps: expected int"),
    (FileNotFoundError(2, "No such file or directory", "x.yaml"),
     "molmo2-jax boom: error: [Errno 2] No such file or directory: 'x.yaml'"),
])
def test_user_errors_are_one_line(command, capsys, error, line):
    command.error = error
    assert cli.main(["boom"]) == 1
    assert capsys.readouterr().err.splitlines() == [line]


def test_other_exceptions_keep_their_traceback(command):
    command.error = KeyError("a bug")
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["boom"])
    command.error = ValueError("not ours: a bug too")
    with pytest.raises(ValueError, match="a bug too"):
        cli.main(["boom"])


def test_interrupt_exits_130(command, capsys):
    command.error = KeyboardInterrupt()
    assert cli.main(["boom"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_every_project_exception_derives_from_molmo2_error():
    classes = set()
    for info in pkgutil.walk_packages(molmo2_jax.__path__, "molmo2_jax."):
        module = importlib.import_module(info.name)
        classes |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, BaseException) and c.__module__ == module.__name__}
    assert len(classes) > 20
    assert [c.__qualname__ for c in classes if not issubclass(c, Molmo2Error)] == []
