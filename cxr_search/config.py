"""Model configuration as data: frozen dataclasses read from a registry of JSON presets.

A preset (``cxr_search/model_configs/<name>.json``) fully describes an architecture and the
preprocessing that travels with its weights. :func:`get_model_config` returns the preset with
overrides applied; overrides change the configuration, they never add flags.

Example:
    >>> cfg = get_model_config("tiny", image={"image_size": 64})
    >>> cfg.image.image_size
    64
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from cxr_search.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

T = TypeVar("T")


@dataclass(frozen=True)
class ImageTowerConfig:
    """Image tower.

    Attributes:
        backend: ``"timm"`` (any timm model name) or ``"hf_swin"`` (transformers ``SwinModel``,
            the layout of the released Swin-Tiny checkpoints).
        name: timm model name (``backend == "timm"``).
        pooling: ``"avg"`` (timm global pool), ``"first_token"`` (``last_hidden_state[:, 0]``, the
            released Swin feature) or ``"mean"`` (mean over patch tokens).
        model_kwargs: Extra keyword arguments for ``timm.create_model`` or ``SwinConfig``.
        pretrained_path: Optional local timm checkpoint file loaded into the trunk at creation.
    """

    backend: str = "timm"
    name: str = "resnet50"
    pooling: str = "avg"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained_path: Optional[str] = None


@dataclass(frozen=True)
class TextTowerConfig:
    """Text tower (a BERT encoder from transformers).

    Attributes:
        bert_config: Keyword arguments for ``transformers.BertConfig``.
        pooling: ``"eos"`` (last attended token, the released models), ``"cls"`` or ``"mean"``.
        add_pooling_layer: Keep BERT's pooler (unused, but present in the released state dicts).
        pretrained_dir: Optional local Hugging Face directory with pretrained BERT weights.
    """

    bert_config: Dict[str, Any] = field(default_factory=dict)
    pooling: str = "eos"
    add_pooling_layer: bool = True
    pretrained_dir: Optional[str] = None


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing that travels with the weights (released models: ``docs/compatibility.md`` section 3).

    Attributes:
        resize: Shorter-side resize (PIL, ``interpolation``) before the centre crop.
        crop_size: Side of the square centre crop fed to the image tower.
        interpolation: PIL filter name for ``resize``.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        dicom_shorter_side: DICOM pixels are resized so that their shorter side has this length
            (antialiased) before the transform, as the released models' training images were.
    """

    resize: int = 224
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    dicom_shorter_side: int = 512


@dataclass(frozen=True)
class TokenizerConfig:
    """Tokenisation settings.

    Attributes:
        kind: ``"external"`` (the user supplies a directory, e.g. Bio_ClinicalBERT),
            ``"basic"`` (a built-in character-level WordPiece vocabulary, for tests) or
            ``"bundled"`` (the vocabulary saved beside the weights).
        lowercase: Lowercase and strip accents before WordPiece (BERT's ``do_lower_case``).
        max_length: Truncation length in tokens, ``[CLS]`` and ``[SEP]`` included.
    """

    kind: str = "external"
    lowercase: bool = True
    max_length: int = 256


