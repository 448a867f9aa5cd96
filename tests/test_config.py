"""The schema (node0sim/config.py) is the one source of defaults; conf/ only sets what differs from it.

``test_no_yaml_restates_a_schema_default`` is how "a default value lives in exactly one place" is checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from node0sim.app import CONF_DIR, compose_run_config
from node0sim.config import ConfigError, RunSchema, build_section, load_run_config, schema, schema_sections

CONF = Path(CONF_DIR)
# conf/hydra/ holds presets of Hydra's own groups (launchers), which set plugin settings, not node0sim's schema
YAMLS = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.relative_to(CONF).parts[0] != "hydra")


def _settings(name: str) -> dict[tuple[str, ...], Any]:
    """What ``conf/<name>`` sets, by (section, key) or (top-level key,), with its package applied; interpolations are
    kept as written, the defaults list and ``hydra.*`` left out."""
    path = CONF / name
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    node.pop("defaults", None)
    node.pop("hydra", None)
    group = Path(name).parent.as_posix()
    if group != "." and "# @package _global_" not in path.read_text():
        node = {group: node}
    sections = schema_sections()
    return {
        (top, key) if top in sections else (top,): value
        for top, values in node.items()
        for key, value in (values.items() if top in sections else [(None, values)])
    }


def _default(key: tuple[str, ...]) -> Any:
    """The schema's default at ``key`` (``???`` where the schema requires a value)."""
    node = OmegaConf.to_container(schema())
    for part in key:
        node = node[part]
    return node


def _composed(*overrides: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The resolved config Hydra composes from conf/, and the option chosen in each config group."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True), choices


@pytest.mark.parametrize("name", YAMLS)
def test_no_yaml_restates_a_schema_default(name):
    """No default value appears twice: every key a YAML under conf/ sets differs from the default of the schema
    it overrides (RunSchema and the section classes), or is an interpolation."""
    restated = {
        ".".join(key): value
        for key, value in _settings(name).items()
        if not (isinstance(value, str) and value.startswith("${")) and value == _default(key)
    }
    assert not restated, f"conf/{name} restates schema defaults: {restated}"


def test_each_section_from_its_class_equals_the_composed_default_config():
    """Keys no YAML of the default composition sets take exactly the class defaults on the command line too."""
    composed, choices = _composed()
    chosen = ["config.yaml", *(f"{group}/{option}.yaml" for group, option in choices.items() if f"{group}/{option}.yaml" in YAMLS)]
    set_keys = {key for name in chosen for key in _settings(name)}
    for name, cls in schema_sections().items():
        given = {key: composed[name][key] for (section, *rest) in set_keys if section == name for key in rest}
        assert build_section(cls, given, name) == build_section(cls, composed[name], name), name
    for field in dataclasses.fields(RunSchema):
        if (field.name,) not in set_keys and field.name not in schema_sections():
            assert composed[field.name] == field.default


def test_defaults_the_command_line_used_before_live_in_the_classes():
    # conf/ and the classes disagreed until the YAML values (what the CLI used) became the class defaults
    run = compose_run_config()
    assert (run.averaging.matchmaking_time_s, run.averaging.matchmaking_slack_s, run.averaging.progress_period_s) == (1.0, 0.2, 0.5)
    assert (run.optim.lr, run.optim.warmup_steps) == (0.003, 5)
    assert run.averaging.target_batch_size == run.train.batch_size and run.compression.seed == run.seed


def test_a_plain_resolved_mapping_loads_like_the_composed_config():
    composed, _ = _composed("churn=volunteer", "averaging=node0", "seed=3")
    assert load_run_config(composed) == compose_run_config("churn=volunteer", "averaging=node0", "seed=3")
    published = {k: v for k, v in composed.items() if k not in ("swarm", "wandb")}
    with pytest.raises(ConfigError, match=r"missing config section\(s\) \['wandb', 'swarm'\]"):
        load_run_config(published)


@pytest.mark.parametrize(
    "section,change,message",
    [
        ("optim", {"name": "sgd"}, r"optim\.name: 'sgd' is not one of \['adamw', 'nesterov_async', 'nag_delay'\]"),
        ("averaging", {"target_batch_size": None}, r"averaging\.target_batch_size: a value is required"),
        ("topology", {"stages": 2}, r"topology\.stages: unknown key\(s\) stages; allowed keys: num_stages, peers_per_stage"),
        ("model", {"dim": "wide"}, r"model\.dim: expected int"),
        ("model", {"n_kv_heads": 3}, r"model: .*n_kv_heads"),
        ("backend", {"name": "cloud"}, r"backend: 'cloud' is not one of \['sim', 'swarm'\]"),
    ],
)
def test_every_section_is_validated_by_one_mechanism_naming_the_key(section, change, message):
    composed, _ = _composed()
    composed[section] = {**composed[section], **change}
    with pytest.raises(ConfigError, match=message):
        load_run_config(composed)


def test_cross_section_checks_happen_at_load_time():
    with pytest.raises(ConfigError, match=r"model\.vocab_size: must be set in timing mode"):
        compose_run_config("sim.numerics=false")
    with pytest.raises(ConfigError, match=r"train\.seq_len: 512 exceeds model\.max_seq_len \(256\)"):
        compose_run_config("train.seq_len=512")
    with pytest.raises(ConfigError, match=r"train\.steps"):  # Hydra refuses it against the schema's type
        compose_run_config("train.steps=many")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("optim.lr=-1",), r"optim\.lr: must be a finite number > 0, got -1\.0"),
        (("optim.lr=nan",), r"optim\.lr: must be a number, got nan"),
        (("optim.clip_grad_norm=-1",), r"optim\.clip_grad_norm: must be a finite number >= 0, got -1\.0"),
        (("optim.beta2=1",), r"optim\.beta2: must be in \[0, 1\)"),
        (("network.up_mbps=1e-9",), r"network\.up_mbps: must be at least 0\.001 Mb/s"),
        (("network.down_mbps=nan",), r"network\.down_mbps: must be a number, got nan"),
        (("train.batch_size=0",), r"train\.batch_size: must be >= 1, got 0"),
        (("train.ban_s=-1",), r"train\.ban_s: must be >= 0"),
        (("train.hedge_quantile=1.0",), r"train\.hedge_quantile: must be in \(0, 1\) or null"),
        (("train.probe_timeout_s=0",), r"train\.probe_timeout_s: must be > 0 or null, got 0"),
        (("train.ban_s=100", "train.max_ban_s=50"), r"train\.max_ban_s: must be >= train\.ban_s"),
        (("swarm.run_config_lifetime_h=0",), r"swarm\.run_config_lifetime_h: must be > 0, got 0"),
        (("swarm.admission=tokens",), r"swarm\.admission: .*tokens"),
        # the tiny model has dim 128: rank 1 is rate 128; topk keeps one fp32 value + int16 index per token at 128*4/6
        (("compression=subspace", "compression.rate=100000"), r"compression\.rate: 100000 is above the maximum 128 "),
        (("compression=topk", "compression.rate=100"), r"compression\.rate: 100 is above the maximum 85\.3333 "),
        # the optional default used to swallow an unknown preset and run the default configuration
        (("experiment=headlin",), r"Could not find 'experiment/headlin'(.|\n)*headline(.|\n)*staleness_sweep"),
    ],
)
def test_out_of_range_values_fail_fast_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run_config(*overrides)


