from __future__ import annotations

import dataclasses
import tomllib

import pytest

from lacy_stream.config.job_config import ConfigError, load_job_config
from lacy_stream.trainer.train import check_config


def test_defaults_toml_and_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[data]\nshards = "/data/wiki-{000000..000127}.tar"\nseq_len = 512\n\n[tokenizer]\npath = "llama.model"\n')
    config = load_job_config(path, ["--data.seq_len=256", "--data.num_workers", "4", "--data.allow_pipe=true",
                                    "--data.http_timeout_s=5", "--tokenizer.path=/x/y.model"])
    assert config.data.shards == "/data/wiki-{000000..000127}.tar"
    assert config.data.seq_len == 256 and config.data.num_workers == 4 and config.data.allow_pipe is True
    assert config.data.http_timeout_s == 5.0 and isinstance(config.data.http_timeout_s, float)
    assert config.tokenizer.path == "/x/y.model"
    assert load_job_config().data.seq_len == 1024


def test_string_overrides_need_no_quotes():
    config = load_job_config(None, ["--data.shards=https://host/wiki-{000..009}.tar::shards/demo", "--tokenizer.path", "123"])
    assert config.data.shards == "https://host/wiki-{000..009}.tar::shards/demo"
    assert config.tokenizer.path == "123"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.seq_lenn=3"], "unknown key"),
        (["--dat.seq_len=3"], "unknown key"),
        (["--data.seq_len=abc"], "expected int"),
        (["--data.seq_len=1.5"], "expected int"),
        (["--data.allow_pipe=1"], "expected bool"),
        (["--data.seq_len"], "no value"),
        (["data.seq_len=3"], "expected an override"),
    ],
)
def test_strictness(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[data]\nbatch_size = true\n")
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_job_config(wrong)


@pytest.mark.parametrize("name", ["tiny_cpu", "334m", "334m_baseline", "1.3b", "1.3b_baseline"])
def test_shipped_run_configs_load_with_every_method(name):
    from lacy_stream.config.job_config import RUN_CONFIGS
    from lacy_stream.loss.masks import METHODS

    path = RUN_CONFIGS / f"{name}.toml"
    config = load_job_config(path)
    assert config.model.preset == {"tiny_cpu": "tiny"}.get(name, name.split("_")[0])
    if name != "tiny_cpu":
        batch = {"334m": 128, "1.3b": 112}[config.model.preset]
        assert config.train.global_batch_tokens == batch * 1024
        assert config.train.steps == (340_000 if name.endswith("baseline") else 400_000)
        assert config.annotation.enabled is not name.endswith("baseline")
    for name, method in METHODS.items():
        reference = ["--loss.reference=runs/baseline"] if method.needs_reference else []
        config = load_job_config(path, [f"--loss.method={name}", *reference])
        check_config(config)
        assert config.loss.method == name


@pytest.mark.parametrize(
    "override, message",
    [
        ("--loss.method=lacyy", "not one of"),
        ("--model.preset=7b", "not one of"),
        ("--loss.call_ratio=1.5", r"\[0, 1\]"),
        ("--train.steps=0", "positive"),
        ("--optimizer.warmup_steps=-1", "negative"),
        ("--train.dtype=fp16", "not one of"),
        ("--annotation.student_dtype=fp16", "not one of"),
        ("--optimizer.schedule=linear", "not one of"),
    ],
)
def test_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_job_config(None, [override]))


def test_every_key_has_a_type_a_default_and_a_one_line_meaning():
    from lacy_stream.config.job_config import JobConfig, config_keys

    keys = config_keys()
    assert [key.name for key in keys] == [f"{section.name}.{item.name}" for section in dataclasses.fields(JobConfig)
                                          for item in dataclasses.fields(section.default_factory())]
    assert all(key.type in ("str", "int", "float", "bool") and key.meaning and "\n" not in key.meaning for key in keys)
    assert next(key for key in keys if key.name == "data.seq_len").value == 1024
    shipped = {key.name: key.value for key in config_keys(load_job_config("tiny_cpu"))}
    assert shipped["train.val_shards"] == "shards/demo/heldout"


def test_the_printed_config_loads_back_to_the_same_config(tmp_path):
    from lacy_stream.config.job_config import config_toml

    tricky = 'a "quoted" \\ path\twith\x7f é and 🦙'
    config = load_job_config("tiny_cpu", [f"--data.shards={tricky}", "--optimizer.eps=1e-12", "--loss.call_ratio=0.2"])
    path = tmp_path / "printed.toml"
    path.write_text(config_toml(config), encoding="utf-8")
    assert load_job_config(path) == config
    assert tomllib.loads(path.read_text(encoding="utf-8"))["data"]["shards"] == tricky
