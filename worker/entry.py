"""Load the job's `build(params)` entrypoint and normalise what it returns.

`build(params)` returns a compiled Keras model and the *unbatched* training examples, optionally
validation data: `(model, train)`, `(model, train, validation)` or a dict with those keys, where each
data item is `(x, y)` arrays or an unbatched `tf.data.Dataset` of `(x, y)` elements. Any failure
here is a configuration error: retrying would fail the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.state.jobspec import ENTRY_RE
from ckptd.worker.api import FitArgs
from ckptd.worker.errors import ConfigError


@dataclass
class Built:
    model: Any
    train: Any
    validation: Any | None
    fit: FitArgs | None = None  # build() returned ckptd.fit_args(...): fit's data contract


def load_callable(entry: str) -> Any:
    m = ENTRY_RE.match(entry)
    if not m:
        raise ConfigError(f"model: {entry!r} is not FILE.py:function or package.module:function")
    target, func = m.group("target"), m.group("func")
    if "/" in target and os.path.isdir(target):  # os.path: False, not an error, if unreachable
        raise ConfigError(
            f"model: {target} is a directory; name the Python file in it and its "
            f"function ({target.rstrip('/')}/model.py:build, say)"
        )
    try:
        if target.endswith(".py"):
            path = Path(target)
            # Let the model file import helpers that sit beside it.
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(f"ckptd_job_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"model: cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"model: file not found: {e.filename}") from e
    except Exception as e:
        raise ConfigError(f"model: importing {target} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"model: {target} has no function {func!r}")
    return fn


def _unpack(result: Any) -> Built:
    if isinstance(result, FitArgs):
        return Built(result.model, None, None, result)
    if isinstance(result, dict):
        unknown = set(result) - {"model", "train", "validation"}
        if unknown or "model" not in result or "train" not in result:
            raise ConfigError("build() dict must have keys model, train and optionally validation")
        return Built(result["model"], result["train"], result.get("validation"))
    if isinstance(result, tuple) and len(result) in (2, 3):
        return Built(result[0], result[1], result[2] if len(result) == 3 else None)
    raise ConfigError(
        "build(params) must return ckptd.worker.api.fit_args(model, x, y, ...), "
        "(model, train), (model, train, validation) or a dict; got "
        f"{type(result).__name__}"
    )


def build(entry: str, params: dict[str, Any]) -> Built:

    fn = load_callable(entry)
    try:
        result = fn(dict(params))
    except Exception as e:
        raise ConfigError(f"build(params) raised {type(e).__name__}: {e}") from e
    built = _unpack(result)
    check_model(built.model, "build()")
    return built


def check_model(model: Any, where: str) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise ConfigError(f"{where}: got {type(model).__name__} as the model; expected a keras.Model")
    if not model.compiled:
        raise ConfigError(
            f"{where}: the model is not compiled; call model.compile(...) first, as model.fit requires"
        )
    from ckptd.worker.distribute import check_strategy  # imports TensorFlow: entry stays free of it

    if problem := check_strategy(model, where):
        raise ConfigError(problem)
