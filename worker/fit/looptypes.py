"""What the worker's entry (ckptd.worker.__main__), the script runner (ckptd.worker.script) and
`ckptd export` (ckptd.worker.export) need of a training loop: ckptd's fit loop
(ckptd.worker.fit.loop.Loop) or a custom loop's session (ckptd.worker.fit.session.Session).

Free of TensorFlow at run time (the types it names are imported for the type checker only), so
the worker's entry can name it before its TensorFlow import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ckptd.state.jobspec import JobSpec
    from ckptd.state.paths import RunDir
    from ckptd.state.protocol import Event
    from ckptd.worker.checkpoint.checkpointing import Checkpointing
    from ckptd.worker.fit.prep import Counters
    from ckptd.worker.runtime import Beater


class TrainingLoop(Protocol):
    @property
    def spec(self) -> JobSpec: ...
    @property
    def run(self) -> RunDir: ...
    @property
    def beater(self) -> Beater: ...
    @property
    def ck(self) -> Checkpointing: ...
    @property
    def c(self) -> Counters: ...
    @property
    def model(self) -> Any: ...  # the keras.Model `ckptd export` writes (a session may have none)

    def event(self, kind: Event, **data: Any) -> None: ...
    def restore(self) -> int | None:
        """Lock held: restore the newest verified state of either tier; its step (None: a
        fresh start)."""

    def finish(self) -> None:
        """The final commit."""

    def close(self) -> None:
        """Stop the async writer; the attempt is over."""
