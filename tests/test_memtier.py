"""The memory tier without TensorFlow: the job file's checkpoint.memory section, the tier's
directory and snapshots (ckptd.state.memtier) and the choice across tiers (ckptd.state.mempolicy)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.state import mempolicy
from ckptd.state import memtier as mt
from ckptd.state.jobfile import parse_job
from ckptd.state.jobspec import spec_from_json, spec_json
from ckptd.state.memdigest import value_digest
from ckptd.state.mempolicy import DurableHead, choose, dead_branch
from ckptd.state.yamlstrict import JobFileError

GOOD = "name: ok\nmodel: pkg.mod:build\n"

SPEC_BAD = [
    ("checkpoint: {memory: {}}", "checkpoint.memory.every_steps: required field is missing"),
    ("checkpoint: {memory: {every_steps: 0}}", "checkpoint.memory.every_steps"),
    ("checkpoint: {memory: {every_steps: '5'}}", "checkpoint.memory.every_steps"),
    ("checkpoint: {memory: {every_steps: 5, keep: 0}}", "checkpoint.memory.keep"),
    ("checkpoint: {memory: {every_steps: 5, keep: 17}}", "checkpoint.memory.keep"),
    ("checkpoint: {memory: {every_steps: 5, kep: 2}}", "checkpoint.memory.kep: unknown field"),
    ("checkpoint: {memory: {every_steps: 5, dir: /tmp/ck}}", "under /dev/shm/ or /run/user/UID/"),
    ("checkpoint: {memory: {every_steps: 5, dir: /dev/shm}}", "under /dev/shm/ or /run/user/UID/"),
    ("checkpoint: {memory: {every_steps: 5, dir: /dev/shm/../etc}}", "without '..'"),
    ("checkpoint: {memory: {every_steps: 5, dir: /dev/shm//x}}", "without '..' or '//'"),
    ("checkpoint: {memory: {every_steps: 5, dir: ck}}", "checkpoint.memory.dir"),
    ("checkpoint: {memory: {every_steps: 5, dir: /run/user/me/ck}}", "checkpoint.memory.dir"),
    ("checkpoint: {mode: sync, memory: {every_steps: 5}}", "needs checkpoint.mode: async"),
    ("checkpoint: {every_steps: 100, memory: {every_steps: 100}}", "100 is not fewer than"),
    ("checkpoint: {every_steps: 100, memory: {every_steps: 500}}", "checkpoint.memory.every_steps: 500"),
]

SPEC_GOOD = [
    # (checkpoint section, (every_steps, keep, dir))
    ("{every_steps: 5000, memory: {every_steps: 20}}", (20, 2, None)),
    ("{every_steps: 5000, memory: {every_steps: 4999, keep: 16}}", (4999, 16, None)),
    ("{every_steps: auto, memory: {every_steps: 50, keep: 1}}", (50, 1, None)),
    ("{every_steps: null, every_seconds: 60, memory: {every_steps: 1000000000}}", (10**9, 2, None)),
    ("{memory: {every_steps: 20, dir: /dev/shm/tiers}}", (20, 2, "/dev/shm/tiers")),
    ("{memory: {every_steps: 20, dir: /run/user/1000/ck/}}", (20, 2, "/run/user/1000/ck/")),
]


@pytest.mark.parametrize(
    ("distribute", "refused"),
    [
        ("{strategy: multi_worker, nodes: 2}", False),  # one box: the members read the chief's tier
        ("{strategy: multi_worker, nodes: 2, engine: local}", False),
        ("{strategy: mirrored, replicas: 2}", False),
        ("{strategy: multi_worker, nodes: 2, engine: slurm}", True),  # nobody removes it there
    ],
)
def test_a_gang_has_the_tier_on_one_box_only(distribute: str, refused: bool) -> None:
    text = f"{GOOD}checkpoint: {{every_steps: 5000, memory: {{every_steps: 20}}}}\ndistribute: {distribute}\n"
    if not refused:
        assert parse_job(text.encode(), "job.yaml", Path(".")).checkpoint.memory is not None
        return
    with pytest.raises(JobFileError) as e:
        parse_job(text.encode(), "job.yaml", Path("."))
    assert any(
        "checkpoint.memory: not available with distribute.engine: slurm" in p for p in e.value.problems
    ), e.value.problems


def test_a_spec_without_the_tier_keeps_its_old_digest() -> None:
    spec = parse_job(GOOD.encode(), "job.yaml", Path("."))
    assert '"memory"' not in spec_json(spec).split('"checkpoint":', 1)[1].split("}", 1)[0]
    assert spec_from_json(spec_json(spec)) == spec


@pytest.mark.parametrize(("section", "fragment"), SPEC_BAD)
def test_bad_memory_section_is_rejected_naming_the_field(section: str, fragment: str) -> None:
    with pytest.raises(JobFileError) as e:
        parse_job(f"{GOOD}{section}\n".encode(), "job.yaml", Path("."))
    assert any(fragment in p for p in e.value.problems), e.value.problems
    assert all(p.startswith("job.yaml") for p in e.value.problems)


@pytest.mark.parametrize(("section", "want"), SPEC_GOOD)
def test_good_memory_section(section: str, want: tuple[int, int, str | None]) -> None:
    m = parse_job(f"{GOOD}checkpoint: {section}\n".encode(), "job.yaml", Path(".")).checkpoint.memory
    assert m is not None and (m.every_steps, m.keep, m.dir) == want


def test_no_memory_section_means_no_tier() -> None:
    assert parse_job(GOOD.encode(), "job.yaml", Path(".")).checkpoint.memory is None


# -- the tier's directory and snapshots ------------------------------------------------------


@pytest.fixture
def root() -> Iterator[Path]:
    """A fresh parent on the real /dev/shm (the tier refuses anything that is not a tmpfs)."""
    path = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _tier(root: Path) -> Path:
    return mt.open_tier(str(root), "job-1", os.geteuid())


def _snap(
    tier: Path,
    step: int,
    gen: int = 1,
    values: bytes = b"v" * 100,
    lineage: str = "job-1@x",
    digest: str | None = None,
) -> mt.Snap:
    strings = mt.pack_strings({"host": ((), [b"state"]), "arr": ((2,), [b"a", b"bc"])})
    building = mt.begin(tier, step, gen)
    (building / mt.VALUES).write_bytes(values)
    (building / mt.STRINGS).write_bytes(strings)
    man = mt.MemManifest(
        lineage,
        gen,
        step,
        0,
        step,
        0.0,
        "plan",
        digest or value_digest([values, strings]),
        len(values),
        len(strings),
    )
    return mt.commit(tier, building, man)


def test_open_tier_makes_private_directories_on_tmpfs(root: Path) -> None:
    tier = _tier(root)
    assert tier == root / "job-1"
    for d in (root, tier):
        st = d.lstat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    assert _tier(root) == tier  # opening again is fine


def test_default_root_is_per_user_on_dev_shm() -> None:
    assert mt.tier_dir(None, "j", 1234) == Path("/dev/shm/ckptd-1234/j")


REFUSALS = [
    # (how the parent is spoiled, fragment of the message)
    ("symlink", "a symlink or not a directory"),
    ("group", "mode 0750"),
    ("other", "mode 0701"),
    ("foreign", "owned by uid 65534"),
    ("file", "a symlink or not a directory"),
]


@pytest.mark.parametrize(("spoil", "fragment"), REFUSALS)
def test_open_tier_refuses_an_unsafe_directory(root: Path, tmp_path: Path, spoil: str, fragment: str) -> None:
    if spoil == "symlink":
        target = Path("/dev/shm") / f"{root.name}-target"
        target.mkdir(mode=0o700)
        root.symlink_to(target)
    elif spoil == "file":
        root.write_bytes(b"")
    else:
        root.mkdir(mode=0o700)
        os.chmod(root, {"group": 0o750, "other": 0o701}.get(spoil, 0o700))
        if spoil == "foreign":
            if os.geteuid() != 0:
                pytest.skip("needs root to give the directory away")
            os.chown(root, 65534, 65534)
    try:
        with pytest.raises(mt.TierRefused, match=r"checkpoint\.memory\.dir") as e:
            _tier(root)
        assert fragment in str(e.value)
        assert not (root / "job-1").exists()
    finally:
        if spoil == "symlink":
            shutil.rmtree(Path("/dev/shm") / f"{root.name}-target")
            root.unlink()
        elif spoil == "file":
            root.unlink()


def test_open_tier_refuses_a_directory_on_disk(tmp_path: Path) -> None:
    from ckptd.state.memtier import TMPFS_MAGIC, _fs_type

    fd = os.open(tmp_path, os.O_RDONLY)
    on_tmpfs = _fs_type(fd) == TMPFS_MAGIC
    os.close(fd)
    if on_tmpfs:
        pytest.skip("the test's temporary directory is itself on a tmpfs")
    with pytest.raises(mt.TierRefused, match="not on a tmpfs"):
        mt.open_tier(str(tmp_path / "tiers"), "job-1", os.geteuid())


def test_snapshot_round_trip_and_verify(root: Path) -> None:
    tier = _tier(root)
    s = _snap(tier, 40)
    good, bad = mt.snapshots(tier)
    assert (good, bad) == ([s], {})
    assert s.path.name == "snap-000000000040-g1" and mt.verify(s) is None
    assert mt.unpack_strings((s.path / mt.STRINGS).read_bytes()) == {
        "host": ((), [b"state"]),
        "arr": ((2,), [b"a", b"bc"]),
    }
    assert mt.read_manifest(s.path) == s.manifest


@pytest.mark.parametrize(
    ("algo", "damaged", "reason"),
    [
        ("xxh3_128", False, None),  # today's
        ("crc32", False, None),  # written before xxh3_128: still verifies
        ("crc32", True, "value digest crc32:"),
        ("xxh3_128", True, "value digest xxh3_128:"),
        ("md5", False, "unknown value digest algorithm 'md5'"),
    ],
)
def test_verify_uses_the_manifests_digest_algorithm(
    root: Path, algo: str, damaged: bool, reason: str | None
) -> None:
    strings = mt.pack_strings({"host": ((), [b"state"]), "arr": ((2,), [b"a", b"bc"])})
    digest = f"md5:{'0' * 32}" if algo == "md5" else value_digest([b"v" * 100, strings], algo)
    assert digest.startswith(f"{algo}:")
    s = _snap(_tier(root), 40, digest=digest)
    if damaged:
        (s.path / mt.VALUES).write_bytes(b"w" + b"v" * 99)
    got = mt.verify(s)
    assert got == reason if reason is None else reason in str(got)


DAMAGE = [
    # (what happens to the snapshot, fragment of verify's reason)
    (lambda p: (p / mt.VALUES).write_bytes(b"w" + b"v" * 99), "value digest"),
    (lambda p: (p / mt.STRINGS).write_bytes(b"x"), "strings.bin is 1 bytes"),
    (lambda p: (p / mt.VALUES).write_bytes(b"v" * 99), "values.bin is 99 bytes"),
    (lambda p: (p / mt.VALUES).unlink(), "No such file"),
]


@pytest.mark.parametrize(("damage", "fragment"), DAMAGE)
def test_verify_finds_damage(root: Path, damage: object, fragment: str) -> None:
    s = _snap(_tier(root), 40)
    damage(s.path)  # type: ignore[operator]
    reason = mt.verify(s)
    assert reason is not None and fragment in reason


def test_unfinished_and_unreadable_snapshots_are_not_listed(root: Path) -> None:
    tier = _tier(root)
    building = mt.begin(tier, 60, 1)
    (building / mt.VALUES).write_bytes(b"half")
    broken = tier / mt.snapshot_name(80, 1)
    broken.mkdir()
    (broken / mt.MANIFEST).write_text("{not json")
    elsewhere = tier / mt.snapshot_name(90, 1)
    elsewhere.mkdir()
    (elsewhere / mt.MANIFEST).write_text((_snap(tier, 20).path / mt.MANIFEST).read_text())
    good, bad = mt.snapshots(tier)
    assert [s.manifest.step for s in good] == [20]
    assert set(bad) == {broken, elsewhere}
    assert "JSONDecodeError" in bad[broken] and "for snap-000000000020-g1" in bad[elsewhere]


def test_prune_keeps_the_newest_n_and_removes_debris(root: Path) -> None:
    tier = _tier(root)
    for step, gen in [(20, 1), (40, 1), (30, 2), (50, 2)]:
        _snap(tier, step, gen)
    stale = tier / f"{mt.BUILDING}{mt.snapshot_name(60, 1)}-999999999-1"
    stale.mkdir()
    ours = mt.begin(tier, 70, 2)
    removed = mt.prune(tier, keep=2)
    assert [(s.manifest.generation, s.manifest.step) for s in mt.snapshots(tier)[0]] == [(2, 30), (2, 50)]
    assert stale in removed and not stale.exists()
    assert ours.exists()  # this process is still building it


def test_commit_replaces_a_snapshot_of_the_same_step(root: Path) -> None:
    tier = _tier(root)
    _snap(tier, 40, values=b"a" * 10)
    s = _snap(tier, 40, values=b"b" * 10)
    assert mt.snapshots(tier)[0] == [s] and mt.verify(s) is None
    assert (s.path / mt.VALUES).read_bytes() == b"b" * 10
    assert [e.name for e in os.scandir(tier)] == [s.path.name]


def test_quarantine_keeps_evidence_but_bounds_the_ram(root: Path) -> None:
    tier = _tier(root)
    first = mt.quarantine(tier, _snap(tier, 20).path, "digest mismatch")
    second = mt.quarantine(tier, _snap(tier, 40).path, "plan changed")
    assert mt.snapshots(tier)[0] == []
    assert (second / "reason.txt").read_text() == "plan changed\n" and (second / mt.VALUES).exists()
    assert (first / "reason.txt").read_text() == "digest mismatch\n" and (first / mt.MANIFEST).exists()
    assert not (first / mt.VALUES).exists()


def test_tier_bytes_counts_the_ram_and_remove_tier_removes_it(root: Path) -> None:
    tier = _tier(root)
    assert mt.tier_bytes(tier) == 0
    _snap(tier, 20, values=b"v" * 1_000_000)
    _snap(tier, 40, values=b"v" * 1_000_000)
    assert 2_000_000 <= mt.tier_bytes(tier) < 2_100_000
    outside = Path("/dev/shm") / f"{root.name}-outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    try:
        (tier / "link").symlink_to(outside)
        mt.remove_tier(tier)
        assert not tier.exists() and (outside / "keep").exists()
        assert mt.tier_bytes(tier) == 0
        mt.remove_tier(tier)  # already gone: fine
    finally:
        shutil.rmtree(outside)


def test_lineage_names_the_job_and_its_durable_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert mt.lineage_of("j1", a) == mt.lineage_of("j1", a)
    assert mt.lineage_of("j1", a).startswith("j1@")
    assert len({mt.lineage_of("j1", a), mt.lineage_of("j1", b), mt.lineage_of("j2", a)}) == 3


def test_plan_digest_covers_graph_and_layout() -> None:
    layout = [("k", "<f4", (2, 3), 0, 24)]
    base = mt.plan_digest(b"graph", layout)
    assert base == mt.plan_digest(b"graph", list(layout))
    assert base != mt.plan_digest(b"graph2", layout)
    assert base != mt.plan_digest(b"graph", [("k", "<f4", (3, 2), 0, 24)])


# -- the choice across tiers (pure) ----------------------------------------------------------

L = "job-1@x"


def _s(step: int, gen: int, lineage: str = L) -> mt.Snap:
    name = mt.snapshot_name(step, gen)
    return mt.Snap(Path(name), mt.MemManifest(lineage, gen, step, 0, step, 0.0, "p", "crc32:0", 1, 1))


CHOICES = [
    # (case, durable head, snapshots (step, gen, lineage), this attempt, damaged, chosen,
    #  quarantined, ignored)
    ("no tier", DurableHead(100, 1), [], 2, set(), None, [], []),
    ("fresh start, snapshot of attempt 1", None, [(20, 1, L)], 2, set(), (20, 1), [], []),
    ("newer memory wins", DurableHead(100, 1), [(120, 1, L)], 2, set(), (120, 1), [], []),
    ("tie goes to durable", DurableHead(100, 1), [(100, 1, L)], 2, set(), None, [], [(100, 1)]),
    ("older memory loses", DurableHead(100, 1), [(80, 1, L)], 2, set(), None, [], [(80, 1)]),
    ("foreign job ignored", DurableHead(100, 1), [(120, 1, "other@y")], 2, set(), None, [], [(120, 1)]),
    ("newest of several", DurableHead(100, 1), [(120, 1, L), (140, 1, L)], 2, set(), (140, 1), [], []),
    (
        "damaged quarantined, next considered",
        DurableHead(100, 1),
        [(120, 1, L), (140, 1, L)],
        2,
        {(140, 1)},
        (120, 1),
        [(140, 1)],
        [],
    ),
    (
        "all damaged: durable",
        DurableHead(100, 1),
        [(120, 1, L), (140, 1, L)],
        2,
        {(120, 1), (140, 1)},
        None,
        [(140, 1), (120, 1)],
        [],
    ),
    ("same attempt as the durable commit", DurableHead(100, 2), [(120, 2, L)], 3, set(), (120, 2), [], []),
    (
        "an attempt before the durable commit's",
        DurableHead(100, 3),
        [(140, 2, L)],
        4,
        set(),
        None,
        [],
        [(140, 2)],
    ),
    (
        "a newer attempt's: this worker is stale",
        DurableHead(100, 1),
        [(120, 5, L)],
        4,
        set(),
        None,
        [],
        [(120, 5)],
    ),
    ("written by this very attempt", DurableHead(100, 1), [(120, 4, L)], 4, set(), (120, 4), [], []),
    (
        "the newest attempt's history first",
        DurableHead(100, 1),
        [(160, 2, L), (130, 3, L)],
        4,
        set(),
        (130, 3),
        [],
        [],
    ),
    (
        "no generation recorded on the durable side",
        DurableHead(100, 0),
        [(120, 1, L)],
        2,
        set(),
        (120, 1),
        [],
        [],
    ),
]


@pytest.mark.parametrize(
    ("durable", "snaps", "gen", "damaged", "chosen", "quarantined", "ignored"),
    [c[1:] for c in CHOICES],
    ids=[c[0] for c in CHOICES],
)
def test_choose(
    durable: DurableHead | None,
    snaps: list[tuple[int, int, str]],
    gen: int,
    damaged: set[tuple[int, int]],
    chosen: tuple[int, int] | None,
    quarantined: list[tuple[int, int]],
    ignored: list[tuple[int, int]],
) -> None:
    def key(s: mt.Snap) -> tuple[int, int]:
        return (s.manifest.step, s.manifest.generation)

    tried: list[tuple[int, int]] = []

    def verify(s: mt.Snap) -> str | None:
        tried.append(key(s))
        return "damaged" if key(s) in damaged else None

    c = choose(durable, [_s(*x) for x in snaps], L, gen, verify)
    assert (c.source, c.snapshot and key(c.snapshot)) == ("memory" if chosen else "durable", chosen)
    assert [key(s) for s, _ in c.quarantine] == quarantined
    assert [key(s) for s, _ in c.ignored] == ignored
    assert all(reason for _, reason in c.ignored + c.quarantine)
    assert set(tried).isdisjoint(ignored)  # only candidates are read


def test_dead_branch_is_what_lies_beyond_the_restored_step() -> None:
    snaps = [_s(80, 1), _s(120, 1), _s(140, 2)]
    assert [s.manifest.step for s in dead_branch(snaps, 100)] == [120, 140]
    assert dead_branch(snaps, 140) == []


def test_prune_leaves_a_spare_and_take_spare_moves_it_into_a_new_snapshot(root: Path) -> None:
    tier = _tier(root)
    for step in (20, 40, 60):
        _snap(tier, step)
    oldest = os.lstat(tier / mt.snapshot_name(20, 1) / mt.VALUES).st_ino
    mt.prune(tier, keep=2, spare=True)
    assert [s.manifest.step for s in mt.snapshots(tier)[0]] == [40, 60]
    assert os.lstat(tier / mt.SPARE).st_ino == oldest
    building = mt.begin(tier, 80, 1)
    assert not mt.take_spare(tier, building, 99)  # another size: dropped, not reused
    assert not (tier / mt.SPARE).exists() and not (building / mt.VALUES).exists()
    _snap(tier, 100)
    mt.prune(tier, keep=2, spare=True)
    assert mt.take_spare(tier, building, 100) and (building / mt.VALUES).stat().st_size == 100
    assert not mt.take_spare(tier, building, 100)  # only one spare


def test_open_tier_names_a_missing_parent(root: Path) -> None:
    with pytest.raises(mt.TierRefused, match=r"does not exist; create it"):
        mt.open_tier(str(root / "deeper"), "job-1", os.geteuid())


@pytest.mark.parametrize(
    ("chief", "chosen", "row"),
    [
        (True, (40, 2), [1, 40, 2]),
        (True, None, [1, -1, -1]),
        (False, None, [0, -1, -1]),
        (False, (40, 2), [0, -1, -1]),  # only the chief's choice counts
    ],
)
def test_gang_row(chief: bool, chosen: tuple[int, int] | None, row: list[int]) -> None:
    assert mempolicy.gang_row(chief, chosen) == row


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        ([[1, 40, 2], [0, -1, -1]], (40, 2)),
        ([[0, -1, -1], [1, 40, 2], [1, 40, 2]], (40, 2)),  # a member's rows are per replica
        ([[1, -1, -1], [0, -1, -1]], None),  # the chief chose the durable tier
        ([[0, -1, -1], [0, -1, -1]], ValueError),  # no chief
        ([[1, 40, 2], [1, 44, 2]], ValueError),  # two
    ],
)
def test_gang_proposal(rows: list[list[int]], want: object) -> None:
    if want is ValueError:
        with pytest.raises(ValueError, match="not one chief"):
            mempolicy.gang_proposal(rows)
    else:
        assert mempolicy.gang_proposal(rows) == want


@pytest.mark.parametrize(
    ("votes", "agrees"),
    [([[1], [1]], True), ([[1], [0]], False), ([[0], [1], [1]], False), ([], False)],
)
def test_gang_agrees_only_when_every_member_holds_the_snapshot(votes: list[list[int]], agrees: bool) -> None:
    assert mempolicy.gang_agrees(votes) is agrees
