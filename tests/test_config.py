"""Tests of wf_data.config: the shipped YAMLs, overrides, error messages, paths, workers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from omegaconf import OmegaConf

from wf_data.config import (
    NUM_WORKERS_ENV,
    ConfigError,
    ConfigTypeError,
    DataConfig,
    MixingConfig,
    SourceConfig,
    available_configs,
    check_source_paths,
    config_dir,
    load_data_config,
    resolve_num_workers,
)

# configs/data/synthetic.yaml parametrises tools/train.py's SyntheticBatches, not a DataConfig.
NOT_DATA_CONFIGS = {"synthetic"}
SHIPPED = sorted(
    path for path in (config_dir() / "data").glob("*.yaml") if path.stem not in NOT_DATA_CONFIGS
)


def minimal(tmp_path, **changes) -> dict:
    """A small valid config dict with two sources under tmp_path."""
    cfg = {
        "name": "tiny",
        "seq_len": 64,
        "sources": {
            "a": {"path": str(tmp_path / "a"), "weight": 2.0},
            "b": {"path": str(tmp_path / "b"), "weight": 1.0},
        },
    }
    cfg.update(changes)
    return cfg


def make_prepared(path) -> None:
    """A directory that passes the path check (manifest present)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"version": 1}))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    by_name = load_data_config(path.stem, check_paths=False)
    by_path = load_data_config(path, check_paths=False)
    assert by_name == by_path
    assert by_name.enabled_sources(), "a shipped config must enable at least one source"
    assert math.isclose(sum(by_name.weights().values()), 1.0)
    for source in [*by_name.sources.values(), *by_name.eval_sources.values()]:
        assert source.path.startswith("/"), "paths are stored absolute"
        assert "wf-data" in source.prepare_hint(by_name.tokenizer)


def test_required_configs_are_shipped():
    required = {
        "mixed_pretrain",
        "fineweb",
        "downstream",
        "sft_nemotron",
        "c4_validation",
        "fineweb_validation",
        "demo",
    }
    assert required <= set(available_configs())


def test_mixed_pretrain_weights_and_disabled_sources():
    cfg = load_data_config("mixed_pretrain", check_paths=False)
    assert {name: s.weight for name, s in cfg.sources.items()} == {
        "fineweb_edu": 0.5,
        "github_code": 0.2,
        "finemath": 0.3,
        "dclm": 0.0,
        "slimpajama": 0.0,
        "synth": 0.0,
    }
    assert cfg.domain_names() == ["fineweb_edu", "github_code", "finemath"]
    assert cfg.mixing.kind == "exp3"
    assert cfg.sources["synth"].text_key == ["query", "synthetic_reasoning", "synthetic_answer"]
    assert cfg.sources["synth"].text_separator == "\n\n"


def test_demo_config_paths_follow_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WF_DATA_CACHE", str(tmp_path))
    cfg = load_data_config("demo", check_paths=False)
    assert cfg.domain_names() == ["prose", "code", "math"]
    assert set(cfg.eval_sources) == {"prose", "code", "math"}
    assert cfg.sources["code"].path == str(tmp_path / "demo" / "code")
    assert 256 <= cfg.seq_len <= 512 and cfg.global_batch_size == 8
    assert cfg.mixing.kind == "exp3"


def test_sft_nemotron_has_column_styles():
    cfg = load_data_config("sft_nemotron", check_paths=False)
    assert cfg.kind == "sft"
    styles = {
        (s.input_key, s.output_key, s.system_prompt_key, s.chat_key) for s in cfg.sources.values()
    }
    assert ("input", "output", "system_prompt", None) in styles
    assert (None, None, None, "messages") in styles


