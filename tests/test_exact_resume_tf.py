"""Exact resume beyond the Pima example: programs that use Keras's random layers, fit's whole
data contract, callbacks and custom loops. Each runs once uninterrupted and once with its
worker SIGKILLed mid-run; the final checkpoints must agree tensor for tensor."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, ckptd_cmd
from .procs import (
    events,
    final_state_hash,
    finish,
    heartbeat_when,
    run_dir,
    start_run,
    status,
)

pytestmark = pytest.mark.tf
PROGRAMS = ROOT / "tests" / "programs"

# program, job-file lines, step after which attempt 1 kills itself (between two commits: saves are
# asynchronous, so the kill waits for the first commit to land, as it may not on a loaded box)
CASES = {
    "random_layers": ("entrypoint: {dir}/random_layers.py\ncheckpoint: {{every_steps: 15}}\n", 37),
    "vae_dataset": ("entrypoint: {dir}/vae_dataset.py\ncheckpoint: {{every_steps: 10}}\n", 33),
    "multi_io": ("model: {dir}/multi_io.py:build\ncheckpoint: {{every_steps: 10}}\n", 27),
    "augment_in_map": ("entrypoint: {dir}/augment_in_map.py\ncheckpoint: {{every_steps: 10}}\n", 29),
    "gan": ("entrypoint: {dir}/gan.py\ncheckpoint: {{every_steps: 8}}\n", 21),
    "custom_loop": ("entrypoint: {dir}/custom_loop.py\ncheckpoint: {{every_steps: 15}}\n", 50),
    # Two replicas on two logical CPU devices: the script builds in ckptd.strategy().scope();
    # the model: job is built in the scope by ckptd, and saves asynchronously.
    "mirrored": (
        "entrypoint: {dir}/mirrored.py\ndistribute: {{strategy: mirrored, replicas: 2}}\n"
        "checkpoint: {{every_steps: 10}}\n",
        27,
    ),
    "mirrored_build_async": (
        "model: {dir}/mirrored.py:build\ndistribute: {{strategy: mirrored, replicas: 2}}\n"
        "checkpoint: {{every_steps: 10, mode: async}}\n",
        23,
    ),
}


def _job(tmp: Path, name: str) -> Path:
    body, _ = CASES[name]
    job = tmp / f"{name}.yaml"
    job.write_text(
        f"name: {name.replace('_', '-')}\n"
        + body.format(dir=PROGRAMS)
        + "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, "
        "backoff_max_seconds: 0.5}\n"
    )
    return job


def _run(home: Path, job: Path, faults: str = "") -> Path:
    rc, out = finish(start_run(home, str(job), faults=faults))
    assert rc == 0, out
    return run_dir(home)


_clean: dict[str, Path] = {}


def _clean_run(tmp: Path, name: str) -> Path:
    """The uninterrupted run of a program, once per session."""
    if name not in _clean:
        _clean[name] = _run(tmp / "clean", _job(tmp, name))
    return _clean[name]


# Slow cases run with the conformance corpus (CI runs both); the default run keeps one program
# per mechanism: seed generators and callbacks, state inside a tf.data map, a custom loop. The
# mirrored programs are there too: the kill-point sweep's mirrored route and the gang tests
# cover that mechanism in the default run.
LONG = {"vae_dataset", "multi_io", "gan", "mirrored", "mirrored_build_async"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.conformance) if n in LONG else n for n in sorted(CASES)]
)
def test_sigkill_mid_run_resumes_bit_identical(tmp_path: Path, name: str) -> None:
    job = _job(tmp_path, name)
    clean = _clean_run(tmp_path, name)
    killed = _run(
        tmp_path / "killed", job, faults=f"sigkill_at_step={CASES[name][1]},commit_first=1,attempt=1"
    )
    attempts = status(tmp_path / "killed", killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"]
    assert attempts[1]["restored_step"] and attempts[1]["restored_step"] > 0
    want, got = final_state_hash(clean), final_state_hash(killed)
    assert got == want, sorted(k for k in want if got.get(k) != want[k])
    assert (killed / "history.csv").read_text() == (clean / "history.csv").read_text()
    if name == "random_layers":  # CSVLogger: one row per epoch across the restart
        with open(killed / "log.csv") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]
    if name.startswith("mirrored"):  # each replica got half of each global batch of 16
        (dist,) = [e for e in events(killed) if e["event"] == "training.distributed" and e["attempt"] == 2]
        assert (dist["replicas"], dist["global_batch"], dist["replica_rows"]) == (2, 16, [8, 8])
        assert [d.rsplit(":", 2)[-2:] for d in dist["devices"]] == [["CPU", "0"], ["CPU", "1"]]
    if name in ("random_layers", "custom_loop", "mirrored"):  # export reaches a script job's model
        out = tmp_path / "latest.h5"
        before = sorted((p.name, p.stat().st_mtime_ns) for p in killed.iterdir())
        r = subprocess.run(
            [sys.executable, "-m", "ckptd.worker.export", str(killed), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "step" in r.stdout and out.stat().st_size > 0
        # Read-only: no heartbeat, history or event written into the run (a worker may own it).
        assert sorted((p.name, p.stat().st_mtime_ns) for p in killed.iterdir()) == before


@pytest.mark.conformance
def test_entrypoint_job_hot_spare_takes_over_bit_identical(tmp_path: Path) -> None:
    """A script job's spare runs the script up to its fit call, waits there primed, and takes
    over after the SIGKILL like a model: job's spare."""
    clean = _clean_run(tmp_path, "gan")
    (tmp_path / "spare").mkdir()
    job = _job(tmp_path / "spare", "gan")
    job.write_text(job.read_text().replace("restart: {", "restart: {hot_spare: true, "))
    run = _run(tmp_path / "spare", job, faults=f"step_delay=0.01,sigkill_at_step={CASES['gan'][1]},attempt=1")
    a1, a2 = status(tmp_path / "spare", run.name)["attempt_list"]
    assert a1["class"] == "killed" and a2["class"] == "succeeded"
    assert [e for e in events(run) if e["event"] == "worker.spare_assigned"]
    assert final_state_hash(run) == final_state_hash(clean)


