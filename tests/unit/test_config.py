"""Config loading, ``--set`` overrides, one-line errors, batch layout and the identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from steadytrain.config import (
    Config,
    ConfigError,
    FactoryError,
    batch_layout,
    config_from_dict,
    dump_config,
    field_changes,
    identity_differences,
    identity_fields,
    identity_fingerprint,
    load_config,
)
from steadytrain.config.references import resolve_callable

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = REPO_ROOT / "examples" / "tiny.yaml"


def config_error(path: str | Path | None, *overrides: str) -> str:
    """The message of the ConfigError that loading raises; asserts it is one line."""
    with pytest.raises(ConfigError) as raised:
        load_config(path, overrides=list(overrides))
    message = str(raised.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- loading -----------------------------------------------------------------------------


def test_tiny_example_loads_with_its_values() -> None:
    config = load_config(TINY_YAML)
    assert isinstance(config, Config)
    assert config.seed == 1234
    assert config.deterministic is True
    assert config.run_dir == "runs/tiny"
    assert config.model.kwargs == {"num_layers": 2, "width": 128, "num_heads": 4}
    assert config.data.seq_len == 128
    assert config.data.ledger is True
    assert config.train.max_steps == 600
    assert config.train.global_batch_size == 32
    assert config.train.micro_batch_size == 8
    assert config.train.lr == pytest.approx(3e-3)
    assert config.log.every_steps == 25


def test_no_path_gives_the_defaults() -> None:
    assert load_config(None) == Config()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


# --- overrides ---------------------------------------------------------------------------


def test_override_value_is_parsed_as_yaml_mapping() -> None:
    config = load_config(TINY_YAML, overrides=["model.kwargs={width: 64, num_layers: 1}"])
    assert config.model.kwargs == {"width": 64, "num_layers": 1}
    assert isinstance(config.model.kwargs["width"], int)


def test_override_exponent_float_for_typed_field() -> None:
    config = load_config(TINY_YAML, overrides=["train.lr=3e-4"])
    assert isinstance(config.train.lr, float)
    assert config.train.lr == pytest.approx(3e-4)


def test_override_exponent_float_inside_free_form_kwargs() -> None:
    # model.kwargs is untyped, so nothing coerces afterwards: YAML itself must read a number.
    config = load_config(TINY_YAML, overrides=["model.kwargs={dropout: 1e-1}"])
    assert config.model.kwargs["dropout"] == pytest.approx(0.1)


def test_override_bools_ints_and_nested_keys() -> None:
    config = load_config(
        TINY_YAML,
        overrides=["data.ledger=false", "train.max_steps=7", "dist.backend=gloo", "seed=9"],
    )
    assert config.data.ledger is False
    assert config.train.max_steps == 7
    assert config.dist.backend == "gloo"
    assert config.seed == 9


def test_later_override_wins() -> None:
    config = load_config(TINY_YAML, overrides=["train.max_steps=7", "train.max_steps=11"])
    assert config.train.max_steps == 11


def test_override_without_file_creates_sections() -> None:
    config = load_config(None, overrides=["train.global_batch_size=48"])
    assert config.train.global_batch_size == 48
    assert config.train.lr == Config().train.lr


# --- one-line errors ---------------------------------------------------------------------


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\ntrain:\n  lr: 0.1\n  max_steps: 3: 4\n")
    message = config_error(path)
    assert str(path) in message
    assert "malformed YAML" in message
    assert "line 4" in message


def test_unknown_top_level_key_lists_known_keys(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "sede: 1\n"))
    assert message.startswith("sede: unknown key")
    for known in ("seed", "train", "data", "model", "run_dir"):
        assert known in message


def test_unknown_nested_key_lists_the_section_keys() -> None:
    message = config_error(TINY_YAML, "train.lrr=0.1")
    assert message.startswith("train.lrr: unknown key")
    assert "known keys in train" in message
    assert "global_batch_size" in message
    assert "micro_batch_size" in message


def test_wrong_type_names_the_field() -> None:
    message = config_error(TINY_YAML, "train.max_steps=many")
    assert message.startswith("train.max_steps:")
    assert "many" in message


def test_wrong_type_in_file_names_the_field(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "data:\n  seq_len: [1, 2]\n"))
    assert message.startswith("data.seq_len:")


def test_negative_batch_is_refused() -> None:
    message = config_error(TINY_YAML, "train.global_batch_size=-4")
    assert message.startswith("train.global_batch_size:")
    assert "-4" in message


def test_password_in_checkpoint_uri_is_refused_without_echoing_it() -> None:
    message = config_error(TINY_YAML, "checkpoint.uri=s3://AKIAEXAMPLE:hunter2@bucket/runs")
    assert message.startswith("checkpoint.uri: holds a password"), message
    assert "hunter2" not in message and "storage_options" in message
    signed = config_error(TINY_YAML, "checkpoint.uri=abfs://box/runs?sv=2024&sig=c2VjcmV0")
    assert signed.startswith("checkpoint.uri: holds a signature or token"), signed
    assert "c2VjcmV0" not in signed
    # A URL without user info, and a local path, are fine.
    for uri in ("s3://bucket/runs", "/tmp/checkpoints"):
        assert load_config(TINY_YAML, overrides=[f"checkpoint.uri={uri}"]).checkpoint.uri == uri


def test_override_without_equals_sign() -> None:
    message = config_error(TINY_YAML, "train.lr")
    assert "train.lr" in message
    assert "key=value" in message


def test_override_with_empty_key() -> None:
    assert "key=value" in config_error(TINY_YAML, "=3")


def test_override_into_a_scalar() -> None:
    message = config_error(TINY_YAML, "seed.value=3")
    assert "seed.value" in message
    assert "seed is a value, not a section" in message


def test_override_with_invalid_yaml_value() -> None:
    message = config_error(TINY_YAML, "model.kwargs={width: 64")
    assert "model.kwargs" in message
    assert "not valid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert str(missing) in message
    assert "not found" in message


@pytest.mark.parametrize("text", ["- seed: 1\n- train: {}\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    message = config_error(write(tmp_path, text))
    assert "top level must be a mapping" in message


def test_several_problems_are_counted_on_one_line() -> None:
    message = config_error(None, "train.max_steps=-1", "train.lr=-1", "seed=-1")
    assert "(and 2 more problem(s))" in message


def test_config_from_dict_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^log\.every_steps:"):
        config_from_dict({"log": {"every_steps": 0}})


# --- batch layout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "micro", "accum"), [(1, 8, 4), (2, 8, 2), (4, 8, 1), (2, 4, 4), (4, 2, 4)]
)
def test_batch_layout_derives_accumulation(world_size: int, micro: int, accum: int) -> None:
    config = load_config(TINY_YAML, overrides=[f"train.micro_batch_size={micro}"])
    layout = batch_layout(config, world_size=world_size)
    assert layout.grad_accum_steps == accum
    assert layout.micro_batch_size == micro
    assert layout.world_size == world_size
    assert layout.global_batch_size == 32
    assert layout.samples_per_micro_step == world_size * micro


def test_batch_layout_refuses_an_indivisible_global_batch() -> None:
    config = load_config(TINY_YAML)  # global 32, micro 8
    with pytest.raises(ConfigError) as raised:
        batch_layout(config, world_size=3)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("train.global_batch_size:")
    assert "multiple of 24" in message


# --- identity ----------------------------------------------------------------------------

IDENTITY_CHANGES = [
    "seed=99",
    "model.kwargs={num_layers: 3, width: 128, num_heads: 4}",
    "train.global_batch_size=64",
    "train.lr=1e-3",
    "data.seq_len=64",
]
OPERATIONAL_CHANGES = [
    "log.every_steps=5",
    "train.micro_batch_size=4",
    "run_dir=elsewhere",
    "data.ledger=false",
    "checkpoint.every_steps=50",
]


@pytest.mark.parametrize("override", IDENTITY_CHANGES)
def test_identity_change_changes_the_fingerprint(override: str) -> None:
    base = load_config(TINY_YAML)
    changed = load_config(TINY_YAML, overrides=[override])
    assert identity_fingerprint(changed) != identity_fingerprint(base)
    key = override.partition("=")[0]
    differences = identity_differences(identity_fields(base), identity_fields(changed))
    assert len(differences) == 1
    assert differences[0].startswith(f"{key}: ")


@pytest.mark.parametrize("override", OPERATIONAL_CHANGES)
def test_operational_change_keeps_the_fingerprint(override: str) -> None:
    base = load_config(TINY_YAML)
    changed = load_config(TINY_YAML, overrides=[override])
    assert changed != base
    assert identity_fingerprint(changed) == identity_fingerprint(base)
    assert identity_differences(identity_fields(base), identity_fields(changed)) == []


def test_identity_fields_hold_identity_and_not_operational_keys() -> None:
    fields = identity_fields(load_config(TINY_YAML))
    for key in ("seed", "model.kwargs", "train.global_batch_size", "train.lr", "data.seq_len"):
        assert key in fields
    for key in ("log.every_steps", "train.micro_batch_size", "run_dir", "data.ledger"):
        assert key not in fields
    assert fields["train.betas"] == [0.9, 0.95]  # JSON-ready values


def test_fingerprint_ignores_kwargs_order() -> None:
    one = load_config(None, overrides=["model.kwargs={width: 64, num_layers: 1}"])
    two = load_config(None, overrides=["model.kwargs={num_layers: 1, width: 64}"])
    assert identity_fingerprint(one) == identity_fingerprint(two)


def test_identity_differences_lists_each_changed_key() -> None:
    old = {"seed": 1, "train.lr": 0.1, "data.seq_len": 8, "no.such_field": 3}
    new = {"seed": 2, "train.lr": 0.1, "model.kwargs": {"width": 4}}
    # A side without a field holds its default there (128, the GPT's kwargs); one no
    # version knows holds nothing.
    assert identity_differences(old, new) == [
        "data.seq_len: 8 -> 128",
        "model.kwargs: {'num_layers': 2, 'width': 128, 'num_heads': 4} -> {'width': 4}",
        "no.such_field: 3 -> None",
        "seed: 1 -> 2",
    ]


# --- dump ---------------------------------------------------------------------------------


def test_dump_config_round_trips(tmp_path: Path) -> None:
    config = load_config(
        TINY_YAML,
        overrides=[
            "model.kwargs={width: 64}",
            "train.betas=[0.8, 0.99]",
            "data.max_corpus_bytes=9",
        ],
    )
    path = write(tmp_path, dump_config(config), name="resolved.yaml")
    reloaded = load_config(path)
    assert reloaded == config
    assert identity_fingerprint(reloaded) == identity_fingerprint(config)


# --- references ---------------------------------------------------------------------------


def test_resolve_callable_finds_a_function() -> None:
    resolved = resolve_callable("os.path:join", field="model.factory")
    assert resolved("a", "b") == str(Path("a") / "b")


def test_resolve_callable_walks_dotted_attributes() -> None:
    resolved = resolve_callable("pathlib:Path.cwd", field="model.factory")
    assert resolved() == Path.cwd()


@pytest.mark.parametrize("reference", ["os.path.join", ":join", "os.path:", "plain"])
def test_resolve_callable_bad_form(reference: str) -> None:
    with pytest.raises(FactoryError, match=r"^model\.factory: .*pkg\.module:function"):
        resolve_callable(reference, field="model.factory")


def test_resolve_callable_missing_module() -> None:
    with pytest.raises(FactoryError, match=r"^train\.loss_fn: cannot import module"):
        resolve_callable("no_such_module_zz.sub:fn", field="train.loss_fn")


def test_resolve_callable_missing_attribute() -> None:
    with pytest.raises(FactoryError, match=r"^model\.factory: module 'os\.path' has no attr"):
        resolve_callable("os.path:no_such_function", field="model.factory")


def test_resolve_callable_not_callable() -> None:
    with pytest.raises(FactoryError, match=r"^model\.factory: 'os:sep' is not callable"):
        resolve_callable("os:sep", field="model.factory")


def test_a_field_added_since_a_checkpoint_counts_as_its_default_there() -> None:
    recorded = identity_fields(load_config(None))
    del recorded["parallel.comm_hook"]  # a manifest written before the field existed
    assert field_changes(recorded, identity_fields(load_config(None))) == {}
    changed = identity_fields(load_config(None, overrides=["parallel.comm_hook=fp16"]))
    assert field_changes(recorded, changed) == {"parallel.comm_hook": ("allreduce", "fp16")}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("data.corpus=texts", "data.corpus"),
        ("data.dataset_factory=pkg:make", "data.dataset_factory"),
        ("data.shuffle_window_shards=4", "data.shuffle_window_shards"),
    ],
)
def test_a_mixture_refuses_another_kind_of_data(extra: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"data.sources and {named}: give one"):
        load_config(None, overrides=["data.sources=[{corpus: a, weight: 2}]", extra])