def test_dict_object_name_and_dictconfig_inputs_are_equivalent():
    by_name = load_data_config("mixed_pretrain", check_paths=False)
    yaml_node = OmegaConf.load(config_dir() / "data" / "mixed_pretrain.yaml")
    by_node = load_data_config(yaml_node, check_paths=False)
    by_dict = load_data_config(OmegaConf.to_container(yaml_node), check_paths=False)
    by_object = load_data_config(by_name, check_paths=False)
    by_plain = load_data_config(by_name.to_dict(), check_paths=False)
    assert by_name == by_node == by_dict == by_object == by_plain
    assert isinstance(by_name.mixing, MixingConfig)
    assert isinstance(by_name.sources["finemath"], SourceConfig)


def test_dataconfig_built_in_python_is_completed_and_checked(tmp_path):
    built = DataConfig(sources={"a": SourceConfig("a", str(tmp_path / "a"))}, seq_len=128)
    cfg = load_data_config(built, check_paths=False)
    assert cfg.seq_len == 128 and cfg.packing == "best_fit" and cfg.mixing.kind == "static"
    assert built.sources["a"].path == str(tmp_path / "a") and built.paths.root is None  # as given
    mixed = load_data_config(
        {"sources": {"a": SourceConfig("a", str(tmp_path / "a"))}, "seq_len": 128},
        check_paths=False,
    )
    assert mixed == cfg
    with pytest.raises(ConfigError, match=r"data\.seq_len: must be > 0"):
        load_data_config(dataclasses.replace(built, seq_len=0), check_paths=False)


@pytest.mark.parametrize(
    ("seq_len", "batch", "message"),
    [
        (10**9, 8, r"data\.seq_len: 1,000,000,000 tokens a row is over the limit 16,777,216 "
         r"\(2\*\*24; a global batch of 8 rows of 1,000,000,000 tokens takes 119\.2 GiB\)"),
        (1 << 20, 1 << 13, r"data\.global_batch_size: 8,192 rows x seq_len 1,048,576 = "
         r"8,589,934,592 tokens a step is over the limit"),
    ],
)  # fmt: skip
def test_batch_shape_beyond_any_run_is_refused(seq_len, batch, message):
    """`seq_len: 1e9` used to reach the reader and fail there with a raw MemoryError."""
    given = {"sources": {"a": {"path": "/data/a"}}, "seq_len": seq_len, "global_batch_size": batch}
    with pytest.raises(ConfigError, match=message):
        load_data_config(given, check_paths=False)
    largest = dict(given, seq_len=1 << 24, global_batch_size=256)  # 2**32 tokens: accepted
    assert load_data_config(largest, check_paths=False).seq_len == 1 << 24


def test_overrides_change_add_delete():
    cfg = load_data_config(
        "mixed_pretrain",
        overrides=[
            "seq_len=512",
            "mixing.kind=static",
            "sources.dclm.weight=0.25",
            "~sources.synth",
            "+sources.extra.path=/tmp/extra",
            "num_epochs=2",
        ],
        check_paths=False,
    )
    assert cfg.seq_len == 512
    assert cfg.mixing.kind == "static"
    assert cfg.sources["dclm"].weight == 0.25
    assert "synth" not in cfg.sources
    assert cfg.sources["extra"].path == "/tmp/extra" and cfg.sources["extra"].weight == 1.0
    assert cfg.domain_names() == ["fineweb_edu", "github_code", "finemath", "dclm", "extra"]
    assert cfg.num_epochs == 2
    # A schema key absent from the YAML is a plain override, not an addition.
    assert load_data_config("demo", ["prefetch=7"], check_paths=False).prefetch == 7


def test_mixing_shorthand_in_yaml_and_override(tmp_path):
    cfg = load_data_config(minimal(tmp_path, mixing="exp3"), check_paths=False)
    assert cfg.mixing == MixingConfig(kind="exp3")
    cfg = load_data_config("mixed_pretrain", ["mixing=static"], check_paths=False)
    assert cfg.mixing.kind == "static" and cfg.mixing.min_weight == 0.05