def test_the_highest_compression_rate_of_a_codec_is_accepted():
    assert compose_run_config("compression=subspace", "compression.rate=128").compression.rate == 128
    assert compose_run_config("experiment=headline").compression.name == "subspace"


def test_data_too_short_for_the_sequence_length_is_a_configuration_error(tmp_path):
    from tests.runs import simulate

    with pytest.raises(ConfigError, match=r"data: .*fewer than one window of seq_len \+ 1 = 100001 tokens.*train\.seq_len"):
        simulate(tmp_path, "model.max_seq_len=100000", "train.seq_len=100000", "train.steps=1")


def test_the_node0_preset_selects_node0s_behaviour_and_the_headline_keeps_todays():
    node0, headline = compose_run_config("experiment=node0"), compose_run_config("experiment=headline")
    assert (node0.topology.tail_calls, headline.topology.tail_calls) == ("separate", "fused")
    assert (node0.topology.stage_assignment, headline.topology.stage_assignment) == ("central", "decentralized")
    averaging = node0.averaging
    assert (averaging.part_sizes, averaging.state_averaging, averaging.watchdog_failed_rounds) == ("equal", "partition", 2)
    assert (node0.sim.timing_dtype, headline.sim.timing_dtype) == ("float32", "bfloat16")
    assert (node0.compression.project_gradients, headline.compression.project_gradients) == (False, True)
    assert (node0.optim.beta1, node0.optim.beta2, headline.optim.beta2) == (0.9, 0.999, 0.95)
    assert (node0.optim.min_lr_ratio, headline.optim.min_lr_ratio) == (0.1, 0.0)
    assert (node0.optim.clip_norm(False), node0.optim.clip_norm(True)) == (0.1767767, 0.8838835)
    assert headline.optim.clip_norm(False) == headline.optim.clip_norm(True) == 1.0
    assert node0.model["embedding_init_std"] == headline.model["embedding_init_std"] == 1.0  # both model=node0_8b
    assert compose_run_config().model["embedding_init_std"] == 0.02
    assert node0.averaging.state_timeout_s == 150.0
    # everything else is the headline's setup
    assert (node0.topology.num_stages, node0.compression.rate, node0.sim.numerics) == (32, 100.0, False)


def test_node0_tiny_trains_the_tiny_model_by_node0s_rules_at_its_own_scale():
    tiny, node0, minimal = (compose_run_config(f"experiment={name}") for name in ("node0_tiny", "node0", "minimal"))
    assert (tiny.optim.lr, tiny.optim.warmup_steps, tiny.optim.total_steps) == (minimal.optim.lr, minimal.optim.warmup_steps, None)
    rules = ("beta1", "beta2", "min_lr_ratio", "clip_grad_norm", "tail_clip_grad_norm", "weight_decay", "eps")
    assert [getattr(tiny.optim, key) for key in rules] == [getattr(node0.optim, key) for key in rules]
    assert (tiny.topology.tail_calls, tiny.topology.stage_assignment) == (node0.topology.tail_calls, node0.topology.stage_assignment)
    assert (tiny.compression.project_gradients, tiny.sim.timing_dtype) == (False, node0.sim.timing_dtype)
    assert tiny.averaging == dataclasses.replace(node0.averaging, target_batch_size=minimal.train.batch_size)
    assert tiny.model == {**minimal.model, "embedding_init_std": 1.0}
    assert (tiny.topology.num_stages, tiny.topology.peers_per_stage) == (minimal.topology.num_stages, 1)