SETUP_FAILURES = {
    "generator": (
        "import keras\nimport ckptd.worker.api as ckptd\n"
        "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "m.compile(optimizer='sgd', loss='mse')\n"
        "ckptd.fit(m, ((i, i) for i in range(9)))\n",
        "Python generator",
    ),
    "shape": (
        "import keras, numpy as np\nimport ckptd.worker.api as ckptd\n"
        "m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])\n"
        "m.compile(optimizer='sgd', loss='mse')\n"
        "ckptd.fit(m, np.zeros((16, 4)), np.zeros(16))\n",
        "building the model's variables on the first batch",
    ),
    "uncompiled": (
        "import keras, numpy as np\nimport ckptd.worker.api as ckptd\n"
        "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "ckptd.fit(m, np.zeros((4, 2)), np.zeros(4))\n",
        "not compiled",
    ),
    "no_fit": ("print('forgot to train')\n", "without calling ckptd.fit"),
    "import": ("import not_a_module_anywhere\n", "failed before training started"),
    # Traces fine (priming runs nothing), fails deterministically when the first step runs.
    "first_step": (
        "import keras, numpy as np, tensorflow as tf\nimport ckptd.worker.api as ckptd\n"
        "class Strict(keras.Model):\n"
        "    def train_step(self, data):\n"
        "        x, y = data\n"
        "        tf.debugging.assert_equal(tf.shape(x)[0], 999, message='not 999')\n"
        "        return {'loss': tf.constant(0.0)}\n"
        "inputs = keras.Input((2,))\n"
        "m = Strict(inputs, keras.layers.Dense(1)(inputs))\n"
        "m.compile(optimizer='sgd', loss='mse')\n"
        "ckptd.fit(m, np.zeros((8, 2)), np.zeros((8, 1)))\n",
        "before the first training step: InvalidArgumentError",
    ),
}


@pytest.mark.parametrize("name", sorted(SETUP_FAILURES))
def test_setup_failures_are_config_errors_not_retried(tmp_path: Path, name: str) -> None:
    source, fragment = SETUP_FAILURES[name]
    (tmp_path / "train.py").write_text(source)
    job = tmp_path / "job.yaml"
    job.write_text("name: broken\nentrypoint: train.py\n")
    rc, out = finish(start_run(tmp_path / "home", str(job)))
    assert rc == 1, out
    st = status(tmp_path / "home", run_dir(tmp_path / "home").name)
    assert st["state"] == "failed" and st["attempts"] == 1
    (a,) = st["attempt_list"]
    assert a["class"] == "config_error" and fragment in a["error"], a["error"]