def test_paths_root_override_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WF_DATA_ROOT", str(tmp_path / "env_root"))
    cfg = load_data_config("fineweb", check_paths=False)
    assert cfg.sources["fineweb_edu"].path == str(tmp_path / "env_root" / "fineweb_edu")
    cfg = load_data_config("fineweb", [f"paths.root={tmp_path}/cli_root"], check_paths=False)
    assert cfg.sources["fineweb_edu"].path == str(tmp_path / "cli_root" / "fineweb_edu")
    # Loading the result again is a fixed point.
    assert load_data_config(cfg, check_paths=False) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["+mixing.alhpa=0.5"], "data.mixing.alhpa"),
        (["mixing.alhpa=0.5"], "data.mixing.alhpa"),
        (["+seq_lenn=5"], "data.seq_lenn"),
        (["+sources.fineweb_edu.wieght=1"], "data.sources.fineweb_edu.wieght"),
    ],
)
def test_unknown_key_names_path_and_lists_valid_keys(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_data_config("mixed_pretrain", overrides, check_paths=False)
    message = str(info.value)
    assert needle in message and "valid keys" in message
    assert "mixed_pretrain.yaml" in message
    if "mixing" in needle:
        assert "did you mean 'alpha'" in message
        for key in ("kind", "alpha", "warmup_steps", "min_weight", "max_weight", "update_every"):
            assert key in message
    if "wieght" in needle:
        assert "weight" in message and "text_key" in message


def test_unknown_top_level_key_in_dict(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"data\.batch_size: unknown key.*valid keys for data: "
        r".*global_batch_size",
    ):
        load_data_config(minimal(tmp_path, batch_size=4), check_paths=False)


def test_override_of_unknown_source_suggests_plus():
    with pytest.raises(ConfigError, match=r"no entry 'nope'.*\+sources\.nope\.weight=1"):
        load_data_config("mixed_pretrain", ["sources.nope.weight=1"], check_paths=False)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"seq_len": "abc"}, r"data\.seq_len: expected int, got str 'abc'"),
        ({"seq_len": True}, r"data\.seq_len: expected int, got bool"),
        ({"seq_len": 1.5}, r"data\.seq_len: expected int, got float"),
        ({"tokenizer": 3}, r"data\.tokenizer: expected str \| null, got int"),
        ({"mixing": [1, 2]}, r"data\.mixing: expected a mapping with keys kind, alpha"),
        ({"mixing": {"alpha": "high"}}, r"data\.mixing\.alpha: expected float, got str"),
        ({"sources": 5}, r"data\.sources: expected a mapping of name -> source"),
    ],
)
def test_wrong_type_names_path_and_expected_type(tmp_path, changes, needle):
    with pytest.raises(ConfigTypeError, match=needle) as info:
        load_data_config(minimal(tmp_path, **changes), check_paths=False)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_wrong_source_field_type(tmp_path):
    cfg = minimal(tmp_path)
    cfg["sources"]["a"]["text_key"] = {"col": 1}
    with pytest.raises(
        ConfigTypeError,
        match=r"data\.sources\.a\.text_key: expected str \| "
        r"list\[str\], got dict",
    ):
        load_data_config(cfg, check_paths=False)


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            {"packing": "first_fit"},
            r"data\.packing: 'first_fit' is not one of 'best_fit', "
            r"'concat'",
        ),
        (
            {"mixing": {"kind": "ucb"}},
            r"data\.mixing\.kind: 'ucb' is not one of 'static', "
            r"'exp3'",
        ),
        ({"global_batch_size": 0}, r"data\.global_batch_size: must be > 0"),
        ({"seq_len": -1}, r"data\.seq_len: must be > 0"),
        ({"num_workers": -2}, r"data\.num_workers: must be >= 0"),
        ({"mixing": {"alpha": 1.5}}, r"data\.mixing\.alpha: must be in \[0, 1\]"),
        ({"mixing": {"update_every": 0}}, r"data\.mixing\.update_every: must be >= 1"),
        (
            {"mixing": {"min_weight": 0.6}},
            r"data\.mixing\.min_weight: 0\.6 x 2 enabled sources "
            r"exceeds 1",
        ),
        ({"mixing": {"max_weight": 0.4}}, r"data\.mixing\.max_weight: 0\.4 x 2 enabled"),
        (
            {"kind": "sft", "packing": "concat"},
            r"data\.packing: SFT conversations are packed "
            r"with 'best_fit'",
        ),
    ],
)
def test_bad_values(tmp_path, changes, needle):
    with pytest.raises(ConfigError, match=needle):
        load_data_config(minimal(tmp_path, **changes), check_paths=False)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weights(tmp_path, weight):
    cfg = minimal(tmp_path)
    cfg["sources"]["b"]["weight"] = weight
    with pytest.raises(ConfigError, match=r"data\.sources\.b\.weight: must be finite and >= 0"):
        load_data_config(cfg, check_paths=False)


