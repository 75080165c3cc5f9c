from pathlib import Path

import pytest
from conftest import run_cli

from raydecode.config import InfoConfig, IngestSyntheticConfig, load_config
from raydecode.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "ingest.yaml"
    cfg_file.write_text("preset: demo\nstore: /tmp/a\ns3:\n  region: eu-west-1\n")
    cfg = load_config(IngestSyntheticConfig, str(cfg_file), ["seed=7", "s3.endpoint_url=http://127.0.0.1:9", "subjects=[1, 2]"])
    assert (cfg.preset, cfg.seed, cfg.store, cfg.subjects) == ("demo", 7, "/tmp/a", [1, 2])
    assert cfg.s3.region == "eu-west-1" and cfg.s3.endpoint_url == "http://127.0.0.1:9"
    # one --set store=... retargets any stage
    assert load_config(InfoConfig, None, ["store=s3://lab/nsd"]).store == "s3://lab/nsd"


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(IngestSyntheticConfig, None, ["s3.endpoint=http://x"])
    msg = str(e.value)
    assert "unknown key 's3.endpoint'" in msg and "endpoint_url" in msg


def test_invalid_value_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(IngestSyntheticConfig, None, ["preset=huge"])
    msg = str(e.value)
    assert "key 'preset'" in msg and "'huge'" in msg and "'tiny'" in msg and "'paper'" in msg
    with pytest.raises(ConfigError, match="key 'seed'"):
        load_config(IngestSyntheticConfig, None, ["seed=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(IngestSyntheticConfig, None, ["seed"])


def test_cli_invalid_config_value_exits_nonzero_with_one_line(tmp_path):
    out = tmp_path / "store"
    r = run_cli("ingest", "synthetic", "--out", str(out), "--set", "preset=huge")
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and "preset" in r.stderr and "tiny" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(InfoConfig, "nope.yaml")


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "sweep", "dynadiff", "evaluate"])
def test_the_demo_runs_the_jobs_configs(stage):
    """`make demo` runs the jobs/ files a user runs stage by stage, on the demo's own store, work dir and preset."""
    from pathlib import Path

    import yaml

    from raydecode.app import demo
    from raydecode.config import DemoConfig

    d, init = DemoConfig(store="elsewhere/store", workdir="elsewhere", preset="tiny"), "elsewhere/runs/pre/final"
    config = {"pretrain": lambda: demo.demo_train_config(d, "pretrain"),
              "finetune": lambda: demo.demo_train_config(d, "finetune", init_from=init),
              "sweep": lambda: demo.demo_sweep_config(d, init), "dynadiff": lambda: demo.demo_dynadiff_config(d),
              "evaluate": lambda: demo.demo_evaluate_config(d, None)}[stage]().model_dump(mode="json")
    job = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / f"{stage}.yaml").read_text())
    assert (config["store"], config["workdir"]) == ("elsewhere/store", "elsewhere")
    assert config.get("preset", "tiny") == "tiny" and config.get("decoder", {}).get("preset", "tiny") == "tiny"
    if "init_from" in job:
        assert config["init_from"] == init
    for key, value in job.items():  # everything else as the file says
        if key not in ("store", "workdir", "preset", "init_from", "decoder"):
            assert config[key] == value or isinstance(value, dict), key
            if isinstance(value, dict):
                assert all(config[key][k] == v for k, v in value.items() if not isinstance(v, dict)), key


