"""Device mesh and sharding rules: a 2-D mesh ("data", "fsdp").

- "data": pure data parallelism; parameters are replicated along it.
- "fsdp": data parallelism whose devices also split each large parameter (and its optimizer moments)
  into slices; XLA all-gathers a weight where it is used (ZeRO-3 style, what the original ran with
  DeepSpeed for its full-parameter stages).

A batch is split over BOTH axes: every device sees different rows. Parameters are described by logical
axis names per dimension (`logical_axes`, e.g. a q kernel [D, H·P] is ("embed", "heads")), and one rules
table maps logical names to mesh axes. By default only "embed" (d_model) is sharded, over "fsdp": every
matrix of a Llama/Mamba layer has a d_model side, so each is split once. Small leaves and 1-D vectors are
replicated. Leaves whose path the table does not know (toy models, a future parameter) fall back to
splitting their largest dimension divisible by the fsdp size.

The same code runs on 1 device, on fake CPU devices (`JAX_NUM_CPU_DEVICES=8`) and on N GPUs.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

MeshAxes = str | tuple[str, ...] | None
# Logical name -> mesh axis (or axes, or None: never split).
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", (DATA, FSDP)),
    ("length", None),
    ("embed", FSDP),
    ("vocab", None),
    ("heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("ssm_inner", None),
    ("ssm_state", None),
    ("ssm_rank", None),
    ("conv", None),
    ("layers", None),
)

# (module name, parameter name) at the end of a parameter's path -> logical names of its dimensions.
# Optimizer states (moments, accumulated gradients) end in the same two names, so they follow the params.
_PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"),
    ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    ("in_proj", "kernel"): ("embed", "ssm_inner"),
    ("in_proj_x", "kernel"): ("embed", "ssm_inner"),
    ("in_proj_z", "kernel"): ("embed", "ssm_inner"),
    ("B_proj", "kernel"): ("embed", "ssm_inner"),
    ("C_proj", "kernel"): ("embed", "ssm_inner"),
    ("dt_proj_down", "kernel"): ("embed", "ssm_rank"),
    ("dt_proj", "kernel"): ("ssm_rank", "ssm_inner"),
    ("conv", "kernel"): ("conv", "ssm_inner"),
    ("out_proj", "kernel"): ("ssm_inner", "embed"),
    ("mixer", "A_log"): ("ssm_inner", "ssm_state"),   # Mamba-1 [d_inner, N]; Mamba2's is 1-D
}


def make_mesh(data: int | None = None, fsdp: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all). Defaults: fsdp=1, data = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh: no devices")
    fsdp = 1 if fsdp is None else int(fsdp)
    if data is None:
        if fsdp <= 0 or n % fsdp:
            raise ValueError(f"fsdp={fsdp} must be a positive divisor of the {n} devices")
        data = n // fsdp
    data = int(data)
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices; "
                         "choose sizes whose product is the device count")
    # jax.make_mesh orders devices by the physical topology (fsdp neighbours on the fastest links)
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _rules_dict(rules: Sequence[tuple[str, MeshAxes]], mesh: Mesh | None) -> dict[str, MeshAxes]:
    out = dict(rules)
    if mesh is not None:
        for name, axes in out.items():
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                if a not in mesh.axis_names:
                    raise ValueError(f"sharding rule {name!r} -> {axes!r} names mesh axis {a!r}, "
                                     f"but the mesh has axes {mesh.axis_names}")
    return out


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
                    *, where: str = "array") -> P:
    """PartitionSpec for an array whose dimensions have these logical names (None: not split).

    Raises when a name has no rule or when two dimensions would be split over the same mesh axis.
    """
    table = _rules_dict(rules, None)
    spec, used = [], set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{where}: logical axis {name!r} has no sharding rule; add it to the rules "
                             f"(known: {sorted(table)})")
        axes = table[name]
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        clash = used.intersection(flat)
        if clash:
            raise ValueError(f"{where}: logical axes {tuple(names)} map mesh axis {sorted(clash)} to two "
                             "dimensions; change the sharding rules so each mesh axis splits one dimension")
        used.update(flat)
        spec.append(axes)
    return P(*spec)


def logical_sharding(mesh: Mesh, names: Sequence[str | None],
                     rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for an activation with logical dimension names, e.g. ("batch", "length", "embed")."""
    _rules_dict(rules, mesh)
    return NamedSharding(mesh, logical_to_spec(names, rules))


def _path_names(path) -> tuple[str, ...]:
    names = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        names.append(str(key))
    return tuple(names)


def path_str(path) -> str:
    """'layers/3/mixer/in_proj/kernel' for a jax key path."""
    return "/".join(_path_names(path))


def logical_axes(path, shape: Sequence[int]) -> tuple[str | None, ...] | None:
    """Logical dimension names of the parameter at `path` (a jax key path), or None if unknown."""
    names = _path_names(path)
    axes = _PARAM_AXES.get(names[-2:]) if len(names) >= 2 else None
    return axes if axes is not None and len(axes) == len(shape) else None


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in flat])) if flat else 1


def _leaf_spec(path, shape: tuple[int, ...], mesh: Mesh, rules, min_size: int) -> P:
    where = path_str(path) or "<root>"
    if len(shape) < 2 or int(np.prod(shape)) < min_size:
        return P()
    names = logical_axes(path, shape)
    if names is not None:
        spec = logical_to_spec(names, rules, where=where)
        if all(d % _axis_size(mesh, a) == 0 for d, a in zip(shape, spec)):
            return spec
        log.debug("%s: shape %s is not divisible as %s; falling back to the largest divisible dim",
                  where, shape, spec)
    n = mesh.shape[FSDP]
    if n == 1:
        return P()
    dims = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % n == 0]
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = FSDP
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, *,
                    min_size: int = 2 ** 12) -> Any:
    """A NamedSharding for every array leaf of `params` (arrays or ShapeDtypeStructs; None leaves kept).

    Leaves with fewer than `min_size` elements and 1-D vectors are replicated. Known parameters use their
    logical axes and `rules`; a dimension that does not divide evenly, or an unknown leaf, falls back to
    splitting the largest dimension divisible by the fsdp size over "fsdp" (replicated if none is).
    Works for optimizer states too (their moment leaves end with the parameter's path).
    """
    _rules_dict(rules, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _leaf_spec(path, tuple(x.shape), mesh, rules, min_size)), params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading B dim) split over ("data", "fsdp"): every device gets B / n_devices rows."""
    return NamedSharding(mesh, P((DATA, FSDP)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_gather(mesh: Mesh):
    """The ZeRO-3 all-gather as a function of a parameter pytree: every array leaf constrained to be whole
    (replicated) on every device, for `CausalLM.hidden(gather=...)` to apply to one layer's weights where that
    layer runs (inside its rematerialised call, so the backward pass gathers them again).

    Without it XLA's partitioner is free to keep an fsdp-sharded weight split and move the activations instead:
    for weights split along d_model it gathers every row of the batch onto each device and all-reduces partial
    sums, so per-device activations grow with the fsdp size instead of shrinking. The identity when the mesh
    has no fsdp split (parameters are then whole already).
    """
    if mesh.shape[FSDP] == 1:
        return lambda tree: tree
    whole = replicated(mesh)
    return lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), tree)


def shard_params(params: Any, shardings: Any) -> Any:
    """Place (or re-place) every leaf of `params` with its sharding."""
    return jax.device_put(params, shardings)


def describe(sharding: Any) -> str:
    """Compact text of a sharding for logs: the PartitionSpec, or 'replicated'."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return type(sharding).__name__
    return "replicated" if all(s is None for s in spec) else str(tuple(spec))