def test_all_weights_zero_is_refused(tmp_path):
    cfg = minimal(tmp_path)
    for source in cfg["sources"].values():
        source["weight"] = 0
    with pytest.raises(ConfigError, match=r"every weight is 0 .*a, b"):
        load_data_config(cfg, check_paths=False)


def test_sources_as_list_and_unique_names(tmp_path):
    as_list = minimal(
        tmp_path,
        sources=[{"name": "a", "path": "/x/a"}, {"name": "b", "path": "/x/b", "weight": 3}],
    )
    cfg = load_data_config(as_list, check_paths=False)
    assert cfg.domain_names() == ["a", "b"] and cfg.sources["b"].weight == 3.0
    duplicated = minimal(
        tmp_path, sources=[{"name": "a", "path": "/x/a"}, {"name": "a", "path": "/x/b"}]
    )
    with pytest.raises(ConfigError, match=r"duplicate name 'a'.*unique"):
        load_data_config(duplicated, check_paths=False)
    mismatched = minimal(tmp_path, sources={"a": {"name": "z", "path": "/x/a"}})
    with pytest.raises(ConfigError, match=r"data\.sources\.a\.name: 'z' differs from its key"):
        load_data_config(mismatched, check_paths=False)
    with pytest.raises(ConfigError, match=r"data\.sources\.a: missing required key\(s\) path"):
        load_data_config(minimal(tmp_path, sources={"a": {"weight": 1}}), check_paths=False)


def test_missing_path_names_the_prepare_command(tmp_path):
    make_prepared(tmp_path / "a")
    cfg = minimal(tmp_path)
    cfg["sources"]["b"]["prepare_command"] = (
        "wf-data prepare raw/b --out {path} --tokenizer {tokenizer}"
    )
    with pytest.raises(ConfigError) as info:
        load_data_config(cfg)
    message = str(info.value)
    assert "data.sources.b" in message and "does not exist" in message
    assert f"wf-data prepare raw/b --out {tmp_path / 'b'} --tokenizer wf-data-demo" in message
    assert "data.sources.a" not in message
    make_prepared(tmp_path / "b")
    assert load_data_config(cfg).sources["b"].path == str(tmp_path / "b")


def test_path_checks_skip_disabled_sources_and_cover_eval_sources(tmp_path):
    make_prepared(tmp_path / "a")
    cfg = minimal(tmp_path)
    cfg["sources"]["b"]["weight"] = 0
    assert load_data_config(cfg).domain_names() == ["a"]
    cfg["eval_sources"] = {"a": {"path": str(tmp_path / "held_out")}}
    (tmp_path / "held_out").mkdir()
    with pytest.raises(
        ConfigError,
        match=r"eval_sources\.a: .*held_out has no manifest\.json"
        r"[\s\S]*wf-data prepare INPUT\.\.\. --out",
    ):
        load_data_config(cfg)


