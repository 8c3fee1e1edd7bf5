"""Device mesh from config, logical-axis rules, and sharded initialisation.

Sharding is declared, never hand-placed: parameters carry logical axis names
(`nn.with_logical_partitioning`), `config.sharding_rules` maps them to the mesh axes
(`data`, `fsdp`, `tensor`), and step functions are jitted with the resulting shardings.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from instructgpt_jax import configs

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh; -1 fills the remaining devices."""
    devices = devices if devices is not None else jax.devices()
    shape = configs.validate_mesh(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules)


def abstract_mesh(config) -> AbstractMesh:
    """The configured mesh without devices (dry runs: plan a 175B run on a laptop).

    -1 fills the local device count; explicit sizes may exceed the devices present."""
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes = [max(1, jax.device_count() // known) if s == -1 else s for s in sizes]
    configs.validate_mesh(config, math.prod(sizes))
    return AbstractMesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@contextlib.contextmanager
def sharding_context(mesh: Mesh | AbstractMesh, axis_rules):
    """Makes `nn.with_logical_constraint` inside the model resolve against this mesh."""
    mesh_context = jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, AbstractMesh) else jax.set_mesh(mesh)
    with mesh_context, nn.logical_axis_rules(axis_rules):
        yield


def with_sharding_context(fn: Callable, mesh: Mesh, axis_rules) -> Callable:
    """Wraps fn (e.g. a jitted step) so tracing and calls see the mesh and rules."""

    def wrapped(*args, **kwargs):
        with sharding_context(mesh, axis_rules):
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, axis_rules) -> Any:
    """NamedShardings for a pytree whose leaves are (possibly) nn.Partitioned boxes."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_init(init_boxed: Callable, mesh: Mesh, axis_rules, *args):
    """Runs init_boxed(*args) -> pytree with nn.Partitioned leaves directly into its shardings.

    The shapes come from jax.eval_shape (nothing allocated), so each device only ever holds its
    own shard. Returns (unboxed pytree, its shardings).
    """
    with sharding_context(mesh, axis_rules):
        abstract = jax.eval_shape(init_boxed, *args)
        shardings = logical_to_shardings(abstract, mesh, axis_rules)
        init = jax.jit(lambda *a: nn.meta.unbox(init_boxed(*a)), out_shardings=shardings)
        return init(*args), shardings


def abstract_init(init_boxed: Callable, mesh: Mesh, axis_rules, *args):
    """Shapes and shardings only (dry runs, checkpoint restore targets)."""
    with sharding_context(mesh, axis_rules):
        abstract = jax.eval_shape(init_boxed, *args)
        shardings = logical_to_shardings(abstract, mesh, axis_rules)
    shapes = nn.meta.unbox(abstract)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings
