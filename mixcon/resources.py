"""The configs and recipes shipped inside the package, and reading config files with one clear error.

A model config is given by name (``tiny``, ``mixcon-1b``: a file of ``mixcon/configs/``) or by path
(any ``.json`` file); a training recipe by name (``tiny``: ``mixcon/recipes/tiny.yaml``) or path.
Every problem with the file — missing, a directory, not UTF-8, YAML where JSON is wanted, not an
object, an unknown field, a wrong type — is a ``UsageError`` naming the file, what is wrong and
what is allowed; the command line prints it as one line and exits with status 2.
"""

from __future__ import annotations

import json
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")
RECIPES_DIR = os.path.join(PACKAGE_DIR, "recipes")
DEFAULT_RECIPE = "tiny"


class UsageError(ValueError):
    """A bad argument, file or path given by the user: the CLI prints the message alone and exits 2."""


def _names(folder: str, ext: str) -> list[str]:
    return sorted(f[: -len(ext)] for f in os.listdir(folder) if f.endswith(ext))


def config_names() -> list[str]:
    """Names of the shipped model configs (``mixcon layout NAME``)."""
    return _names(CONFIGS_DIR, ".json")


def recipe_names() -> list[str]:
    """Names of the shipped training recipes (``mixcon train --recipe NAME``)."""
    return _names(RECIPES_DIR, ".yaml")


def _resolve(name_or_path: str, folder: str, ext: str, what: str, names: list[str]) -> str:
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UsageError(f"{what} must be a name ({', '.join(names)}) or a path, got {name_or_path!r}")
    if os.path.isdir(name_or_path):
        raise UsageError(f"{what} {name_or_path!r} is a directory; give a {ext} file or a shipped name "
                         f"({', '.join(names)})")
    if os.path.exists(name_or_path):
        return name_or_path
    base = name_or_path[: -len(ext)] if name_or_path.endswith(ext) else name_or_path
    if os.sep not in base and base in names:
        return os.path.join(folder, base + ext)
    raise UsageError(f"{what} {name_or_path!r} is neither a file nor a shipped name; shipped: {', '.join(names)}")


def config_path(name_or_path: str) -> str:
    """The file of a shipped config name (``tiny``, ``tiny.json``, ``configs/tiny.json``) or of a path."""
    if not os.path.exists(str(name_or_path)) and str(name_or_path).startswith("configs" + os.sep):
        name_or_path = os.path.basename(name_or_path)  # the repository's old spelling
    return _resolve(name_or_path, CONFIGS_DIR, ".json", "model config", config_names())


def recipe_path(name_or_path: str) -> str:
    """The file of a shipped recipe name (``tiny``) or of a path."""
    return _resolve(name_or_path, RECIPES_DIR, ".yaml", "recipe", recipe_names())


def read_text(path: str, what: str) -> str:
    """A file's text, refusing a directory, a missing file and bytes that are not UTF-8."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"{what} {path!r} cannot be read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path!r} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                         f"a {what} is a UTF-8 text file") from None


def read_config_dict(name_or_path: str) -> dict:
    """The fields of a MixCon config file (JSON object), ``model_type`` checked and removed."""
    path = config_path(name_or_path)
    text = read_text(path, "model config")
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (it looks like YAML: a model config is JSON)" if path.endswith((".yaml", ".yml")) or ":" in text.split(
            "\n", 1)[0] and not text.lstrip().startswith("{") else ""
        raise UsageError(f"model config {path!r} is not valid JSON{hint}: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}; a model config is a JSON object {{\"field\": value, ...}}") from None
    if not isinstance(kw, dict):
        raise UsageError(f"model config {path!r} holds a JSON {type(kw).__name__}; a model config is a JSON object "
                         f"{{\"field\": value, ...}}")
    model_type = kw.pop("model_type", "mixcon")
    if model_type != "mixcon":
        raise UsageError(f"model config {path!r} has model_type={model_type!r}; only 'mixcon' configs are read here "
                         f"(a Jamba checkpoint converts with `mixcon convert jamba SRC DST`)")
    return kw


def load_config(name_or_path: str, **overrides):
    """A ``MixConConfig`` from a shipped name or a JSON file, with ``overrides``; an invalid field is a
    ``UsageError`` naming the file and the field."""
    from mixcon.models.configuration_mixcon import MixConConfig

    kw = read_config_dict(name_or_path)
    kw.update(overrides)
    try:
        return MixConConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model config {config_path(name_or_path)!r}: {exc}") from None