def test_shipped_config_missing_paths_quote_hub_commands(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_data_config("mixed_pretrain", [f"paths.root={tmp_path}"])
    message = str(info.value)
    for hub_id in ("HuggingFaceFW/fineweb-edu", "codeparrot/github-code", "HuggingFaceTB/finemath"):
        assert hub_id in message
    assert message.count("wf-data prepare") == 3  # the three enabled sources, not the disabled
    assert f"--out {tmp_path / 'finemath'}" in message


def test_check_source_paths_after_preparing(tmp_path):
    cfg = load_data_config(minimal(tmp_path), check_paths=False)
    with pytest.raises(ConfigError, match="wf-data prepare"):
        check_source_paths(cfg)
    make_prepared(tmp_path / "a")
    make_prepared(tmp_path / "b")
    check_source_paths(cfg)


def test_num_workers_precedence_env_over_arg_over_config(monkeypatch, tmp_path):
    cfg = load_data_config(minimal(tmp_path, num_workers=3), check_paths=False)
    monkeypatch.delenv(NUM_WORKERS_ENV, raising=False)
    assert resolve_num_workers(cfg) == 3
    assert resolve_num_workers(cfg, 1) == 1
    assert resolve_num_workers(cfg, 0) == 0
    monkeypatch.setenv(NUM_WORKERS_ENV, "2")
    assert resolve_num_workers(cfg, 1) == 2
    assert resolve_num_workers(cfg) == 2
    monkeypatch.setenv(NUM_WORKERS_ENV, "many")
    with pytest.raises(ConfigError, match=NUM_WORKERS_ENV):
        resolve_num_workers(cfg)
    monkeypatch.delenv(NUM_WORKERS_ENV)
    with pytest.raises(ConfigError, match="num_workers argument"):
        resolve_num_workers(cfg, -1)


def test_unknown_config_name_lists_available():
    with pytest.raises(ConfigError, match=r"unknown data config 'mixed'.*mixed_pretrain"):
        load_data_config("mixed")


def test_bad_override_syntax_and_interpolation(tmp_path):
    with pytest.raises(ConfigError, match="invalid override"):
        load_data_config("demo", ["seq_len=[1,"], check_paths=False)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: cannot resolve interpolation"):
        load_data_config(
            minimal(tmp_path, tokenizer="${oc.env:WF_DATA_SURELY_UNSET_VAR}"), check_paths=False
        )


def test_literal_dollar_brace_survives_round_trip(tmp_path):
    cfg = minimal(tmp_path)
    cfg["sources"]["a"]["prepare_command"] = r"wf-data prepare \${HOME}/raw --out {path}"
    loaded = load_data_config(cfg, check_paths=False)
    assert loaded.sources["a"].prepare_command == "wf-data prepare ${HOME}/raw --out {path}"
    again = load_data_config(loaded, ["seq_len=32"], check_paths=False)
    assert again.sources["a"].prepare_command == loaded.sources["a"].prepare_command


def test_section_of_a_hydra_app_config(tmp_path):
    """cfg.data of a config composed by Hydra (defaults list, struct mode) loads the same."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo.yaml").write_text((config_dir() / "data" / "demo.yaml").read_text())
    (tmp_path / "config.yaml").write_text("defaults:\n  - data: demo\n  - _self_\nsteps: 3\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        app_cfg = compose(config_name="config", overrides=["data.seq_len=128"])
    loaded = load_data_config(app_cfg.data, check_paths=False)
    assert loaded == load_data_config("demo", ["seq_len=128"], check_paths=False)
    assert app_cfg.data.seq_len == 128  # the caller's config is not modified
    changed = load_data_config(app_cfg.data, ["seq_len=64"], check_paths=False)
    assert changed.seq_len == 64 and app_cfg.data.seq_len == 128


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("seq_len: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not a valid YAML config"):
        load_data_config(bad, check_paths=False)
