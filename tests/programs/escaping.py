"""Starts a child that leaves the worker's session (setsid) and double-forks, both ignoring
SIGTERM, their pids in escapees.txt beside the job's run directory; then trains a little. The
attempt's end must end them too, whether the worker was started cold or forked by the job's
fork server."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

import ckptd

ESCAPE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    open(sys.argv[1], "a").write(f"{os.getpid()}\\n")
    time.sleep(3600)
    os._exit(0)
open(sys.argv[1], "a").write(f"{os.getpid()}\\n")
time.sleep(3600)
"""
subprocess.Popen(
    [sys.executable, "-c", ESCAPE, str(Path.cwd() / "escapees.txt")],
    start_new_session=True,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
inputs = keras.Input((4,))
model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
model.compile(optimizer="sgd", loss="mse")
ckptd.fit(model, x, y, epochs=2, batch_size=16)
