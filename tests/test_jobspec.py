"""Job files: strict YAML + schema, one message per problem naming the field."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ckptd.state.jobfile import load_job_file, parse_job, resolved_params
from ckptd.state.yamlstrict import JobFileError

from .conftest import EXAMPLE, ckptd_cmd, env_with, write_job

GOOD = "name: ok\nmodel: pkg.mod:build\n"

BAD = [
    # (document, expected fragment of the message)
    (GOOD + "train: {epochs: NO}\n", "train.epochs"),
    (GOOD + "train: {shuffle: off}\n", "train.shuffle"),
    (GOOD + "train: {shuffle: yes}\n", "train.shuffle"),
    (GOOD + "train: {seed: 0755}\n", "train.seed"),
    (GOOD + "train: {epochs: 1e3}\n", "train.epochs"),
    (GOOD + "train: {epochs: 0}\n", "train.epochs"),
    (GOOD + "train: {epochs: 99999999999999999999999}\n", "train.epochs"),
    (GOOD + "train: {validation_split: 1.0}\n", "train.validation_split"),
    (GOOD + "train: {validation_split: .nan}\n", "train.validation_split"),
    (GOOD + "checkpoint: {max_to_kep: 3}\n", "checkpoint.max_to_kep: unknown field"),
    (GOOD + "checkpoint: {max_to_keep: 0}\n", "checkpoint.max_to_keep"),
    (GOOD + "checkpoint: {every_steps: 0}\n", "checkpoint.every_steps"),
    (GOOD + "checkpoint: {keep_every_n_hours: -1}\n", "checkpoint.keep_every_n_hours"),
    (GOOD + "checkpoint: {async_overhead_budget: 0}\n", "checkpoint.async_overhead_budget"),
    (GOOD + "checkpoint: {async_overhead_budget: 2}\n", "checkpoint.async_overhead_budget"),
    (GOOD + "checkpoint: {async_overhead_budget: 2%}\n", "checkpoint.async_overhead_budget"),
    (GOOD + "restart: {max_restarts: -1}\n", "restart.max_restarts"),
    (GOOD + "restart: {heartbeat_timeout_seconds: 0}\n", "restart.heartbeat_timeout_seconds"),
    (GOOD + "restart: {backoff_initial_seconds: 10, backoff_max_seconds: 1}\n", "restart"),
    (GOOD + "resources: {gpus: -1}\n", "resources.gpus"),
    (GOOD + "resources: {memory_limit: lots}\n", "resources.memory_limit"),
    (GOOD + "best: {filepath: weights.txt}\n", "best.filepath"),
    (GOOD + "best: {mode: biggest}\n", "best.mode"),
    (GOOD + "early_stopping: {patience: -3}\n", "early_stopping.patience"),
    ("name: ok\n", "model: required field is missing"),
    ("name: ../evil\nmodel: a.b:c\n", "name"),
    ('name: "x\\e[31m"\nmodel: a.b:c\n', "name"),
    ("name: ok\nmodel: not-an-entrypoint\n", "model"),
    ("name: 1.10\nmodel: a.b:c\n", "name"),
    ("name: a\nname: b\nmodel: a.b:c\n", "duplicate key 'name'"),
    ("a: &x [1]\nb: *x\n", "anchors"),
    ("base: {x: 1}\nother:\n  <<: {y: 1}\n", "merge keys"),
    ("name: !!python/object:os.system x\n", "explicit YAML tags"),
    ("name: !env HOME\n", "explicit YAML tags"),
    ("name: !!binary aGVsbG8=\nmodel: a.b:c\n", "explicit YAML tags"),
    ("- 1\n- 2\n", "top level is a list"),
    ("# only a comment\n", "empty"),
    ("null\n", "top level is a null"),
    ("name: a\n---\nname: b\n", "single document"),
    ("name: [unclosed\n", "job.yaml:"),
    ("x: " + "[" * 100 + "]" * 100 + "\n", "nesting"),
    (GOOD + "params: {lr: .inf}\n", "params"),
    ("name: ok\nentrypoint: train.sh\n", "entrypoint: must be a Python script"),
    (GOOD + "entrypoint: train.py\n", "give one of them, not both"),
    ("name: ok\nentrypoint: t.py\ntrain: {epochs: 3}\n", "train.epochs: with entrypoint"),
    ("name: ok\nentrypoint: t.py\ntrain: {batch_size: 3, seed: 1}\n", "train.batch_size"),
    (GOOD + "checkpoint: {every_steps: auto, mode: sync}\n", "every_steps: auto paces asynchronous saves"),
    (GOOD + "checkpoint: {every_steps: often, mode: async}\n", "checkpoint.every_steps"),
    (GOOD + "distribute: {strategy: mirrored}\n", "distribute.replicas: mirrored needs at least 2"),
    (GOOD + "distribute: {strategy: mirrored, replicas: 1}\n", "distribute.replicas"),
    (GOOD + "distribute: {replicas: 2}\n", "set distribute.strategy: mirrored"),
    (GOOD + "distribute: {strategy: mirrored, replicas: 2}\nresources: {gpus: 4}\n", "one replica per GPU"),
    (GOOD + "distribute: {strategy: mirrored, min_replicas: 5}\nresources: {gpus: 4}\n", "min_replicas: 5"),
    (GOOD + "distribute: {strategy: horovod}\n", "distribute.strategy"),
]


@pytest.mark.parametrize(("doc", "fragment"), BAD)
def test_bad_job_is_rejected_naming_the_field(doc: str, fragment: str) -> None:
    with pytest.raises(JobFileError) as e:
        parse_job(doc.encode(), "job.yaml", Path("."))
    assert any(fragment in p for p in e.value.problems), e.value.problems
    assert all(p.startswith("job.yaml") for p in e.value.problems)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\xfename: x\n", "UTF-8"),
        (b"\xef\xbb\xbfname: x\n", "byte-order mark"),
        (b"name: x\x00\n", "NUL"),
        (b"name: x\n" + b"#" * 300_000, "cap"),
    ],
)
def test_bad_bytes_are_rejected(data: bytes, fragment: str) -> None:
    with pytest.raises(JobFileError) as e:
        parse_job(data, "job.yaml", Path("."))
    assert fragment in e.value.problems[0]


def test_every_problem_is_reported_once() -> None:
    doc = GOOD + "train: {epochs: NO, batch_size: 0, shuffle: on}\ncheckpoint: {max_to_kep: 1}\n"
    with pytest.raises(JobFileError) as e:
        parse_job(doc.encode(), "job.yaml", Path("."))
    assert len(e.value.problems) == 4


def test_alias_bomb_is_rejected_fast() -> None:
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(JobFileError, match="anchors"):
        parse_job(bomb.encode(), "job.yaml", Path("."))


def test_example_jobs_validate_and_resolve_paths() -> None:
    for name in ("job.yaml", "job-best.yaml"):
        spec, _ = load_job_file(EXAMPLE / name)
        assert spec.model == f"{EXAMPLE / 'model.py'}:build"
        # Stored as written; the worker resolves it with the submitter's rights.
        assert spec.params["csv"] == "pima-indians-diabetes.csv"
        assert resolved_params(spec)["csv"] == str(EXAMPLE / "pima-indians-diabetes.csv")
        assert spec.train.epochs == 150 and spec.train.batch_size == 10
        assert spec.best is not None and spec.best.monitor == "val_accuracy"


def test_missing_model_file_names_the_field(tmp_path: Path) -> None:
    job = tmp_path / "j.yaml"
    job.write_text("name: x\nmodel: nothere.py:build\n")
    with pytest.raises(JobFileError, match=r"model: file .*nothere\.py does not exist"):
        load_job_file(job)


@pytest.mark.parametrize("name", ["sub/models:build", "models.py:build"])
def test_a_model_naming_a_directory_says_so(tmp_path: Path, name: str) -> None:
    (tmp_path / name.split(":")[0]).mkdir(parents=True)
    job = tmp_path / "j.yaml"
    job.write_text(f"name: x\nmodel: {name}\n")
    with pytest.raises(
        JobFileError,
        match=r"model: .*models(\.py)? is a directory; name the "
        r"Python file in it, e\.g\. model\.py:build",
    ):
        load_job_file(job)


def test_the_worker_says_a_model_naming_a_directory_is_one(tmp_path: Path) -> None:
    """The daemon does not look at the path (the CLI and the worker do, with the submitter's
    rights): the worker's config_error names it too."""
    from ckptd.worker.entry import load_callable
    from ckptd.worker.errors import ConfigError

    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match=r"models is a directory; name the Python file in it"):
        load_callable(f"{tmp_path / 'models'}:build")


