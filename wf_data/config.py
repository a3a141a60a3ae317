"""Typed data configuration: the dataclass schema, YAML loading with Hydra overrides, validation.

A data config names the prepared sources of a mixture and how rows are made from them. The
schema is the dataclasses below, and each default lives there; the YAML files in
``configs/data/`` only set what a named config changes. ``load_data_config`` accepts a
``DataConfig``, a dict or OmegaConf ``DictConfig``, or a config name (``"demo"``,
``"mixed_pretrain"``) with Hydra-syntax overrides (``"seq_len=512"``, ``"mixing.kind=static"``,
``"+sources.extra.path=/x"``, ``"~sources.dclm"``), and checks everything once: unknown keys and
wrong types fail naming the key path (``data.mixing.alhpa``) and the valid keys; a missing
source directory fails with the ``wf-data prepare`` command that makes it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wf_data.data.mix.exp3 import UPDATE_RULES, Exp3Options
from wf_data.data.mix.rewards import REWARDS

_EXP3 = Exp3Options()  # the bandit's defaults, written once there

NUM_WORKERS_ENV = "WF_DATA_NUM_WORKERS"
DATA_ROOT_ENV = "WF_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"
ROOT_KEY = "data"  # how error messages name the top of a data config

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "DataConfig",
    "MixingConfig",
    "PathsConfig",
    "SFTConfig",
    "SourceConfig",
    "available_configs",
    "check_source_paths",
    "config_dir",
    "load_data_config",
    "resolve_num_workers",
]


class ConfigError(ValueError):
    """A data config that cannot be used: unknown key, bad value, missing source directory."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (also a ``TypeError``)."""


# ----------------------------------------------------------------------------- schema


@dataclass
class SourceConfig:
    """One prepared dataset directory (``wf-data prepare`` output) and its mixture weight.

    ``path`` is relative to ``paths.root`` unless absolute; ``load_data_config`` stores it
    resolved (absolute). ``weight`` 0 disables the source: not opened, not mixed, not
    path-checked; with EXP3 mixing the weights of the enabled sources are the bandit's prior.
    ``text_key`` (one column or a list joined by ``text_separator``) and the chat columns
    describe the raw records the directory was prepared from: ``chat_key`` names a column of
    ``[{role, content}]`` messages, ``input_key`` / ``output_key`` / ``system_prompt_key`` the
    Nemotron-style columns (``None`` = the defaults of ``wf_data.data.text.chat.to_messages``).
    ``prepare_command`` is the command that creates ``path`` (``{path}`` and ``{tokenizer}`` are
    substituted); error messages quote it.
    """

    name: str
    path: str
    weight: float = 1.0
    format: Literal["tokens", "text", "chat"] | None = None
    text_key: str | list[str] = "text"
    text_separator: str = "\n\n"
    chat_key: str | None = None
    input_key: str | None = None
    output_key: str | None = None
    system_prompt_key: str | None = None
    prepare_command: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether the source takes part in the mixture (weight > 0)."""
        return self.weight > 0

    def prepare_hint(self, tokenizer: str | None = None) -> str:
        """The command that creates ``path``: ``prepare_command`` filled in, or a generic one."""
        if self.prepare_command:
            command = self.prepare_command.replace("{path}", self.path)
            return command.replace("{tokenizer}", tokenizer or "NAME_OR_PATH")
        parts = ["wf-data prepare INPUT...", f"--out {self.path}"]
        if self.chat_key or self.input_key or self.format == "chat":
            parts.append(f"--chat-key {self.chat_key or 'messages'}")
        else:
            if tokenizer and self.format != "text":
                parts.append(f"--tokenizer {tokenizer}")
            keys = [self.text_key] if isinstance(self.text_key, str) else self.text_key
            if keys != ["text"]:
                parts.extend(f"--text-key {key}" for key in keys)
        return " ".join(parts)


@dataclass
class MixingConfig:
    """How rows are drawn across sources: fixed weights, or online EXP3 (Online Data Mixing).

    The EXP3 settings and their defaults are those of ``wf_data.data.mix.exp3.Exp3Options``
    (documented there; ``bandit_from_config`` builds the bandit); ``kind="static"`` uses none
    of them. ``reference_losses``: ``{source: loss}``, or ``auto`` (measured in the run, see
    ``wf_data.data.mix.reference``; needs a warm-up and ``total_steps``). The policy stays at
    the prior for ``warmup_steps`` updates, or ``warmup_fraction`` of ``total_steps``.
    ``update_every``: optimizer steps between mixture updates.
    """

    kind: Literal["static", "exp3"] = "static"
    alpha: float = _EXP3.alpha
    update_rule: Literal[UPDATE_RULES] = _EXP3.update_rule
    reward: Literal[REWARDS] = _EXP3.reward
    # {source: loss}, or "auto" (measured in the run); a mapping or a string, checked below.
    reference_losses: Any = field(default_factory=dict)
    loss_smoothing: float = _EXP3.loss_smoothing
    progress_window: int = _EXP3.progress_window
    warmup_steps: int = _EXP3.warmup_steps
    warmup_fraction: float | None = None
    total_steps: int | None = _EXP3.total_steps
    min_weight: float | None = _EXP3.min_weight
    max_weight: float | None = _EXP3.max_weight
    reward_cap: float | None = _EXP3.reward_cap
    update_every: int = 1


@dataclass
class SFTConfig:
    """Options of ``kind="sft"`` configs: chat template override and the overlong policy."""

    chat_template: str | None = None
    overlong: Literal["error", "truncate", "drop"] = "error"


@dataclass
class PathsConfig:
    """Where relative source paths live: ``root`` (``None`` = ``$WF_DATA_ROOT``, else ``data``)."""

    root: str | None = None


@dataclass
class DataConfig:
    """A whole data pipeline: sources and mixture, tokenizer, packing, batch, workers.

    ``sources`` maps a unique name to its ``SourceConfig``, in mixture order (a domain's id is
    its position among the enabled sources, see ``enabled_sources()``); ``eval_sources`` maps a
    domain name to its held-out data. ``tokenizer`` ``"wf-data-demo"`` is the tokenizer shipped
    with the package; a token source prepared with a tokenizer of other token ids is refused
    unless ``allow_tokenizer_mismatch``. ``window_size`` ``None`` keeps the packer's default;
    ``pad_id`` ``None`` takes the tokenizer's. ``num_epochs`` ``None`` repeats forever.
    ``num_workers`` is overridden by ``resolve_num_workers``. ``prefetch``: batches planned
    ahead of the one delivered, so an EXP3 update reaches the batch ``prefetch + 1`` steps
    later; without workers they are read in groups of ``prefetch + 1``, with workers in
    parallel. ``worker_timeout_s``: a worker that gives no batch for this long is killed and
    the loader raises ``WorkerError`` (``None``: wait forever). A
    ``DataConfig`` built in Python is checked by passing it through ``load_data_config``.
    """

    sources: dict[str, SourceConfig]
    name: str | None = None
    kind: Literal["pretrain", "sft"] = "pretrain"
    tokenizer: str | None = "wf-data-demo"
    allow_tokenizer_mismatch: bool = False
    seq_len: int = 2048
    global_batch_size: int = 8
    packing: Literal["best_fit", "concat"] = "best_fit"
    window_size: int | None = None
    pad_id: int | None = None
    mixing: MixingConfig = field(default_factory=MixingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    seed: int = 0
    num_epochs: int | None = None
    num_workers: int = 0
    prefetch: int = 2
    worker_timeout_s: float | None = 300.0  # = ProcessMap's DEFAULT_TIMEOUT_S (kept light)
    eval_sources: dict[str, SourceConfig] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def enabled_sources(self) -> dict[str, SourceConfig]:
        """The sources with weight > 0, in config order (domain id = position here)."""
        return {name: source for name, source in self.sources.items() if source.enabled}

    def domain_names(self) -> list[str]:
        """Names of the enabled sources, in domain-id order."""
        return list(self.enabled_sources())

    def weights(self) -> dict[str, float]:
        """Normalised weights of the enabled sources (sum 1), in domain-id order."""
        enabled = self.enabled_sources()
        total = sum(source.weight for source in enabled.values())
        return {name: source.weight / total for name, source in enabled.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready); ``load_data_config`` of it gives back ``self``."""
        return dataclasses.asdict(self)


# Scalar given where a section is expected: `mixing: exp3` means `mixing: {kind: exp3}`.
_SHORTHAND_FIELD = {MixingConfig: "kind"}


# ----------------------------------------------------------------------------- loading


def config_dir() -> Path:
    """The directory holding ``data/*.yaml``: the repo's ``configs/`` in a checkout (editable
    install), else the copy packaged in the wheel as ``wf_data/_configs``."""
    package_dir = Path(__file__).resolve().parent
    repo = package_dir.parent
    if (repo / "pyproject.toml").is_file() and (repo / "configs" / "data").is_dir():
        return repo / "configs"
    return package_dir / "_configs"


def available_configs() -> list[str]:
    """Names accepted by ``load_data_config`` (the stems of ``configs/data/*.yaml``)."""
    return sorted(path.stem for path in (config_dir() / "data").glob("*.yaml"))


def load_data_config(
    cfg: DataConfig | Mapping | DictConfig | str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
) -> DataConfig:
    """Build and validate a ``DataConfig`` from a config object, dict, name or YAML path.

    ``overrides`` use Hydra's grammar (``key=value``, ``+key=value`` to add, ``++key=value``,
    ``~key`` to delete). Relative source paths are resolved against ``paths.root`` and stored
    absolute. ``check_paths=False`` skips the source-directory checks (tests, ``--dry``).
    Raises ``ConfigError`` (a ``ValueError``) or ``ConfigTypeError`` (also a ``TypeError``)
    whose message names the YAML file, the key path and the valid keys or choices.
    """
    node, origin = _to_node(cfg)
    try:
        _apply_overrides(node, overrides)
        plain = _resolve(node)
        data = _build(DataConfig, plain, ROOT_KEY)
        _validate(data)
        _resolve_paths(data)
        if check_paths:
            check_source_paths(data)
    except ConfigError as error:
        where = f"{origin}: " if origin else ""
        given = (
            f" (overrides: {list(overrides)})" if overrides and "override" not in str(error) else ""
        )
        raise type(error)(f"{where}{error}{given}") from error
    return data


def _to_node(cfg: Any) -> tuple[DictConfig, str]:
    """A private, mutable ``DictConfig`` of ``cfg`` and a label of where it came from."""
    if isinstance(cfg, DataConfig):
        return OmegaConf.create(_escape_interpolations(dataclasses.asdict(cfg))), ""
    if isinstance(cfg, DictConfig):
        if cfg._get_parent() is None:  # a root config: keep interpolations for after overrides
            node = copy.deepcopy(cfg)
        else:  # a section (cfg.data of an app config) may interpolate keys outside itself
            node = OmegaConf.create(_resolve(cfg))
        OmegaConf.set_struct(node, False)
        OmegaConf.set_readonly(node, False)
        return node, ""
    if isinstance(cfg, Mapping):
        return OmegaConf.create(_plain(cfg)), ""
    if isinstance(cfg, str | os.PathLike):
        path = _config_path(cfg)
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException) as error:
            raise ConfigError(f"{path}: not a valid YAML config: {error}") from error
        if not isinstance(loaded, DictConfig):
            raise ConfigTypeError(
                f"{path}: expected a mapping of data config keys at top level, "
                f"got a list; valid keys: {_key_list(DataConfig)}"
            )
        return loaded, str(path)
    raise ConfigTypeError(
        f"load_data_config: expected a DataConfig, a dict, a DictConfig or a "
        f"config name, got {type(cfg).__name__}"
    )


def _plain(value: Any) -> Any:
    """Nested dicts/lists with dataclasses (``SourceConfig`` values) turned into dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _escape_interpolations(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _escape_interpolations(value: Any) -> Any:
    """Strings of an already-built config are literal: escape ``${`` so OmegaConf keeps it."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {key: _escape_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(item) for item in value]
    return value


def _config_path(name: str | os.PathLike) -> Path:
    """The YAML file of a config name (``"demo"``, ``"data/demo"``) or an explicit path."""
    text = os.fspath(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text.removeprefix("data/"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"data config file {path} does not exist")
        return path
    path = config_dir() / "data" / f"{text.removeprefix('data/')}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown data config {text!r}; available in {path.parent}: "
            f"{', '.join(available_configs())}"
        )
    return path


def _resolve(node: DictConfig) -> dict:
    """``node`` as a plain dict with interpolations resolved; errors name the key."""
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", None) or "?")
        if not key.startswith(ROOT_KEY + "."):
            key = f"{ROOT_KEY}.{key}"
        message = getattr(error, "msg", None) or str(error)
        raise ConfigError(f"{key}: cannot resolve interpolation: {message}") from error


# ----------------------------------------------------------------------------- overrides


def _apply_overrides(node: DictConfig, overrides: Sequence[str]) -> None:
    """Apply Hydra-grammar overrides to ``node`` in place, checking plain ``key=value`` keys
    against the schema so that a typo fails here with the valid keys instead of being added."""
    if isinstance(overrides, str):
        raise ConfigTypeError(f"overrides must be a list of strings, got the string {overrides!r}")
    if not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(f"invalid override: {error}") from error
    for override in parsed:
        line, key = override.input_line, override.key_or_group
        if override.package is not None or override.is_sweep_override():
            raise ConfigError(
                f"override {line!r}: config groups, packages and sweeps are not "
                "supported in a data config"
            )
        value = override.value()
        exists = OmegaConf.select(node, key, default=_MISSING) is not _MISSING
        try:
            if override.is_delete():
                if not exists:
                    raise ConfigError(f"override {line!r}: {ROOT_KEY}.{key} does not exist")
                parent_key, _, leaf = key.rpartition(".")
                parent = OmegaConf.select(node, parent_key) if parent_key else node
                del parent[leaf]
            elif override.is_add() and exists and not isinstance(value, dict | list):
                raise ConfigError(
                    f"override {line!r}: {ROOT_KEY}.{key} already exists; use "
                    f"{line[1:]!r} to change it or '+{line}' to force"
                )
            elif override.is_add() or override.is_force_add():
                OmegaConf.update(node, key, value, merge=True, force_add=True)
            else:
                hint = _check_override_key(node, key, line)
                shorthand = _SHORTHAND_FIELD.get(_strip_optional(hint))
                if shorthand and not isinstance(value, dict):
                    key, value = f"{key}.{shorthand}", value
                OmegaConf.update(node, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {line!r}: {error}") from error


_MISSING = object()


def _check_override_key(node: DictConfig, key: str, line: str) -> Any:
    """The schema type at ``key``; raises when a plain override names no schema key."""
    hint: Any = DataConfig
    current: Any = node
    path = ROOT_KEY
    for part in key.split("."):
        hint = _strip_optional(hint)
        if dataclasses.is_dataclass(hint):
            fields = _field_types(hint)
            if part not in fields:
                raise ConfigError(
                    _unknown_key_message(f"{path}.{part}", hint) + f" (from override {line!r})"
                )
            hint = fields[part]
        elif typing.get_origin(hint) is dict or (hint is Any and isinstance(current, DictConfig)):
            # An `Any` field holding a mapping (mixing.reference_losses) reads like a dict.
            names = list(current) if isinstance(current, DictConfig) else []
            if part not in names:
                raise ConfigError(
                    f"{path}.{part}: no entry {part!r} in {path} (entries: "
                    f"{', '.join(map(str, names)) or 'none'}); to add one use "
                    f"'+{line}'"
                )
            hint = Any if hint is Any else typing.get_args(hint)[1]
        else:
            raise ConfigError(
                f"override {line!r}: {path} holds a single value "
                f"({_type_name(hint)}), it has no key {part!r}"
            )
        path = f"{path}.{part}"
        current = current.get(part) if isinstance(current, DictConfig) else None
    return hint


# ----------------------------------------------------------------------------- typed building


def _build(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against the type ``hint`` (dataclasses built recursively)."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _build_union(hint, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _type_error(path, hint, value)
        return [_build(args[0], item, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        return _build_named_dict(args[1], value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, hint, value)
        return float(value)
    if hint is int and isinstance(value, bool):
        raise _type_error(path, hint, value)
    if not isinstance(value, hint):
        raise _type_error(path, hint, value)
    return value


def _build_union(hint: Any, value: Any, path: str) -> Any:
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise _type_error(path, hint, value)
    candidates = [arg for arg in args if arg is not type(None)]
    if len(candidates) == 1:
        try:
            return _build(candidates[0], value, path)
        except ConfigTypeError as error:  # say "str | null", not "str", at this level
            if dataclasses.is_dataclass(candidates[0]) or not str(error).startswith(path + ":"):
                raise
            raise _type_error(path, hint, value) from None
    for candidate in candidates:
        try:
            return _build(candidate, value, path)
        except ConfigError:
            continue
    raise _type_error(path, hint, value)


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, str) and cls in _SHORTHAND_FIELD:
        value = {_SHORTHAND_FIELD[cls]: value}
    if not isinstance(value, Mapping):
        raise ConfigTypeError(
            f"{path}: expected a mapping with keys {_key_list(cls)}, got {_describe(value)}"
        )
    fields = _field_types(cls)
    for key in value:
        if key not in fields:
            raise ConfigError(_unknown_key_message(f"{path}.{key}", cls))
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in value]
    if missing:
        raise ConfigError(
            f"{path}: missing required key(s) {', '.join(missing)}; valid keys: {_key_list(cls)}"
        )
    kwargs = {key: _build(fields[key], item, f"{path}.{key}") for key, item in value.items()}
    return cls(**kwargs)


def _build_named_dict(item_hint: Any, value: Any, path: str) -> dict:
    """A ``name -> SourceConfig`` dict from a mapping, or from a list of entries with ``name``."""
    if isinstance(value, list | tuple):
        entries: dict = {}
        for index, item in enumerate(value):
            if not isinstance(item, Mapping) or "name" not in item:
                raise ConfigError(
                    f"{path}[{index}]: a list entry needs a 'name' key, got {_describe(item)}"
                )
            if item["name"] in entries:
                raise ConfigError(
                    f"{path}[{index}]: duplicate name {item['name']!r}; source names must be unique"
                )
            entries[item["name"]] = item
        value = entries
    if not isinstance(value, Mapping):
        raise ConfigTypeError(
            f"{path}: expected a mapping of name -> source, got {_describe(value)}"
        )
    built = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigTypeError(f"{path}: source names must be non-empty strings, got {name!r}")
        item_path = f"{path}.{name}"
        if isinstance(item, Mapping) and item_hint is SourceConfig:
            if item.get("name", name) != name:
                raise ConfigError(
                    f"{item_path}.name: {item['name']!r} differs from its key {name!r}"
                )
            item = {**item, "name": name}
        built[name] = _build(item_hint, item, item_path)
    return built


@typing.no_type_check
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        candidates = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(candidates) == 1:
            return candidates[0]
    return hint


def _key_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _unknown_key_message(path: str, cls: type) -> str:
    parent, _, key = path.rpartition(".")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown key {key!r}{suggestion}; valid keys for {parent}: {', '.join(names)}"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_error(path: str, hint: Any, value: Any) -> ConfigTypeError:
    return ConfigTypeError(f"{path}: expected {_type_name(hint)}, got {_describe(value)}")


# ----------------------------------------------------------------------------- validation


def _validate(data: DataConfig) -> None:
    """Value checks that types cannot express; raises the first problem found."""
    for key in ("seq_len", "global_batch_size", "window_size", "num_epochs"):
        value = getattr(data, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{ROOT_KEY}.{key}: must be > 0, got {value}")
    _validate_batch_shape(data.seq_len, data.global_batch_size)
    for key in ("seed", "num_workers", "prefetch", "pad_id"):
        value = getattr(data, key)
        if value is not None and value < 0:
            raise ConfigError(f"{ROOT_KEY}.{key}: must be >= 0, got {value}")
    timeout = data.worker_timeout_s
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(
            f"{ROOT_KEY}.worker_timeout_s: must be finite and > 0 seconds, or null "
            f"to wait forever for a stuck worker; got {timeout}"
        )
    for section in ("sources", "eval_sources"):
        for name, source in getattr(data, section).items():
            _validate_source(source, f"{ROOT_KEY}.{section}.{name}", data.kind)
    if not data.sources:
        raise ConfigError(f"{ROOT_KEY}.sources: at least one source is required")
    if sum(source.weight for source in data.sources.values()) <= 0:
        raise ConfigError(
            f"{ROOT_KEY}.sources: every weight is 0 (0 = disabled); give a positive "
            f"weight to one of: {', '.join(data.sources)}"
        )
    _validate_mixing(data.mixing, len(data.enabled_sources()))
    if data.kind == "sft" and data.packing != "best_fit":
        raise ConfigError(
            f"{ROOT_KEY}.packing: SFT conversations are packed with 'best_fit' "
            f"(never split across rows), got {data.packing!r}"
        )


# Bounds on the batch shape, far above any training run (the largest use 1M-token rows and
# ~60M-token steps): a value past them is a typo (1e9 for 1e4) that would otherwise fail as a
# MemoryError deep in the reader.
MAX_SEQ_LEN = 1 << 24
MAX_BATCH_TOKENS = 1 << 32
BATCH_BYTES_PER_TOKEN = 16  # a row's input_ids, labels, position_ids, segment_ids: int32 each


def _validate_batch_shape(seq_len: int, global_batch_size: int) -> None:
    tokens = seq_len * global_batch_size
    gib = tokens * BATCH_BYTES_PER_TOKEN / (1 << 30)
    size = (
        f"a global batch of {global_batch_size:,} rows of {seq_len:,} tokens takes {gib:,.1f} GiB"
    )
    if seq_len > MAX_SEQ_LEN:
        raise ConfigError(
            f"{ROOT_KEY}.seq_len: {seq_len:,} tokens a row is over the limit {MAX_SEQ_LEN:,} "
            f"(2**24; {size}); give the model's context length"
        )
    if tokens > MAX_BATCH_TOKENS:
        raise ConfigError(
            f"{ROOT_KEY}.global_batch_size: {global_batch_size:,} rows x seq_len {seq_len:,} = "
            f"{tokens:,} tokens a step is over the limit {MAX_BATCH_TOKENS:,} (2**32; {size}); "
            "use fewer rows or shorter ones"
        )


def _validate_source(source: SourceConfig, path: str, kind: str) -> None:
    if not math.isfinite(source.weight) or source.weight < 0:
        raise ConfigError(
            f"{path}.weight: must be finite and >= 0 (0 = disabled), got {source.weight}"
        )
    if not source.path:
        raise ConfigError(f"{path}.path: must not be empty")
    if isinstance(source.text_key, list) and not source.text_key:
        raise ConfigError(f"{path}.text_key: list of columns must not be empty")
    if kind == "sft" and source.format in ("tokens", "text"):
        raise ConfigError(
            f"{path}.format: an SFT source holds chat records ('chat' or null), "
            f"got {source.format!r}"
        )


def _validate_reference(mixing: MixingConfig, path: str) -> None:
    """``reference_losses``: ``{source: loss}`` or ``auto``; given if an excess reward needs it."""
    reference = mixing.reference_losses
    if isinstance(reference, str):
        if reference != "auto":
            raise ConfigError(
                f"{path}.reference_losses: must be {{source: loss}} or auto, got {reference!r}"
            )
        if mixing.total_steps is None or (
            mixing.warmup_steps < 2 and mixing.warmup_fraction is None
        ):
            raise ConfigError(
                f"{path}.reference_losses: auto measures the held-out loss during a static "
                f"warm-up and extrapolates it to the end of the run: set {path}.total_steps and "
                f"{path}.warmup_steps >= 2 (or warmup_fraction), got total_steps="
                f"{mixing.total_steps}, warmup_steps={mixing.warmup_steps}"
            )
    elif isinstance(reference, Mapping):
        for name, value in reference.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{path}.reference_losses.{name}: must be a number, got {value!r}"
                )
    else:
        raise ConfigError(
            f"{path}.reference_losses: must be {{source: loss}} or auto, got {reference!r}"
        )
    if (
        mixing.kind == "exp3"
        and mixing.reward in ("excess_loss", "relative_excess")
        and not reference
    ):
        raise ConfigError(
            f"{path}.reference_losses: reward {mixing.reward} needs a reference loss per "
            "source, e.g. {web: 2.9, code: 1.4} (a reference model's held-out loss), or auto"
        )


def _validate_mixing(mixing: MixingConfig, num_enabled: int) -> None:
    path = f"{ROOT_KEY}.mixing"
    if not 0.0 <= mixing.alpha <= 1.0:
        raise ConfigError(f"{path}.alpha: must be in [0, 1], got {mixing.alpha}")
    if mixing.warmup_steps < 0:
        raise ConfigError(f"{path}.warmup_steps: must be >= 0, got {mixing.warmup_steps}")
    if mixing.update_every < 1:
        raise ConfigError(f"{path}.update_every: must be >= 1, got {mixing.update_every}")
    if not 0.0 <= mixing.loss_smoothing < 1.0:
        raise ConfigError(f"{path}.loss_smoothing: must be in [0, 1), got {mixing.loss_smoothing}")
    if mixing.progress_window < 1:
        raise ConfigError(f"{path}.progress_window: must be >= 1, got {mixing.progress_window}")
    if mixing.warmup_fraction is not None:
        if not 0.0 <= mixing.warmup_fraction <= 1.0:
            raise ConfigError(
                f"{path}.warmup_fraction: must be in [0, 1], got {mixing.warmup_fraction}"
            )
        if mixing.total_steps is None or mixing.total_steps < 1:
            raise ConfigError(
                f"{path}.warmup_fraction: needs {path}.total_steps >= 1 (the run length), got "
                f"{mixing.total_steps}; or give warmup_steps instead"
            )
    if mixing.reward_cap is not None and not mixing.reward_cap > 0:
        raise ConfigError(f"{path}.reward_cap: must be > 0 (.inf: no cap), got {mixing.reward_cap}")
    _validate_reference(mixing, path)
    low, high = mixing.min_weight, mixing.max_weight
    if mixing.kind == "exp3" and mixing.update_rule == "proportional" and not (low or 0.0) > 0:
        raise ConfigError(
            f"{path}.min_weight: update_rule proportional needs min_weight > 0 (a domain that "
            f"gains nothing sits at that floor, which keeps it observed), got {low}"
        )
    for key, bound in (("min_weight", low), ("max_weight", high)):
        if bound is not None and not 0.0 <= bound <= 1.0:
            raise ConfigError(f"{path}.{key}: must be in [0, 1], got {bound}")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{path}: min_weight {low} > max_weight {high}")
    if low is not None and low * num_enabled > 1.0 + 1e-9:
        raise ConfigError(f"{path}.min_weight: {low} x {num_enabled} enabled sources exceeds 1")
    if high is not None and high * num_enabled < 1.0 - 1e-9:
        raise ConfigError(f"{path}.max_weight: {high} x {num_enabled} enabled sources is below 1")


# ----------------------------------------------------------------------------- paths, workers


def _data_root(data: DataConfig) -> Path:
    root = data.paths.root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(root).expanduser().absolute()


def _resolve_paths(data: DataConfig) -> None:
    """Make every source path absolute: ``~`` expanded, relative paths under the data root."""
    root = _data_root(data)
    data.paths.root = str(root)
    for section in (data.sources, data.eval_sources):
        for source in section.values():
            source.path = str(root / Path(source.path).expanduser())


def check_source_paths(data: DataConfig) -> None:
    """Raise ``ConfigError`` listing every enabled or eval source whose directory is missing or
    unfinished (no manifest), each with the ``wf-data prepare`` command that creates it."""
    from wf_data.data.shards.sources import MANIFEST_NAME  # lazy: keeps config import light

    problems = []
    sections = (
        (ROOT_KEY + ".sources", data.enabled_sources()),
        (ROOT_KEY + ".eval_sources", data.eval_sources),
    )
    for section, sources in sections:
        for name, source in sources.items():
            path = Path(source.path)
            if (path / MANIFEST_NAME).is_file():
                continue
            state = (
                "has no " + MANIFEST_NAME + " (unfinished prepare?)"
                if path.is_dir()
                else "does not exist"
            )
            problems.append(
                f"{section}.{name}: {path} {state}; create it with:\n    "
                f"{source.prepare_hint(data.tokenizer)}"
            )
    if problems:
        raise ConfigError("prepared source directories are missing:\n  " + "\n  ".join(problems))


def resolve_num_workers(data: DataConfig | None = None, arg: int | None = None) -> int:
    """Worker processes to use: ``$WF_DATA_NUM_WORKERS`` > ``arg`` > ``data.num_workers`` > 0."""
    env = os.environ.get(NUM_WORKERS_ENV)
    if env is not None and env.strip() != "":
        try:
            workers = int(env)
        except ValueError:
            workers = -1
        if workers < 0:
            raise ConfigError(f"environment {NUM_WORKERS_ENV}={env!r}: expected an integer >= 0")
        return workers
    if arg is not None:
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
            raise ConfigError(f"num_workers argument: expected an integer >= 0, got {arg!r}")
        return arg
    return data.num_workers if data is not None else 0