def _parsers(parser, path=()):
    """Every (sub)command's parser, with its command words."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_the_cli_explains_itself():
    """Every option has help, no help text shows reStructuredText markup, every stage that has jobs/ examples names
    existing files, --version answers, and --print-config prints a YAML that validates back to the same config."""
    import yaml
    from conftest import run_main

    from raydecode import __version__
    from raydecode.app.cli import build_parser
    from raydecode.config import STAGE_CONFIGS, SweepConfig, load_config

    parser = build_parser()
    commands = dict(_parsers(parser))
    assert {("pretrain",), ("ingest", "nsd"), ("evaluate",), ("model-info",), ("submit",)} <= set(commands)
    for path, p in commands.items():
        text = p.format_help()
        assert "``" not in text and ":mod:" not in text and ":class:" not in text, (path, text)
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"raydecode {' '.join(path)} {action.option_strings[0]} has no help"
        for example in (p.epilog or "").removeprefix("examples: ").split(", "):
            if example.startswith("jobs/"):
                assert (ROOT / example).is_file(), (path, example)
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"raydecode {__version__}"

    shown = run_main("sweep", "--print-config", "--config", str(ROOT / "jobs" / "sweep.yaml"), "--set", "optim.lr=0.01")
    assert shown.returncode == 0 and "# dotted trial-config keys" in shown.stdout
    printed = yaml.safe_load(shown.stdout)
    assert {k: printed["s3"].pop(k) for k in ("access_key_id", "secret_access_key", "session_token")} == \
        dict.fromkeys(("access_key_id", "secret_access_key", "session_token"))  # shown, never dumped
    assert printed == load_config(SweepConfig, str(ROOT / "jobs" / "sweep.yaml"),
                                  ["optim.lr=0.01"]).model_dump(mode="json")
    secret = run_main("pretrain", "--print-config", "--set", "s3.secret_access_key=" + "b" * 40)
    assert "b" * 40 not in secret.stdout and "secret_access_key: '***'" in secret.stdout
    assert set(STAGE_CONFIGS) >= {("pretrain",), ("sweep",), ("dynadiff",), ("evaluate",), ("embed",)}


def test_a_training_stage_without_a_config_asks_for_one():
    from conftest import run_main

    r = run_main("pretrain")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: pretrain needs a config: --config jobs/pretrain.yaml (demo scale) or jobs/pretrain-nsd.yaml (NSD on a "
        "GPU cluster); `raydecode pretrain --print-config` lists every key")


def test_evaluation_protocols_are_named_and_shifted_ones_need_a_window_reading_model():
    """`protocols`: averaged, single, shift+K / shift-K; anything else is refused by name; a shifted protocol on a
    model that reads trials is refused before anything runs; metric names stay valid for MLflow."""
    from raydecode.config import EvaluateConfig, protocol_shift
    from raydecode.evaluate.protocols import check_protocols, named
    from raydecode.methods.spec import get_method

    cfg = load_config(EvaluateConfig, None, ["protocols=[averaged, shift-2, shift+3]"])
    assert [protocol_shift(p) for p in cfg.protocols] == [None, -2, 3]
    for bad in ("shift+0", "shift2", "later"):
        with pytest.raises(ConfigError, match="protocols") as err:
            load_config(EvaluateConfig, None, [f"protocols=[averaged, {bad}]"])
        assert bad in str(err.value) and len(str(err.value).splitlines()) == 1
    assert named({"test.image_gain": 0.1, "rows": 4}, "shift+3") == {"test.shift3.image_gain": 0.1, "shift3.rows": 4}
    assert named({"recon.ssim": 0.2}, "shift-1") == {"recon.shift-1.ssim": 0.2}
    me2 = {"method": "mindeye2", "model": get_method("mindeye2").config("tiny").model_dump(mode="json")}
    with pytest.raises(ConfigError, match="shift-2.*mindeye2.*windows"):
        check_protocols(cfg, me2)
    dd = {"method": "dynadiff", "model": get_method("dynadiff").config("tiny").model_dump(mode="json")}
    check_protocols(cfg, dd)  # a window-reading method: accepted


def test_a_retired_lookup_cpus_is_ignored_with_a_warning_naming_what_replaced_it():
    """Stimulus lookups run in the read tasks since the lookup actor pool went: an old config still loads."""
    from raydecode.config import DataSelection

    with pytest.warns(FutureWarning, match=r"data\.lookup_cpus is no longer used .*data\.read_cpus"):
        sel = DataSelection.model_validate({"read_cpus": 0.5, "lookup_cpus": 0.25})
    assert sel.read_cpus == 0.5 and "lookup_cpus" not in sel.model_dump()
