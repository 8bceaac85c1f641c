"""The non-tensor part of the training state, carried inside the tf.train.Checkpoint.

History, best-model and early-stopping trackers are serialised to JSON into one tf.string variable
(the metric accumulators are checkpointed as the variables they are), so they are committed and
restored atomically with the weights: a resumed run neither repeats nor skips an epoch's metrics,
and patience carries over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ckptd.worker.fit.tracking import BestTracker, EarlyStopper


@dataclass
class HostState:
    history: list[dict[str, float]] = field(default_factory=list)
    best: BestTracker | None = None
    early: EarlyStopper | None = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    replicas: int = 1  # how many replicas trained it (a resume on fewer is not bit-identical)

    def dumps(self) -> str:
        return json.dumps(
            {
                "history": self.history,
                "best": self.best.to_dict() if self.best else None,
                "early": self.early.to_dict() if self.early else None,
                "stopped_early": self.stopped_early,
                "train_seconds": self.train_seconds,
                "replicas": self.replicas,
            },
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str, best: BestTracker | None, early: EarlyStopper | None) -> HostState:
        """Restore saved state into trackers built from the *current* spec (their config wins)."""
        d = json.loads(text)
        if best is not None and d.get("best"):
            best.best, best.best_epoch = d["best"]["best"], d["best"]["best_epoch"]
        if early is not None and d.get("early"):
            e = d["early"]
            early.best, early.best_epoch = e["best"], e["best_epoch"]
            early.wait, early.stopped_epoch = e["wait"], e["stopped_epoch"]
        return cls(
            history=d["history"],
            best=best,
            early=early,
            stopped_early=d.get("stopped_early", False),
            train_seconds=d.get("train_seconds", 0.0),
            replicas=d.get("replicas", 1),
        )
