"""ckptd: fault-tolerant training for TensorFlow/Keras.

The code lives in the repository's top-level folders (the design card's layout); this package
reaches them through relative symlinks, so `ckptd.daemon`, `ckptd.supervisor`, `ckptd.state` and
`ckptd.worker` import the same way from a plain checkout (mypy, pyright, IDEs, `python -m
ckptd`) as from an installed wheel, and no bare top-level name (`daemon` is PyPI's
python-daemon) is ever installed.

Training programs use the API from here: `import ckptd` then `ckptd.fit(...)`, `ckptd.session(...)`,
`ckptd.fit_args(...)`, `ckptd.params()`, `ckptd.strategy()` (ckptd.worker.api; `import
ckptd.worker.api as ckptd` still works). The names load on first use (PEP 562), so that the
daemon's `import ckptd.daemon...` never pays for the worker package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptd.worker.api import FitArgs, fit, fit_args, params, session, strategy

__all__ = ["FitArgs", "fit", "fit_args", "params", "session", "strategy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ckptd.worker import api

        return getattr(api, name)
    raise AttributeError(f"module 'ckptd' has no attribute {name!r}")