def test_entrypoint_resolves_beside_the_job_file_and_keeps_its_train_fields(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    job = tmp_path / "j.yaml"
    job.write_text("name: x\nentrypoint: train.py\ntrain: {seed: 4, deterministic: true}\n")
    spec, _ = load_job_file(job)
    assert spec.entrypoint == str(tmp_path / "train.py") and spec.model is None
    assert spec.train.seed == 4
    job.write_text("name: x\nentrypoint: other.py\n")
    with pytest.raises(JobFileError, match=r"entrypoint: file .*other\.py does not exist"):
        load_job_file(job)


def test_cli_validate_exit_2_and_records_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job = tmp_path / "bad.yaml"
    job.write_text(GOOD + "train: {epochs: NO}\n")
    for cmd in (["validate", str(job)], ["run", str(job)]):
        r = subprocess.run(ckptd_cmd(*cmd), env=env_with(home), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "train.epochs" in r.stderr
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())
    r = subprocess.run(
        ckptd_cmd("status", "--json"), env=env_with(home), capture_output=True, text=True, timeout=60
    )
    assert r.stdout.strip() == "[]"


def test_cli_validate_ok() -> None:
    r = subprocess.run(
        ckptd_cmd("validate", str(EXAMPLE / "job.yaml")), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("checkpoint.dir", "checkpoint: {dir: ../../x}"),
        ("checkpoint.dir", "checkpoint: {dir: a/../../x}"),
        ("best.filepath", "best: {filepath: ../w.hdf5}"),
    ],
)
def test_relative_output_paths_stay_in_the_run_directory(field: str, text: str) -> None:
    with pytest.raises(JobFileError, match=rf"{field}: a relative path must stay inside"):
        parse_job(f"name: x\nmodel: m:build\n{text}\n".encode(), "j.yaml", Path("/"), check=False)


