"""Mesh construction and the one table mapping logical axis names to mesh axes (MaxText-style).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters sharded),
`tensor` (heads / MLP width). A rule may name several mesh axes; a mesh axis that does not divide
the dimension, or is already used by another dimension of the same array, is dropped for that
array (e.g. 2 KV heads of the 3B model on a tensor axis of 4 stay replicated) instead of failing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (in order of preference); None = replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("vision_patch", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merged", "fsdp"),
    ("lora_rank", None),  # LoRA's A [*in, r] and B [r, *out] shard like their kernel's in / out dims
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("vision_slots", ("data", "fsdp")),  # the vision tower's patch slots (all images of a batch in one axis)
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_heads", "tensor"),
)


class MeshError(ValueError):
  """A mesh the devices cannot hold; the message names config.mesh and what to set."""


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes; one of the sizes may be -1 (takes the rest).

  With three fixed sizes whose product is below the device count, the mesh takes the first devices
  (e.g. a one-device run on a host with several).
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if -1 not in sizes and 0 < int(np.prod(sizes)) < len(devices):
    devices = devices[:int(np.prod(sizes))]
  hint = ("; set one size to -1 to take the remaining devices, or simulate devices on a CPU with "
          "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  if sizes.count(-1) > 1:
    raise MeshError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise MeshError(f"config.mesh: {len(devices)} devices are not divisible by the fixed sizes {sizes}{hint}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise MeshError(f"config.mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices are "
                    f"present{hint}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes(name: str | None, rules) -> tuple[str, ...]:
  for logical, target in rules:
    if logical == name:
      return () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return ()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = []
    size = 1
    for axis in _mesh_axes(name, rules):
      n = mesh.shape[axis]
      if axis in used or n == 1 or dim % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def param_shardings(boxed_params: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedSharding per parameter from a tree of `nn.LogicallyPartitioned` (abstract or concrete)."""
  def one(leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * len(leaf.shape)
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


BATCH_AXES = ("data", "fsdp")


def without_batch_axes(tree: Any) -> Any:
  """Each leaf's NamedSharding with the batch axes (`data`, `fsdp`) dropped, kept over `tensor`: how a
  program that reads the whole of an array at every step should hold it. FSDP-sharded decode weights,
  for one, would be gathered at every decode step (`sampler.decode_weight_layout`)."""
  def drop(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(n for n in names if n is not None and n not in BATCH_AXES)
    return kept if len(kept) > 1 else (kept[0] if kept else None)

  def one(x):
    s = x.sharding
    return NamedSharding(s.mesh, PartitionSpec(*map(drop, s.spec))) if isinstance(s, NamedSharding) else s
  return jax.tree.map(one, tree)


def device_bytes_of(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def replicate_rest(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf not already sharded over `mesh` replicated on it (step counters, RNG keys,
  optimizer counts), so a train state is one consistent pytree for jit, checkpoints and restore."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data
      return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)  # the same value on every process (counters, keys made from the seed)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])
  return jax.tree.map(place, tree)


def batch_shards(mesh: Mesh | None) -> int:
  """Devices the batch axis of activations is split over (`activation_batch`: data x fsdp); 1 without a mesh."""
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh a tree of arrays is sharded over, if it spans more than one device."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def platform_of(tree: Any) -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices holding a tree of arrays (host arrays: the default)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      return next(iter(leaf.devices())).platform
  return jax.default_backend()


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None, rules=LOGICAL_RULES):
  """Activates `mesh` (if any) and the logical rules, so activation constraints take effect."""
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
      stack.enter_context(nn.logical_axis_rules(rules))
    yield


def mesh_context_of(tree: Any, rules=LOGICAL_RULES):
  return mesh_context(mesh_of(tree), rules)


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, reports, exported weights): process 0."""
  return jax.process_index() == 0


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order, on every process (a collective: all must call it)."""
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int64))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(sizes)]


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """The numpy values of a pytree of arrays; an array that spans several processes is gathered from all
  of them first (every process must call this, as with any collective)."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
