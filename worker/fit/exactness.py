"""Static checks for what ckptd's exact resume cannot replay.

ckptd resumes a killed run in a new process and promises the same bits as an uninterrupted run. With op
determinism on and the global seed set before the user's code runs, most of tf.data replays exactly:
re-creating k iterators (without pulling from them) advances every reshuffling seed to epoch k, and pulling
the first s batches of epoch k restores the position inside it. What cannot be replayed is state that lives
outside that scheme: Python code (generators, py_function, PyDataset.on_epoch_end), variables a dataset
function updates per element, legacy stateful random ops in a train step (their stream restarts in each
process) and a file cache left locked by the killed process. These functions name each such cause in one
sentence, so a user hears about it before a resumed run silently diverges.

The experiments behind every rule are in notes/exactness-findings.md (scripts under /tmp/exact); the
comments below cite them by scenario name.
"""

from __future__ import annotations

import collections.abc
import inspect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf
    from tensorflow.core.framework.graph_pb2 import GraphDef
    from tensorflow.core.framework.node_def_pb2 import NodeDef

# Legacy stateful random ops: their kernel keeps a Philox counter that no checkpoint saves, so in a train step
# a resumed process restarts the stream at step 0's numbers (step_random.py). Inside tf.data functions the
# same ops are harmless: each iterator re-instantiates the kernel (map_uniform_* scenarios), so they are
# not looked for there.
STATEFUL_RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformInt",
        "RandomStandardNormal",
        "TruncatedNormal",
        "ParameterizedTruncatedNormal",
        "RandomShuffle",
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
        "RandomCrop",
        "SampleDistortedBoundingBox",
        "SampleDistortedBoundingBoxV2",
        "UniformCandidateSampler",
        "LogUniformCandidateSampler",
        "LearnedUnigramCandidateSampler",
        "FixedUnigramCandidateSampler",
        "ThreadUnsafeUnigramCandidateSampler",
        "AllCandidateSampler",
    }
)
# Reads OS entropy: different in every process whatever is checkpointed.
ENTROPY_OPS = frozenset({"NonDeterministicInts"})
# Python called from a graph: its state (NumPy/random RNGs, counters, file positions) is invisible to ckptd.
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
# A tf.random.Generator advances its state variable with these (map_tf_generator scenario).
GENERATOR_OPS = frozenset(
    {
        "RngReadAndSkip",
        "RngSkip",
        "StatefulUniform",
        "StatefulUniformInt",
        "StatefulUniformFullInt",
        "StatefulStandardNormal",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulRandomBinomial",
    }
)
# Writes to a captured variable, e.g. a keras SeedGenerator's state (map_keras_flip scenario).
VARIABLE_WRITE_OPS = frozenset(
    {
        "AssignVariableOp",
        "AssignAddVariableOp",
        "AssignSubVariableOp",
        "ResourceScatterUpdate",
        "ResourceScatterAdd",
        "ResourceScatterSub",
        "ResourceScatterMul",
        "ResourceScatterDiv",
        "ResourceScatterMin",
        "ResourceScatterMax",
        "ResourceScatterNdUpdate",
        "ResourceScatterNdAdd",
        "ResourceScatterNdSub",
    }
)
CACHE_OPS = frozenset({"CacheDataset", "CacheDatasetV2"})
GENERATOR_DATASET_OPS = frozenset({"GeneratorDataset"})


# ---------------------------------------------------------------------------------------------- graphs