def test_absolute_output_paths_must_be_writable_by_the_caller(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    job = f"name: x\nmodel: m:build\ncheckpoint: {{dir: {locked}/ck}}\n".encode()
    if os.geteuid() == 0:  # root may write anywhere: the lexical check still holds
        assert parse_job(job, "j.yaml", tmp_path).checkpoint.dir == f"{locked}/ck"
        return
    with pytest.raises(JobFileError, match=r"checkpoint.dir: .*locked/ck is not writable by you"):
        parse_job(job, "j.yaml", tmp_path)


def test_the_daemon_side_parse_touches_no_path(tmp_path: Path) -> None:
    """check=False is what the daemon uses: a missing model is the worker's to report."""
    spec = parse_job(
        b"name: x\nmodel: nothere.py:build\nparams: {csv: d.csv}\n", "j.yaml", tmp_path, check=False
    )
    assert spec.model == f"{tmp_path}/nothere.py:build" and spec.base_dir == str(tmp_path)
    assert resolved_params(spec) == {"csv": "d.csv"}  # no such file: left as written


def test_base_dir_cannot_be_set_by_a_job_file() -> None:
    with pytest.raises(JobFileError, match="base_dir: unknown field"):
        parse_job(b"name: x\nmodel: m:build\nbase_dir: /etc\n", "j.yaml", Path("/"))


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("w-{epoch:z}.hdf5", "bad format spec"),
        ("w-{epoch.real}.hdf5", "bad template field"),
        ("w-{epoch!r}.hdf5", "bad template field"),
        ("w-{epoch.hdf5", "not a valid template"),
        ("w-{val_accuracy:.2q}.hdf5", "bad format spec"),
    ],
)
def test_best_template_is_checked_at_validation(template: str, why: str) -> None:
    with pytest.raises(JobFileError, match=f"best.filepath: .*{why}"):
        parse_job(
            f"name: x\nmodel: m:build\nbest: {{filepath: '{template}'}}\n".encode(),
            "j.yaml",
            Path("/"),
            check=False,
        )
    ok = parse_job(
        b"name: x\nmodel: m:build\nbest: {filepath: 'w-{epoch:02d}-{val_accuracy:.2f}.hdf5'}\n",
        "j.yaml",
        Path("/"),
        check=False,
    )
    assert ok.best is not None


def test_one_strictness_for_job_files_and_stored_or_sent_specs(tmp_path: Path) -> None:
    """A spec arriving as JSON (the API's spec_json, the store) is held to the job file's rules:
    `every_steps: "100"` fails both ways. The parse is cached per text (the daemon asks every
    tick) and gives the same frozen spec."""
    import json

    from pydantic import ValidationError

    from ckptd.state.jobspec import spec_from_json, spec_json

    job = write_job(tmp_path)
    spec, _ = load_job_file(job)
    text = spec_json(spec)
    assert spec_from_json(text) == spec and spec_from_json(text) is spec_from_json(text)
    data = json.loads(text)
    data["checkpoint"]["every_steps"] = "100"
    with pytest.raises(ValidationError, match=r"checkpoint\.every_steps"):
        spec_from_json(json.dumps(data))
    job.write_text(job.read_text().replace("every_steps: 20", 'every_steps: "100"'))
    with pytest.raises(JobFileError, match=r"checkpoint\.every_steps"):
        load_job_file(job)


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("", (1, 1)),  # one device: the CPU
        ("resources: {gpus: 2}\n", (2, 2)),
        ("distribute: {strategy: mirrored, replicas: 3}\n", (3, 3)),  # logical CPU devices
        ("distribute: {strategy: mirrored}\nresources: {gpus: 4}\n", (4, 4)),
        ("distribute: {strategy: mirrored, min_replicas: 2}\nresources: {gpus: 4}\n", (4, 2)),
    ],
)
def test_replica_counts(text: str, counts: tuple[int, int]) -> None:
    from ckptd.state.jobspec import replica_counts

    spec = parse_job((GOOD + text).encode(), "j.yaml", Path("/"), check=False)
    assert replica_counts(spec) == counts


@pytest.mark.parametrize(
    ("checkpoint", "mode", "every_steps"),
    [
        ("", "async", 100),  # the default: the faster mode at equal guarantees (docs/benchmarks.md)
        ("checkpoint: {mode: sync}\n", "sync", 100),
        ("checkpoint: {every_steps: auto}\n", "async", "auto"),
        ("checkpoint: {every_steps: 20}\n", "async", 20),
    ],
)
def test_checkpoint_mode_defaults_to_async(checkpoint: str, mode: str, every_steps: int | str) -> None:
    spec = parse_job((GOOD + checkpoint).encode(), "job.yaml", Path("/nonexistent"), check=False)
    assert (spec.checkpoint.mode, spec.checkpoint.every_steps) == (mode, every_steps)