@dataclass(frozen=True)
class ModelConfig:
    """A whole dual encoder.

    Attributes:
        name: Preset name.
        embed_dim: Size of the shared, L2-normalised embedding.
        image: Image tower.
        text: Text tower.
        preprocess: Image preprocessing.
        tokenizer: Tokenisation.
        logit_scale_init: Initial value of the learnable log temperature.
        init_seed: When set, towers are initialised from this seed (reproducible random models).
    """

    name: str = "custom"
    embed_dim: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    logit_scale_init: float = math.log(1 / 0.07)
    init_seed: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable dictionary (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dictionary such as the one :meth:`to_dict` returns.

        Raises:
            ConfigError: On an unknown key or a malformed value.
        """
        return _build(cls, data, "")


def _build(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    return build_dataclass(cls, data, where, _NESTED)


def build_dataclass(
    cls: Type[T], data: Mapping[str, Any], where: str = "", nested: Optional[Mapping[Tuple[type, str], type]] = None
) -> T:
    """Build a (frozen) config dataclass from a mapping, refusing unknown keys by name.

    Args:
        cls: The dataclass.
        data: Field values; lists become tuples.
        where: Dotted path of ``data`` in the whole config, for error messages.
        nested: ``(dataclass, field) -> dataclass`` of sub-sections built recursively.

    Raises:
        ConfigError: An unknown key, a non-mapping section, or a value the dataclass refuses.
    """
    nested = nested or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys: {', '.join(prefix + k for k in sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for name, value in data.items():
        sub = nested.get((cls, name))
        key = f"{where}.{name}" if where else name
        if sub is not None:
            kwargs[name] = build_dataclass(sub, value, key, nested)
            continue
        if isinstance(value, list):
            value = tuple(value)
        if not _matches(value, hints.get(name, Any)):
            raise ConfigError(f"config key '{key}': expected {_describe(hints[name])}, got {_shown(value)}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"config section '{where or cls.__name__}': {exc}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the field annotation ``hint`` (ints count as floats; bools are not ints)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=False)))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # an annotation this check does not know: the dataclass's own validation decides


def _shown(value: Any) -> str:
    """A value as the user wrote it (JSON: true, null, [0.9]), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _describe(hint: Any) -> str:
    """An annotation in words: ``Optional[float]`` -> ``a number or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(arg) for arg in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis and args[0] in names:
            return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s"  # "an integer" -> "a list of integers"
        return f"a list of {len(args)} values" if args and args[-1] is not Ellipsis else "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    return str(hint)


_NESTED: Dict[Tuple[type, str], type] = {
    (ModelConfig, "image"): ImageTowerConfig,
    (ModelConfig, "text"): TextTowerConfig,
    (ModelConfig, "preprocess"): PreprocessConfig,
    (ModelConfig, "tokenizer"): TokenizerConfig,
}


def _merge(base: Dict[str, Any], overrides: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    return merge_overrides(base, overrides, where, _FREE_DICTS)


def merge_overrides(
    base: Dict[str, Any], overrides: Mapping[str, Any], where: str = "", free: Iterable[str] = ()
) -> Dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``, refusing keys that ``base`` lacks.

    Args:
        base: The resolved config as a dict.
        overrides: Nested overrides (a mapping value merges into a sub-section).
        where: Dotted path of ``base``, for error messages.
        free: Names of free-form dict fields (third-party kwargs) that accept any key.

    Raises:
        ConfigError: An unknown key, named with its dotted path and the valid keys.
    """
    free = frozenset(free)
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and isinstance(value, Mapping) and key not in free:
            out[key] = merge_overrides(out[key], value, path, free)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = _merge_free(out[key], value)  # free-form dicts: merge without key checks
        else:
            out[key] = value
    return out


def _merge_free(base: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Deep-merge into a free-form dict: nested mappings merge (a recipe's ``model_overrides.text``
    keeps its ``bert_config`` when an override sets ``text.pooling``), other values replace."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = _merge_free(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Dicts that pass through to third-party constructors: any key is allowed.
_FREE_DICTS = {"model_kwargs", "bert_config"}


def list_json_registry(package: str, folder: str) -> List[str]:
    """Names (file stems) of the JSON configs shipped in ``package``'s ``folder``, sorted."""
    root = resources.files(package).joinpath(folder)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_json_registry(package: str, folder: str, name: str, what: str) -> Dict[str, Any]:
    """The JSON config ``name`` of a registry, with ``name`` filled in when the file has none.

    Args:
        package: Package holding the registry (``cxr_search``, ``train``).
        folder: The registry's folder inside the package.
        name: Config name (file stem).
        what: What an entry is, for the error (``model preset``, ``recipe``).

    Raises:
        ConfigError: No such entry; the message lists the valid names.
    """
    path = resources.files(package).joinpath(folder, f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown {what} '{name}'; available: {', '.join(list_json_registry(package, folder))}")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("name", name)
    return data


def list_models() -> List[str]:
    """Names of the registered presets."""
    return list_json_registry("cxr_search", "model_configs")


def get_model_config(name_or_config: Union[str, ModelConfig, Mapping[str, Any]], **overrides: Any) -> ModelConfig:
    """Resolve a preset name (or a config / dict) and apply overrides.

    Args:
        name_or_config: A registered preset name, a :class:`ModelConfig`, or a config dict.
        **overrides: Top-level config fields; a mapping value is merged into the sub-config
            (``image={"image_size": 64}``), a plain value replaces the field.

    Returns:
        The resolved, frozen configuration.

    Raises:
        ConfigError: Unknown preset or key.
    """
    if isinstance(name_or_config, str):
        preset = load_json_registry("cxr_search", "model_configs", name_or_config, "model preset")
        base = ModelConfig.from_dict(preset).to_dict()
    elif isinstance(name_or_config, ModelConfig):
        base = name_or_config.to_dict()
    else:
        base = ModelConfig.from_dict(name_or_config).to_dict()
    return ModelConfig.from_dict(_merge(base, overrides))


def parse_set_pairs(items: List[str]) -> Dict[str, Any]:
    """Turn CLI ``--set a.b=value`` strings into a flat ``{"a.b": value}`` mapping (later items win).

    Values are parsed as JSON when possible (numbers, booleans, lists), else kept as strings.

    Raises:
        ConfigError: An item without ``=``.
    """
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def nest_overrides(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: dotted keys to the nested override mapping configs take."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def parse_set_options(items: List[str]) -> Dict[str, Any]:
    """Turn CLI ``--set a.b=value`` strings into a nested override mapping (see :func:`parse_set_pairs`).

    Raises:
        ConfigError: An item without ``=``.
    """
    return nest_overrides(parse_set_pairs(items))


def load_config_file(path: Union[str, Path]) -> ModelConfig:
    """Read a model config JSON file (the ``model`` section of a saved checkpoint's config)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc}") from exc
    return ModelConfig.from_dict(data.get("model", data))