def test_validate_build_names_what_would_make_a_resume_differ(tmp_path: Path) -> None:
    """`ckptd validate --build` sets a script job up in a worker and names each cause; a job
    whose set-up fails is bad input (exit 2) with the reason."""
    (tmp_path / "noisy.py").write_text(
        "import keras, numpy as np, tensorflow as tf\nimport ckptd.worker.api as ckptd\n"
        "class Noisy(keras.Model):\n"
        "    def train_step(self, data):\n"
        "        x, y = data\n"
        "        with tf.GradientTape() as tape:\n"
        "            loss = tf.reduce_mean(tf.square(self(x + tf.random.normal(tf.shape(x))) - y))\n"
        "        grads = tape.gradient(loss, self.trainable_weights)\n"
        "        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))\n"
        "        return {'loss': loss}\n"
        "inputs = keras.Input((2,))\n"
        "m = Noisy(inputs, keras.layers.Dense(1)(inputs))\n"
        "m.compile(optimizer='sgd')\n"
        "ckptd.fit(m, np.zeros((8, 2)), np.zeros((8, 1)))\n"
    )
    noisy = tmp_path / "noisy.yaml"
    noisy.write_text("name: noisy\nentrypoint: noisy.py\ntrain: {deterministic: false}\n")
    (tmp_path / "broken.py").write_text(SETUP_FAILURES["uncompiled"][0])
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nentrypoint: broken.py\n")
    r = subprocess.run(
        ckptd_cmd("validate", "--build", str(noisy), str(broken)), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 2, r.stdout + r.stderr
    warnings = [line for line in r.stderr.splitlines() if "noisy.yaml: warning" in line]
    assert any("RandomStandardNormal" in w for w in warnings), r.stderr
    assert any("train.deterministic is false" in w for w in warnings), r.stderr
    assert "broken.yaml: set-up failed" in r.stderr and "not compiled" in r.stderr


def test_custom_loop_saves_on_ctrl_c_and_resumes_with_zero_lost_steps(tmp_path: Path) -> None:
    """SIGINT to `ckptd run` reaches the custom loop's next sess.step_done: it commits, the
    program ends (preempted), and the same job file continues from that very step."""
    import signal

    job = _job(tmp_path, "custom_loop")
    job.write_text(job.read_text().replace("every_steps: 15", "every_steps: 1000"))
    home = tmp_path / "home"
    proc = start_run(home, str(job), faults="step_delay=0.05")
    run = run_dir(home)
    heartbeat_when(run, lambda h: h.step >= 30)
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc)
    assert rc == 130, out
    st = status(home, run.name)
    assert st["state"] == "interrupted" and st["attempt_list"][-1]["class"] == "preempted"
    (preempted,) = [e for e in events(run) if e["event"] == "worker.preempted"]
    assert st["last_committed_step"] == preempted["step"] >= 30
    rc, out = finish(start_run(home, str(job)))
    assert rc == 0, out
    st = status(home, run.name)
    assert st["state"] == "succeeded"
    assert st["attempt_list"][-1]["restored_step"] == preempted["step"]
    assert final_state_hash(run) == final_state_hash(_clean_run(tmp_path, "custom_loop"))


def _epoch_end_job(tmp: Path, extra: str = "") -> Path:
    """The custom loop with a commit due on every epoch's last step (20 steps an epoch)."""
    job = _job(tmp, "custom_loop")
    job.write_text(job.read_text().replace("every_steps: 15", "every_steps: 20") + extra)
    return job


def test_custom_loop_commit_on_an_epochs_last_step_resumes_bit_identical(tmp_path: Path) -> None:
    """Issue 26: the commit at step 20 is taken in step_done, before epoch_done; the resumed
    program runs no batch of epoch 0 and must still end its epoch (and the run) exactly."""
    clean = _clean_run(tmp_path, "custom_loop")
    killed = _run(
        tmp_path / "killed", _epoch_end_job(tmp_path), faults="sigkill_at_step=25,commit_first=1,attempt=1"
    )
    attempts = status(tmp_path / "killed", killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"]
    assert attempts[1]["restored_step"] == 20
    assert final_state_hash(killed) == final_state_hash(clean)
    assert (killed / "history.csv").read_text() == (clean / "history.csv").read_text()


def test_custom_loop_sigterm_on_an_epochs_last_step_resumes_bit_identical(tmp_path: Path) -> None:
    """A preemption landing on epoch 0's last step commits there and resumes into epoch_done."""
    clean = _clean_run(tmp_path, "custom_loop")
    extra = f"params: {{sigterm_at_step: 20, marker: {tmp_path / 'sigterm-sent'}}}\n"
    run = _run(tmp_path / "term", _epoch_end_job(tmp_path, extra))
    attempts = status(tmp_path / "term", run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["preempted", "succeeded"]
    assert attempts[1]["restored_step"] == 20
    assert final_state_hash(run) == final_state_hash(clean)
    assert (run / "history.csv").read_text() == (clean / "history.csv").read_text()


def test_custom_loop_sigterm_in_the_epoch_end_code_keeps_it_whole(tmp_path: Path) -> None:
    """A SIGTERM during the epoch-end code: stopping inside epoch_done committed the metric
    before the program's reset_state(), which the resume then skipped (epoch 1's accuracy
    counted epoch 0's batches too). The next step_done stops instead."""
    clean = _clean_run(tmp_path, "custom_loop")
    extra = f"params: {{sigterm_at_epoch_end: 0, marker: {tmp_path / 'sigterm-sent'}}}\n"
    run = _run(tmp_path / "term", _epoch_end_job(tmp_path, extra))
    attempts = status(tmp_path / "term", run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["preempted", "succeeded"]
    assert attempts[1]["restored_step"] == 21
    assert (run / "history.csv").read_text() == (clean / "history.csv").read_text()
    assert final_state_hash(run) == final_state_hash(clean)