def _func_names(node: NodeDef) -> list[str]:
    """The functions a node calls (map/interleave bodies, PartitionedCall targets, while/cond branches)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names.extend(f.name for f in value.list.func)
    return names


def _library(graph_def: GraphDef) -> dict[str, list[NodeDef]]:
    return {f.signature.name: list(f.node_def) for f in graph_def.library.function}


def _function_nodes(
    graph_def: GraphDef, roots: Iterable[NodeDef], skip: frozenset[str] = frozenset()
) -> Iterator[NodeDef]:
    """Every node of every function reachable from `roots`, once, except those under `skip`."""
    library = _library(graph_def)
    seen: set[str] = set(skip)
    todo = [name for node in roots for name in _func_names(node)]
    while todo:
        name = todo.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        for node in library[name]:
            yield node
            todo.extend(_func_names(node))


def _const_string(graph_def: GraphDef, name: str) -> bytes | None:
    """The value of a top-level string Const (input names look like "Const/_3" or "Const/_3:0")."""
    wanted = name.lstrip("^").split(":")[0]
    for node in graph_def.node:
        if node.name == wanted and node.op == "Const":
            values = node.attr["value"].tensor.string_val
            return bytes(values[0]) if values else None
    return None


def _first(ops: Iterable[str], wanted: frozenset[str]) -> str | None:
    hits = sorted(set(ops) & wanted)
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------------------- tf.data


def _dataset_graph(ds: tf.data.Dataset) -> GraphDef:
    import tensorflow as tf

    # WARN (not FAIL): a graph with stateful functions must still serialize so that we can name them.
    policy = tf.data.experimental.ExternalStatePolicy.WARN
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(ds._as_serialized_graph(external_state_policy=policy).numpy())
    return graph_def


def _generator_risks(graph_def: GraphDef, fn_nodes: list[NodeDef]) -> list[str]:
    # from_generator scenario: creating iterators without pulling does not run the generator, so a
    # generator whose output depends on its past runs (its own RNG, a file cursor) diverges on resume;
    # and its iterator cannot be checkpointed either ("PyFunc is stateful", itckpt.py from_generator).
    ops = {n.op for n in graph_def.node} | {n.op for n in fn_nodes}
    if not ops & GENERATOR_DATASET_OPS:
        return []
    return [
        "tf.data: Dataset.from_generator wraps a Python generator whose position and random state "
        "ckptd cannot restore; a resumed run is exact only if every call of the generator yields the "
        "same sequence — otherwise build the dataset from tensors/files (from_tensor_slices, "
        "TFRecordDataset) and shuffle with ds.shuffle(..., seed=...)"
    ]


def _python_op_risks(graph_def: GraphDef) -> list[str]:
    # map_numpy_rand scenario: np.random inside tf.numpy_function gives epoch k a different draw after a
    # resume. The generator's own PyFuncs are reported by _generator_risks, so skip its functions.
    gen_funcs = frozenset(
        name
        for node in _all_nodes(graph_def)
        if node.op in GENERATOR_DATASET_OPS
        for name in _func_names(node)
    )
    op = _first((n.op for n in _function_nodes(graph_def, graph_def.node, gen_funcs)), PYTHON_OPS)
    if op is None:
        return []
    return [
        f"tf.data: a dataset function calls Python through tf.py_function/tf.numpy_function ({op}); "
        "if that code draws random numbers (NumPy, random) or keeps state, ckptd cannot restore it "
        "and a resumed run diverges — use tf.random.stateless_* ops seeded from the element instead"
    ]


def _all_nodes(graph_def: GraphDef) -> list[NodeDef]:
    return list(graph_def.node) + [n for nodes in _library(graph_def).values() for n in nodes]


def _state_risks(fn_nodes: list[NodeDef], state_restored: bool) -> list[str]:
    ops = [n.op for n in fn_nodes]
    risks: list[str] = []
    if state_restored:
        # ckptd.worker.data.pipestate snapshots the pipeline's integer variables per pass and
        # restores them on resume: generator and seed-generator state in ds.map replays.
        ops = [op for op in ops if op not in GENERATOR_OPS | VARIABLE_WRITE_OPS]
    # map_tf_generator: the Generator's state advances per element and replaying iterator creations
    # does not advance it, so epoch k's draws differ after a resume.
    op = _first(ops, GENERATOR_OPS)
    if op is not None:
        risks.append(
            f"tf.data: a dataset function draws from a tf.random.Generator ({op}) whose state "
            "advances per element and is not replayed on resume; use "
            "tf.random.stateless_* ops seeded from the element (or a per-epoch seed) instead"
        )
    # map_keras_flip / map_keras_random_stateful_fn: a keras random layer (or keras.random with a
    # SeedGenerator) in ds.map updates its seed variable per element: same failure as above.
    op = _first(ops, VARIABLE_WRITE_OPS)
    if op is not None:
        risks.append(
            f"tf.data: a dataset function updates a variable per element ({op}), e.g. a Keras "
            "random layer (RandomFlip, RandomRotation, ...) or keras.random with a SeedGenerator "
            "inside ds.map; ckptd does not replay that state on resume — move the random layer "
            "into the model (its SeedGenerator is checkpointed) or use tf.random.stateless_* ops"
        )
    op = _first(ops, ENTROPY_OPS)
    if op is not None:
        risks.append(
            f"tf.data: a dataset function reads OS entropy ({op}), different in every process; "
            "seed it instead (tf.random.Generator.from_seed, stateless ops)"
        )
    return risks


def _cache_risks(graph_def: GraphDef) -> list[str]:
    # cachefile.py: SIGKILL during the first epoch of ds.cache(filename) leaves "<filename>_0.lockfile",
    # and the resumed process fails with AlreadyExistsError ("concurrent caching iterator").
    for node in _all_nodes(graph_def):
        if node.op in CACHE_OPS and len(node.input) > 1:
            filename = _const_string(graph_def, node.input[1])
            if filename:
                return [
                    f"tf.data: ds.cache({filename.decode(errors='replace')!r}) writes a file cache that "
                    "a killed process leaves locked (<filename>_0.lockfile), so the resumed run fails "
                    "with AlreadyExistsError until the lockfile is removed; use ds.cache() in memory "
                    "or a cache file that is complete before training starts"
                ]
    return []


def op_determinism_enabled() -> bool:
    # is_op_determinism_enabled has no public tf.config alias (TF 2.21); its module is stable since 2.9.
    from tensorflow.python.framework import config as tf_config

    return bool(tf_config.is_op_determinism_enabled())


def _determinism_risks(graph_def: GraphDef) -> list[str]:
    # nondet_check.py: deterministic=False really reorders elements between epochs/processes, but op
    # determinism overrides it (interleave_nondet scenarios are exact): flag only when it is off.
    if op_determinism_enabled():
        return []
    for node in _all_nodes(graph_def):
        if "deterministic" in node.attr and node.attr["deterministic"].s == b"false":
            return [
                f"tf.data: {node.op} runs with deterministic=False and op determinism is off, so "
                "element order varies between runs; drop deterministic=False or enable "
                "train.deterministic"
            ]
    return []


def dataset_risks(ds: tf.data.Dataset, state_restored: bool = False) -> list[str]:
    """One sentence per cause that makes ckptd's resume of this (batched) dataset inexact.

    Exact, hence not reported: shuffle with or without a seed, reshuffle_each_iteration either way
    (ckptd.worker.data.fitdata and ckptd.worker.data.batches replay the iterator creations before a
    resumed pass),
    Dataset.random / sample_from_datasets, legacy random ops (tf.random.uniform) and stateless ops in map,
    parallel map, interleave(deterministic=False) under op determinism, in-memory cache."""
    try:
        graph_def = _dataset_graph(ds)
    except Exception as exc:  # an unserializable dataset: say so rather than claim it is safe
        return [
            f"tf.data: ckptd could not inspect this dataset's graph ({type(exc).__name__}: {exc}); "
            "its exact resume is unverified"
        ]
    fn_nodes = list(_function_nodes(graph_def, graph_def.node))
    risks = (
        _generator_risks(graph_def, fn_nodes)
        + _python_op_risks(graph_def)
        + _state_risks(fn_nodes, state_restored)
        + _cache_risks(graph_def)
        + _determinism_risks(graph_def)
    )
    return list(dict.fromkeys(risks))


# ---------------------------------------------------------------------------------------------- train step


def _concrete_functions(fn: Any, depth: int = 0, seen: set[int] | None = None) -> list[Any]:
    """The traced ConcreteFunctions behind `fn`.

    Keras 3 (TF backend) makes `model.train_function` a plain Python function whose closure holds the
    tf.functions `multi_step_on_iterator` (used with a tf.data iterator) and `one_step_on_data` (wrapped
    by functools.wraps, so reachable through __wrapped__): follow closures, __wrapped__ and __func__."""
    import tensorflow as tf

    seen = set() if seen is None else seen
    if fn is None or id(fn) in seen or depth > 6:
        return []
    seen.add(id(fn))
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        return [fn]
    if isinstance(fn, tf.types.experimental.PolymorphicFunction):
        # The signatures traced so far; private, but the only way without knowing the input specs.
        return list(fn._list_all_concrete_functions())
    found: list[Any] = []
    for attr in ("__wrapped__", "__func__"):
        found += _concrete_functions(getattr(fn, attr, None), depth + 1, seen)
    if inspect.isfunction(fn) and fn.__closure__:
        for cell in fn.__closure__:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and not inspect.isclass(value):
                found += _concrete_functions(value, depth + 1, seen)
    return found


def _step_ops(fn: Any) -> set[str] | None:
    concrete = _concrete_functions(fn)
    if not concrete:
        return None
    ops: set[str] = set()
    for cf in concrete:
        graph_def = cf.graph.as_graph_def()  # includes the library: nested calls, while/cond bodies
        ops.update(n.op for n in _all_nodes(graph_def))
    return ops


def graph_risks(fn: Any) -> list[str]:
    """One sentence per op in a traced train step whose state ckptd cannot checkpoint.

    `fn`: a ConcreteFunction, a tf.function, or Keras 3's `model.train_function` after it ran once.
    Not reported: stateless random ops (Keras 3 Dropout/SeedGenerator, tf.random.stateless_*) and
    tf.random.Generator ops, whose state variables ckptd checkpoints."""
    ops = _step_ops(fn)
    if ops is None:
        return ["train step: no traced graph found (call it once first); its random ops are unverified"]
    risks = [
        f"train step: the stateful random op {op} keeps its random stream in the kernel, which no "
        "checkpoint saves, so after a resume it repeats the numbers of the first steps; use "
        "keras.random.* with a keras.random.SeedGenerator, or tf.random.stateless_* ops"
        for op in sorted(ops & STATEFUL_RANDOM_OPS)
    ]
    risks += [
        f"train step: {op} reads OS entropy, different in every process; use seeded "
        "keras.random / tf.random.stateless_* ops"
        for op in sorted(ops & ENTROPY_OPS)
    ]
    op = _first(ops, PYTHON_OPS)
    if op is not None:
        risks.append(
            f"train step: it calls Python through tf.py_function/tf.numpy_function ({op}); if that "
            "code draws random numbers or keeps state, ckptd cannot restore it on resume"
        )
    return risks


# ---------------------------------------------------------------------------------------------- Python data


def python_data_risks(obj: Any) -> list[str]:
    """One sentence per cause that makes resuming a Python data source inexact."""
    import keras

    if isinstance(obj, keras.utils.PyDataset):
        base = keras.utils.PyDataset
        hooks = [
            name
            for name in ("on_epoch_begin", "on_epoch_end")
            if getattr(type(obj), name, None) is not getattr(base, name)
        ]
        return [
            f"PyDataset {type(obj).__name__} overrides {name} (typically a reshuffle with its own RNG); "
            "ckptd cannot restore that RNG or replay the calls, so a resumed run sees other batches — "
            "derive the order from the epoch number (e.g. np.random.default_rng((seed, epoch)))"
            for name in hooks
        ]
    if inspect.isgenerator(obj):
        return [
            f"a Python generator ({getattr(obj, '__name__', type(obj).__name__)}) feeds training; its "
            "position and random state cannot be restored after a kill — pass arrays, a "
            "tf.data.Dataset or a keras.utils.PyDataset instead"
        ]
    if isinstance(obj, collections.abc.Iterator):
        return [
            f"an iterator ({type(obj).__name__}) feeds training; its position cannot be restored after "
            "a kill — pass the dataset or sequence itself, not an iterator over it"
        ]
    return []
