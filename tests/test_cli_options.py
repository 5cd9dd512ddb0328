"""CLI habits: help defaults read from the config models, no markup loss, -q/-v anywhere, --data from the run,
and every option checked before any work (issues 12 and 16)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from pydantic.fields import FieldInfo
from rich.text import Text

from conftest import run_cli
from uclr_cli import config as cfgmod
from uclr_cli.cli import ablate, common, options
from uclr_cli.cli.app import app
from uclr_cli.errors import ConfigError, UclrError


def _commands(cmd, path=()):
    """(path, click command) of every command and subcommand."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = [(p, c) for p, c in _commands(ROOT) if p]


def _help_rows(path: tuple[str, ...]) -> dict[str, str]:
    """Rendered help, one row per option: {first option name: the row's text}."""
    r = run_cli(*path, "--help", env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    rows = {}
    for line in r.stdout.splitlines():
        cells = line.split("│")
        if len(cells) >= 3 and cells[1].strip().startswith("-"):
            rows[cells[1].split()[0]] = cells[1]
    return rows


def _expected_shown(field: FieldInfo, flag: str) -> object:
    """What the help must say for a field: None (no default stated) or the value it must read as."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool) and "/" not in flag:
        assert value is False, "a plain switch must default to off"
        return None
    return value


def _read_shown(text: str, like: object, flag: str) -> object:
    """Read a stated default back as a value of the model default's type (not via the code that wrote it)."""
    if isinstance(like, bool):
        on, off = flag.split("/")
        assert text in (on.lstrip("-"), off.lstrip("-")), text
        return text == on.lstrip("-")
    if isinstance(like, list | tuple):
        item = type(like[0])
        return [item(p) for p in text.split(",")]
    return type(like)(text)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_states_each_default_of_the_config_model(path, cmd):
    model = getattr(cmd.callback, "config_model", None)
    rows = _help_rows(path)
    if model is None:
        return  # no model behind it: typer states the declared defaults itself
    by_name = {p.name: p for p in cmd.params}
    checked = 0
    for key in model.model_fields:
        field = options.shown_field(
            model, key, getattr(cmd.callback, "config_defaults", {})
        )  # a baseline's own defaults
        param = by_name.get(key)
        if param is None or param.param_type_name == "argument":
            continue  # a field the command sets itself (baseline NAME, ablate tables) or an argument
        flag = "/".join(param.opts + param.secondary_opts)
        row = rows[param.opts[0]]
        shown = re.findall(r"\[default: ([^\]]*)\]", row)
        expected = _expected_shown(field, flag)
        if expected is None:
            assert not shown, (path, key, row)
            continue
        assert len(shown) == 1, (path, key, row)
        assert "(default" not in row, f"hand-written default in {path} {key}: {row}"
        assert _read_shown(shown[0], expected, flag) == expected, (path, key, shown[0], expected)
        checked += 1
    assert checked >= 3, path


def test_baseline_help_states_the_defaults_the_model_applies():
    """Each baseline's help shows its own defaults (config.BASELINE_DEFAULTS), the values its config takes."""
    for kind in ("bprmf", "lightgcn", "neumf"):
        rows, cfg = _help_rows(("baseline", kind)), cfgmod.BaselineConfig(model=kind)
        for flag, value in (("--reg", cfg.reg), ("--lr", cfg.lr)):
            assert float(re.findall(r"\[default: ([^\]]*)\]", rows[flag])[0]) == value, (kind, flag)
    assert (cfgmod.BaselineConfig(model="bprmf").reg, cfgmod.BaselineConfig(model="neumf").reg) == (0.03, 1e-5)
    assert "[default: rowwise-rmsprop]" in _help_rows(("baseline", "bprmf"))["--optimizer"]


def test_contrast_help_states_the_contrast_defaults():
    rows = _help_rows(("contrast",))
    assert "[default: 300]" in rows["--epochs"] and "[default: 20]" in rows["--patience"]


def _help_texts(cmd):
    yield cmd.help or ""
    for p in cmd.params:
        yield getattr(p, "help", None) or ""


def test_no_help_text_loses_square_brackets_to_markup():
    for path, cmd in _commands(ROOT):
        for text in _help_texts(cmd):
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (path, text)
    out = run_cli("ablate", "--help", env={"COLUMNS": "400"}).stdout
    assert "[pretrain], [contrast], [finetune]" in out


# --- -q/-v after the subcommand ------------------------------------------------------------------------------

TRAIN = ["--epochs", "1", "--dim", "8", "--batch-size", "512", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A copy of the tiny data under base/data/tiny and a 1-epoch pretrain run in base/runs/x."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "data" / "tiny"
    shutil.copytree(tiny_data, data)
    r = run_cli("pretrain", "--data", data, "--run", base / "runs" / "x", *TRAIN)
    assert r.exit_code == 0, r.output
    return base


def test_quiet_and_verbose_after_the_subcommand(trained, tmp_path):
    r = run_cli("pretrain", "--data", trained / "data" / "tiny", "--run", tmp_path / "r", *TRAIN, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""
    r = run_cli("pretrain", "-q", "--data", trained / "data" / "tiny", "--run", tmp_path / "r", *TRAIN)
    assert r.exit_code == 0 and r.stdout == ""
    with pytest.raises(UclrError):  # --verbose: the traceback instead of the one line
        run_cli("evaluate", "--run", tmp_path / "missing", "--data", trained / "data" / "tiny", "-v")
    r = run_cli("evaluate", "--run", tmp_path / "r", "--data", trained / "data" / "tiny")
    assert r.exit_code == 0 and "PGE" in r.stdout  # the flags do not stick to the next command


# --- --data from the run folder ------------------------------------------------------------------------------


def _one_error_line(r, *needles: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_evaluate_finds_the_data_the_run_records(trained, tmp_path):
    run = trained / "runs" / "x"
    record = json.loads((run / "config.json").read_text())["dataset"]
    assert not Path(record["path"]).is_absolute()  # folders hold no absolute paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("evaluate", "--run", run, "--json", cwd=elsewhere)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fingerprint"] == record["fingerprint"]

    # recorded data that changed since: refused with one line
    conf = run / "config.json"
    original = conf.read_text()
    try:
        conf.write_text(original.replace(record["fingerprint"], "0" * 64))
        _one_error_line(run_cli("evaluate", "--run", run, cwd=elsewhere), "fingerprint differs", "config.json")
        # a folder written before the path was recorded: the default folder, if it is the same data
        payload = json.loads(original)
        del payload["dataset"]["path"]
        conf.write_text(json.dumps(payload))
        assert run_cli("evaluate", "--run", run, cwd=trained).exit_code == 0
        _one_error_line(run_cli("evaluate", "--run", run, cwd=elsewhere), "pass --data")
    finally:
        conf.write_text(original)


def test_evaluate_when_the_recorded_data_is_gone(trained, tmp_path):
    shutil.copytree(trained / "runs" / "x", tmp_path / "runs" / "x")  # same depth: ../../data/tiny is tmp_path's
    _one_error_line(run_cli("evaluate", "--run", tmp_path / "runs" / "x", cwd=tmp_path), "is gone", "pass --data")


# --- checks before any work ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,toml,needles",
    [
        (["--device", "tpu"], None, ["device", "--device"]),
        (["--out", ""], None, ["--out"]),
        (["--k", "0"], None, ["--k"]),
        (["--k", "abc"], None, ["--k"]),
        (["--buckets", "1,2"], None, ["--buckets"]),
        ([], "data = 5", ["uclr.toml", "data"]),
    ],
)
def test_evaluate_bad_options_are_one_line(trained, tmp_path, args, toml, needles):
    if toml is not None:
        (tmp_path / "uclr.toml").write_text(toml + "\n")
        _one_error_line(run_cli("evaluate", *args, cwd=tmp_path), *needles)
        return
    run = trained / "runs" / "x"
    _one_error_line(run_cli("evaluate", "--run", run, *args, cwd=tmp_path), *needles)


def test_evaluate_out_that_is_a_folder(trained, tmp_path):
    r = run_cli("evaluate", "--run", trained / "runs" / "x", "--out", tmp_path)
    _one_error_line(r, "--out", "folder")


TINY = """
[pretrain]
dim = 8
batch_size = 512
epochs = 1

[contrast]
hidden = [8, 4]
batch_size = 128
epochs = 1

[finetune]
rank = 2
batch_size = 512
epochs = 1
"""


@pytest.mark.parametrize(
    "extra,toml,needles",
    [
        (["--k", "abc"], TINY, ["--k"]),
        (["--k", "0"], TINY, ["--k"]),
        (["--domains", "books,books"], TINY, ["books", "--domains"]),
        ([], "seeds = [0, 0]\n" + TINY, ["seeds"]),
        ([], "pretrain = 5\n", ["pretrain", "table"]),
        (["--set", "contrast.temperature=global"], TINY, ["temperature", "--set"]),
        (["--set", "pretrain.epochs=abc"], TINY, ["epochs", "--set"]),
        (["--set", "pretrian.epochs=3"], TINY, ["pretrian"]),
        (["--set", "pretrain.epoch=3"], TINY, ["epoch", "[pretrain]"]),
        (["--set", "epochs=3"], TINY, ["STAGE.KEY=VALUE"]),
    ],
)
def test_ablate_checks_every_option_before_any_work(tiny_data, tmp_path, extra, toml, needles):
    conf = tmp_path / "a.toml"
    conf.write_text(toml)
    run = tmp_path / "run"
    r = run_cli("ablate", "--data", tiny_data, "--run", run, "--device", "cpu", "--config", conf, *extra)
    _one_error_line(r, *needles)
    assert not run.exists()  # refused before any training


@pytest.mark.parametrize(
    "table,key", [("pretrain", "seeds = [1]"), ("contrast", "temperature = 'global'"), ("finetune", "domain = 'books'")]
)
def test_ablate_refuses_stage_keys_it_owns(tiny_data, tmp_path, table, key):
    conf = tmp_path / "a.toml"
    conf.write_text(TINY.replace(f"[{table}]\n", f"[{table}]\n{key}\n"))
    run = tmp_path / "run"
    r = run_cli("ablate", "--data", tiny_data, "--run", run, "--seeds", "0", "--device", "cpu", "--config", conf)
    _one_error_line(r, key.split()[0], f"[{table}]", "ablate")
    assert not run.exists()


def test_ablate_set_is_typed_and_sits_between_toml_and_flags(tmp_path):
    conf = tmp_path / "a.toml"
    conf.write_text("device = 'cpu'\n" + TINY)
    top = cfgmod.build(cfgmod.AblateConfig, {**cfgmod.read_toml(conf), "seeds": [3]})
    sets = ablate.parse_sets(["pretrain.epochs=3", "contrast.hidden=16,8", "finetune.train-ae=true"])
    pre = ablate.stage_config("pretrain", top, conf, sets["pretrain"])
    con = ablate.stage_config("contrast", top, conf, sets["contrast"])
    ft = ablate.stage_config("finetune", top, conf, sets["finetune"])
    assert pre.epochs == 3 and pre.dim == 8  # --set over the TOML table, the rest from it
    assert con.hidden == [16, 8] and ft.train_ae is True
    assert pre.seeds == con.seeds == ft.seeds == [3] and pre.device == "cpu"  # top level (flags) for every stage
    with pytest.raises(ConfigError, match="must be an integer"):
        ablate.stage_config("pretrain", top, conf, {"epochs": True})


# --- strict numbers ------------------------------------------------------------------------------------------


def test_bools_are_refused_where_numbers_belong(tiny_data, tmp_path):
    conf = tmp_path / "p.toml"
    conf.write_text("epochs = true\n")
    r = run_cli("pretrain", "--data", tiny_data, "--run", tmp_path / "r", "--config", conf)
    _one_error_line(r, "epochs must be an integer, not true", "p.toml")
    for values in ({"lr": False}, {"seeds": [True]}, {"lora_alpha": True}, {"train_ae": 1}):
        with pytest.raises(ConfigError):
            cfgmod.build(cfgmod.FinetuneConfig, values)
    cfg = cfgmod.build(cfgmod.FinetuneConfig, {"data": "d", "lr": 1, "epochs": 3})  # str -> Path, int -> float
    assert cfg.data == Path("d") and cfg.lr == 1.0


def test_value_from_text_reads_the_field_type():
    read = cfgmod.value_from_text
    assert read(cfgmod.ContrastConfig, "hidden", "16, 8") == [16, 8]
    assert read(cfgmod.PretrainConfig, "lr", "1e-2") == 0.01
    assert read(cfgmod.FinetuneConfig, "train_tau", "false") is False
    assert read(cfgmod.PretrainConfig, "optimizer", "adam") == "adam"
    for model, key, text in [(cfgmod.PretrainConfig, "epochs", "3.5"), (cfgmod.ContrastConfig, "hidden", ",")]:
        with pytest.raises(ValueError):
            read(model, key, text)


def test_output_file_checks():
    with pytest.raises(ConfigError, match="folder"):
        common.check_output_file(Path("."), "--out")
    common.check_output_file(None, "--out")
