"""The device axis sharded over accelerators: a 1-D mesh, ``NamedSharding``, plain ``jit``.

Simulated devices (phones) are independent, so their axis is the one to split: every array
with a leading device axis ``[N, ...]`` is placed with ``P("devices")`` over a 1-D mesh of
all accelerators, and parameters are replicated. ``jit`` with those in/out shardings runs
the same batched generation (or vmapped fine-tuning) on each accelerator's slice with no
communication at all. No ``pmap``.

The mesh axis is ``AxisType.Auto``: ``jax.make_mesh`` now defaults to explicit axis types
(sharding in types), which plain ``jit`` with ``in_shardings``/``out_shardings`` does not need.

Multi-host: call :func:`initialize_distributed` before anything touches a JAX backend; the
mesh then spans every process's accelerators and :func:`shard_devices` builds global arrays
from each process's own rows (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from duet_jax import finetune as finetune_lib
from duet_jax.duet import Duet
from duet_jax.generator import low_rank_for
from duet_jax.lowrank import LowRankKernel
from duet_jax.models import DeviceModel
from duet_jax.xla_options import generation_jit

DEVICE_AXIS = "devices"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> bool:
    """``jax.distributed.initialize`` for a multi-host run; a no-op without a coordinator.

    ``coordinator_address="auto"``: JAX reads the coordinator, process count and id from
    the cluster's environment (Slurm, Kubernetes, Cloud TPU; ``num_processes`` and
    ``process_id`` are then left to it). Must run before any JAX computation. Returns
    whether it initialised.
    """
    if not coordinator_address:
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return True
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def distributed_process() -> tuple[int, int]:
    """``(this process's index, the process count)`` of a ``jax.distributed`` run, ``(0, 1)``
    without one, read from the coordination state: unlike ``jax.process_index()`` it starts
    no accelerator backend (which would take the accelerators' memory)."""
    from jax._src import distributed  # the coordination state; no public accessor

    state = distributed.global_state
    if state.client is None:
        return 0, 1
    return state.process_id, state.num_processes


def wait_for_processes(name: str, timeout_s: float) -> None:
    """A barrier across every process of a multi-host run that waits up to ``timeout_s``
    (one process training while the others wait takes far longer than the collectives' own
    rendezvous allows, 30 s). ``name`` must be new to the run. A no-op on one process; starts
    no accelerator backend."""
    if distributed_process()[1] == 1:
        return
    from jax._src import distributed  # the coordination client; no public barrier has a timeout

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def device_mesh(num_accelerators: int | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("devices",)`` mesh over the first ``num_accelerators`` of ``devices``
    (default: all of ``jax.devices()``, i.e. every process's accelerators)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_accelerators is None else num_accelerators
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_accelerators={n}: expected 1..{len(devices)}")
    return jax.make_mesh((n,), (DEVICE_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices[:n])


def device_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (device) axis split over the mesh; other axes whole."""
    return NamedSharding(mesh, P(DEVICE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every accelerator (parameters)."""
    return NamedSharding(mesh, P())


def padded_size(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad_devices(tree: Any, multiple: int) -> Any:
    """Pad every leaf's leading axis with zeros to a multiple of ``multiple``.

    A zero row is an empty sequence (item 0 = padding) or a zero-weight fine-tuning row, so
    padded devices are valid inputs whose results the caller drops.
    """
    def pad(x):
        x = np.asarray(x)
        extra = padded_size(x.shape[0], multiple) - x.shape[0]
        return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x

    return jax.tree.map(pad, tree)


def shard_devices(tree: Any, mesh: Mesh) -> Any:
    """Place ``[N, ...]`` host arrays with the device axis split over ``mesh``, padding ``N``
    to a multiple of the mesh size. Multi-host: each process passes its own rows, and the
    result is the global array (rows of process 0 first)."""
    sharding = device_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(pad_devices(tree, mesh.size), sharding)
    local = pad_devices(tree, mesh.local_mesh.size)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def process_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of global rows ``x [N, ...]``: what each process passes
    to :func:`shard_devices` in a multi-host run (on one host, all of ``x``).

    Every process holds the same global ``x`` (e.g. made from the same seed) and keeps rows
    ``[i * N / P, (i + 1) * N / P)`` for process ``i`` of ``P``; ``N`` must split evenly.
    Which global rows a process's block becomes follows the mesh's device order (process by
    process for :func:`device_mesh`'s ``jax.devices()`` order; a reordered mesh permutes the
    blocks, which matters only when rows must stay in a given order).
    """
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return x
    if len(x) % count:
        raise ValueError(f"{len(x)} rows do not split evenly over {count} processes")
    share = len(x) // count
    return x[index * share:(index + 1) * share]


def spans_processes(mesh: Mesh) -> bool:
    """Whether ``mesh`` holds accelerators of more than one process (its arrays are then not
    fully addressable: no process can copy them to its host alone)."""
    return len({d.process_index for d in mesh.devices.flat}) > 1


def put_global_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Global rows ``x [N, ...]`` placed with the device axis split over ``mesh``; ``N`` must
    be a multiple of ``mesh.size``.

    On a mesh within one process, ``x`` is placed as it is. On a mesh spanning processes,
    every process holds the same global ``x`` (e.g. made from the same seed) and places only
    its own block (:func:`process_rows`, then :func:`shard_devices`); the global array has
    ``x``'s rows in ``x``'s order, which needs the mesh to hold every process's accelerators,
    the same number each, process by process (:func:`device_mesh`'s default order).
    """
    if len(x) % mesh.size:
        raise ValueError(f"{len(x)} rows do not split evenly over a mesh of {mesh.size}")
    if not spans_processes(mesh):
        return jax.device_put(x, device_sharding(mesh))
    check_process_blocks(mesh)
    return shard_devices(process_rows(x), mesh)


def check_process_blocks(mesh: Mesh) -> None:
    """Raise unless ``mesh`` holds every process's accelerators, the same number each,
    process by process: the layout in which :func:`process_rows`'s block of process ``i``
    becomes global rows ``[i * N / P, (i + 1) * N / P)``."""
    owners = [d.process_index for d in mesh.devices.flat]
    count = jax.process_count()
    blocks = [i for i in range(count) for _ in range(mesh.size // count)]
    if owners != blocks:
        raise ValueError(f"a mesh spanning processes must hold all {count} processes' "
                         f"accelerators, the same number each, in process order; its "
                         f"accelerators belong to processes {owners}")


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array. A leaf spread over several processes is gathered whole
    onto every process (``multihost_utils.process_allgather``): a collective, so every
    process must call it, in the same order."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(host, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a copy of ``tree`` (parameters) on every accelerator of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def head_specs(duet: Duet) -> Any:
    """Partition specs with the structure of ``duet.generate``'s output: per-device leaves
    split over the device axis, the shared low-rank factors ``U``, ``V`` replicated."""
    split, whole = P(DEVICE_AXIS), P()
    generator = duet.generator
    return generator.spec.unflatten_leaves([
        LowRankKernel(u=whole, core=split, v=whole) if low_rank_for(shape, generator.low_rank)
        else split
        for shape in generator.spec.shapes
    ])


def head_shardings(duet: Duet, mesh: Mesh) -> Any:
    """:func:`head_specs` as ``NamedSharding`` s on ``mesh``: ``duet.generate``'s layout."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), head_specs(duet),
                        is_leaf=lambda x: isinstance(x, P))


def per_row(fn: Callable, mesh: Mesh, row_args: int = 1, out_specs: Any = None) -> Callable:
    """``fn(params, *rows)`` with each of the ``row_args`` row arguments' leading axis split
    over ``mesh``, every accelerator running ``fn`` on its own rows (``shard_map``: no
    communication), ``params`` replicated, outputs split the same way (or laid out as
    ``out_specs`` says: ``P()`` for an output computed from ``params`` alone, identical on
    every accelerator). ``fn`` must treat rows independently. On CPU cores as devices this
    ran generation from prepared tables 1.35-1.56x of one device where GSPMD's partitioning
    of the same function ran 0.56-0.69x (docs/benchmark.md)."""
    rows = P(DEVICE_AXIS)
    # check_vma=False: the encoder's scan starts from a replicated zero state and carries a
    # per-row one; the rows never meet, so there is nothing for the check to guard
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(), *(rows,) * row_args),
                         out_specs=rows if out_specs is None else out_specs, check_vma=False)


def sharded_generate(duet: Duet, mesh: Mesh, donate: bool = False) -> Callable:
    """``jit(duet.generate)`` with ``seq [N, L]`` split over ``mesh`` and params replicated:
    each accelerator generates its own rows (:func:`per_row`); out-shardings are
    :func:`head_shardings`.

    ``N`` must be a multiple of ``mesh.size`` (:func:`shard_devices` pads). ``donate`` frees
    the input sequences' buffer for the outputs (a cloud streaming batches never reuses it).
    """
    return generation_jit(per_row(duet.generate, mesh, out_specs=head_specs(duet)),
                          in_shardings=(replicated(mesh), device_sharding(mesh)),
                          out_shardings=head_shardings(duet, mesh),
                          donate_argnums=(1,) if donate else ())


def sharded_finetune(model: DeviceModel, mode: str, steps: int, mesh: Mesh) -> Callable:
    """:func:`duet_jax.finetune.finetune_params` with the group axis split over ``mesh``:
    ``(trainable, fixed, tune_batch [G, S, ...], learning_rate)`` -> trainable ``[G, ...]``.
    ``G`` must be a multiple of ``mesh.size``."""
    split, whole = device_sharding(mesh), replicated(mesh)
    fn = functools.partial(finetune_lib.finetune_params, model, mode, steps=steps)
    return jax.jit(lambda trainable, fixed, tune_batch, lr: fn(trainable, fixed, tune_batch, lr),
                   in_shardings=(whole, whole, split, whole), out_shardings=split)


def is_split(x: jax.Array, mesh: Mesh) -> bool:
    """Whether ``x`` is laid out with its leading axis split over every accelerator of
    ``mesh``, one distinct slice each."""
    if not x.sharding.is_equivalent_to(device_sharding(mesh), x.ndim):
        return False
    starts = {index[0].start or 0 for index in x.sharding.devices_indices_map(x.shape).values()}
    return len(starts) == mesh.size and len(x.sharding.device_set) == mesh.size

