"""Hugging Face round trip: ``save_pretrained`` a converted model, load it back converted.

``convert`` records the converted layers in the copy's config (``config.ndcompile``,
written to ``config.json`` by ``save_pretrained``). Plain ``from_pretrained`` would
rebuild the dense architecture and re-initialise the missing dense weights;
:func:`from_pretrained` instead builds the architecture from the config, installs
the recorded NdLinear/adapter layers (:func:`~ndcompile.backends.rebuild.rebuild_layers`)
and then loads the saved weights, checking that every tensor found its place::

    converted = ndcompile.convert(model, {"input_ids": ids}, mode="factorize", rank=4)
    converted.save_pretrained("out/")
    restored = ndcompile.from_pretrained(type(model), "out/")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ndcompile.backends.rebuild import layer_specs, rebuild_layers
from ndcompile.errors import NdCompileError

__all__ = ["CONFIG_KEY", "from_pretrained", "record_in_config"]

#: Attribute of a transformers config holding the converted layers.
CONFIG_KEY = "ndcompile"


def record_in_config(model: nn.Module, mode: str) -> None:
    """Store ``model``'s converted layers in its transformers config, if it has one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    setattr(config, CONFIG_KEY, {"mode": mode, "layers": layer_specs(model)})


def _weights(path: Path) -> dict[str, Tensor]:
    import safetensors.torch as st

    single = path / "model.safetensors"
    if single.is_file():
        return st.load_file(os.fspath(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for name in files:
            out.update(st.load_file(os.fspath(path / name)))
        return out
    raise NdCompileError(
        f"no model.safetensors (or index) in {os.fspath(path)!r}",
        hint="save with converted.save_pretrained(path) (safetensors is its default)",
    )


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the other names of the same tensor."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {n: g - {n} for g in groups.values() for n in g}


def from_pretrained(
    cls: type[nn.Module], path: str | os.PathLike, **config_kwargs: Any
) -> nn.Module:
    """Load a converted model written by ``save_pretrained``.

    Args:
        cls: The transformers model class (``GPT2LMHeadModel``, ``BertModel``, ...).
        path: The folder ``save_pretrained`` wrote.
        **config_kwargs: Passed to ``cls.config_class.from_pretrained``.

    Returns:
        An instance of ``cls`` with the recorded layers and the saved weights.

    Raises:
        NdCompileError: If the config records no conversion, or the weights do not
            fill the rebuilt model exactly (tied weights may be omitted, as
            transformers does).
    """
    folder = Path(path)
    config = cls.config_class.from_pretrained(os.fspath(folder), **config_kwargs)  # type: ignore[attr-defined]
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or "layers" not in record:
        raise NdCompileError(
            f"{os.fspath(folder)!r} holds no ndcompile conversion (config has no "
            f"{CONFIG_KEY!r} entry)",
            hint=f"load it with {cls.__name__}.from_pretrained",
        )
    model = cls(config)
    rebuild_layers(model, record["layers"])
    if record.get("mode") == "adapter":
        from ndcompile.compress.adapters import freeze_all_but_adapters

        freeze_all_but_adapters(model)
    tensors = _weights(folder)
    result = model.load_state_dict(tensors, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if not tied.get(k, set()) & set(tensors)]
    if missing or result.unexpected_keys:
        raise NdCompileError(
            f"the saved weights do not fit the rebuilt {cls.__name__}: missing {missing}, "
            f"unexpected {list(result.unexpected_keys)}",
            hint="save and load with the same transformers version and model class",
        )
    model.eval()
    return model
