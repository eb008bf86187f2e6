"""Network thinning: physically remove pruned channels and emit a smaller ``GraphModule``.

A channel can go when it is exactly zero wherever it enters a layer that sums over channels (see
``channels.py``). Removing it slices every parameter and buffer that carries it, updates the module
attributes that describe those sizes, rewrites literal sizes in ``view`` / ``reshape`` / ``split`` calls,
and recompiles. By construction the thinned model computes the same outputs as the compressed dense one;
``check=True`` verifies that on the example inputs and names the first node where they part.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ExampleInputError, ThinningCheckError
from ..graph import as_input_tuple, propagate_shapes, trace
from ..schemes import check_scheme
from .annotate import META
from .channels import ChanInfo, ChannelAnalysis, analyze, removable_channels

__all__ = ["thin", "rethin", "apply_keep", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    if isinstance(model, fx.GraphModule):
        metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
        if metas and all(m is not None and hasattr(m, "shape") for m in metas):
            return tuple(torch.randn(m.shape, dtype=m.dtype) if m.dtype.is_floating_point
                         else torch.zeros(m.shape, dtype=m.dtype) for m in metas)
    raise ValueError("thin needs example inputs to learn the tensor shapes, e.g. "
                     "thin(model, scheme, example_inputs=torch.randn(1, 3, 224, 224))")


def _resolve(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr


def _set_tensor(gm: fx.GraphModule, names: list[str], value: torch.Tensor) -> None:
    """Replace a tensor under all its names by one new object, so that tied weights stay tied."""
    module, attr = _resolve(gm, names[0])
    old = getattr(module, attr)
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
        else value.contiguous()
    for name in names:
        module, attr = _resolve(gm, name)
        if isinstance(new, nn.Parameter):
            setattr(module, attr, new)
        else:
            module._buffers[attr] = new


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Canonical tensor name -> every name it is reachable by (tied parameters are sliced once, set everywhere)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        canonical = first.setdefault(id(t), name)
        names.setdefault(canonical, []).append(name)
    return names


def balance_grouped(analysis: ChannelAnalysis, keep: torch.Tensor) -> torch.Tensor:
    """Keep extra (zero) channels where the layers need them: one index in every sliced tensor dim (a conv
    with no filters, or a cat part with no channels, cannot run), and equal counts in the non-empty
    groups of each tied grouped conv. Keeping a removable channel never changes the outputs.
    """
    from ..structured import _balance_grouped, _keep_one_per_slice

    return _balance_grouped(analysis, _keep_one_per_slice(analysis, keep, None), None)


def _kept(analysis: ChannelAnalysis, keep: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep[analysis.channel_of[atoms]]).flatten()


def _slice_tensors(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    aliases = _aliases(gm)
    grouped_weights = {f"{g.module}.weight": g for g in analysis.grouped}
    tensors: dict[str, torch.Tensor] = {}

    def current(path: str) -> torch.Tensor:
        if path not in tensors:
            module, attr = _resolve(gm, path)
            tensors[path] = getattr(module, attr).detach()
        return tensors[path]

    for s in analysis.slices:
        if s.path in grouped_weights and s.dim == 0:
            continue  # rows and in-group columns of a tied grouped conv are cut together below
        idx = _kept(analysis, keep, s.atoms)
        if idx.numel() != s.atoms.numel():
            tensors[s.path] = current(s.path).index_select(s.dim, idx.to(current(s.path).device))
    for path, gc in grouped_weights.items():
        w = current(path)
        k = keep[analysis.channel_of[gc.out_atoms]].view(gc.groups, -1)
        if bool(k.all()):
            continue
        per = k.shape[1]
        w = w.view(gc.groups, per, w.shape[1], *w.shape[2:])
        parts = []
        for j in torch.nonzero(k.any(1)).flatten().tolist():
            local = torch.nonzero(k[j]).flatten()
            rows = w[j].index_select(0, local)
            parts.append(rows.index_select(1, local) if w.shape[2] == per else rows)
        tensors[path] = torch.cat(parts, 0) if parts else w.new_zeros((0, *w.shape[2:]))
    for path, value in tensors.items():
        _set_tensor(gm, aliases.get(path, [path]), value)


def _copy_without_annotations(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of ``gm`` whose nodes carry no fxcondensa metadata: masks and channel infos describe the
    dense shapes, so they would be wrong on the thinned model, and copying them costs time."""
    saved = {n: n.meta.pop(META) for n in gm.graph.nodes if META in n.meta}
    # Share every tensor instead of cloning it: the sliced ones are replaced by new tensors, and the rest
    # only outlive ``gm`` (an internal copy of the user's model) in the thinned model.
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    try:
        return copy.deepcopy(gm, memo)
    finally:
        for n, meta in saved.items():
            n.meta[META] = meta


def _kept_count(analysis: ChannelAnalysis, keep: torch.Tensor, info: Any) -> int | None:
    return int(keep[analysis.channel_of[info.atoms]].sum()) if isinstance(info, ChanInfo) else None


def _update_modules(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Make each module's size attributes agree with its new tensors (they are used by repr and export)."""
    grouped = {g.module: g for g in analysis.grouped}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        x = node.args[0] if node.args else None
        cin = _kept_count(analysis, keep, analysis.infos.get(x.name)) if isinstance(x, fx.Node) else None
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if node.target in grouped:
                g = grouped[node.target]
                m.groups = int(keep[analysis.channel_of[g.out_atoms]].view(g.groups, -1).any(1).sum())
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            m.in_channels = m.weight.shape[0]
            m.out_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and cin is not None:
            per = m.num_channels // m.num_groups
            m.num_channels, m.num_groups = cin, cin // per
        elif isinstance(m, (nn.modules.batchnorm._NormBase,)) and cin is not None:
            m.num_features = cin
        elif isinstance(m, nn.PReLU) and m.weight.numel() > 1:
            m.num_parameters = m.weight.numel()


def _rewrite_sizes(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor) -> None:
    """Literal sizes in view/reshape/split calls that count channels must count the kept ones."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in dict.fromkeys(analysis.reshapes):
        node = nodes[name]
        info = analysis.infos.get(name)
        if isinstance(info, list):  # split / chunk: sizes of the parts along the channel dim
            sizes = [_kept_count(analysis, keep, part) for part in info]
            x = node.args[0]
            dim = info[0].dim
            if node.op == "call_method":
                node.target = "split"
            else:
                node.target = torch.split
            node.args = (x, sizes, dim)
            node.kwargs = {}
            continue
        if not isinstance(info, ChanInfo) or node.target not in ("view", "reshape", "expand", torch.reshape):
            continue
        new = _kept_count(analysis, keep, info)
        args, kwargs = list(node.args), dict(node.kwargs)
        if "shape" in kwargs or "size" in kwargs:  # x.reshape(shape=(...)), x.view(size=(...))
            key = "shape" if "shape" in kwargs else "size"
            kwargs[key] = _with_size(kwargs[key], info.dim, new)
        elif len(args) == 2 and isinstance(args[1], (list, tuple)):  # x.view((b, c, -1)), torch.reshape(x, shape)
            args[1] = _with_size(args[1], info.dim, new)
        elif node.target is not torch.reshape:  # x.view(b, c, -1)
            args[1:] = _with_size(args[1:], info.dim, new)
        node.args, node.kwargs = tuple(args), kwargs


def _with_size(shape: Any, dim: int, new: int) -> Any:
    """``shape`` with a literal channel count at ``dim`` replaced (-1 and computed sizes are left alone)."""
    items = list(shape)
    if dim < len(items) and isinstance(items[dim], int) and items[dim] != -1:
        items[dim] = new
    return type(shape)(items) if isinstance(shape, tuple) else items


def _outputs_close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_outputs_close, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_outputs_close(a[k], b[k]) for k in a)
    return a == b


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _first_divergence(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis,
                      keep: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> str:
    ref, new = _Recorder(compressed), _Recorder(thinned)
    ref.run(*inputs)
    new.run(*inputs)
    for node in compressed.graph.nodes:
        a, b = ref.values.get(node.name), new.values.get(node.name)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        info = analysis.infos.get(node.name)
        if isinstance(info, ChanInfo):
            a = a.index_select(info.dim, _kept(analysis, keep, info.atoms).to(a.device))
        if a.shape != b.shape:
            return f"node '{node.name}' ({node.op} {node.target}): shape {tuple(b.shape)}, expected {tuple(a.shape)}"
        if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            return (f"node '{node.name}' ({node.op} {node.target}): max abs difference "
                    f"{float((a - b).abs().max()):.3g}")
    return "the graph outputs"


def _as_float64(obj: Any) -> Any:
    """A float64 copy of a module, or float64 versions of the floating tensors in a tuple of inputs."""
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj).double()
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in obj)


def _check(compressed: fx.GraphModule, thinned: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
           inputs: tuple[torch.Tensor, ...]) -> None:
    modes = [(m, m.training) for m in [*compressed.modules(), *thinned.modules()]]
    compressed.eval()
    thinned.eval()
    try:
        with torch.no_grad():
            try:
                expected = compressed(*inputs)
            except Exception as exc:  # shapes passed on fake tensors, but real arithmetic refuses the inputs
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs if isinstance(t, torch.Tensor))
                raise ExampleInputError(
                    f"the example inputs ({shapes}) do not run through {type(compressed).__name__}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Pass inputs of the shape, dtype and "
                    "device the model expects.") from exc
            if not _outputs_close(expected, thinned(*inputs)):
                # Removing zero channels changes the order of float32 sums; in a deep net with large
                # activations that rounding alone can exceed the tolerance. The same comparison in float64
                # tells rounding (it vanishes) from a wrong model (it does not).
                compressed, thinned, inputs = _as_float64(compressed), _as_float64(thinned), _as_float64(inputs)
                if _outputs_close(compressed(*inputs), thinned(*inputs)):
                    return
                where = _first_divergence(compressed, thinned, analysis, keep, inputs)
                raise ThinningCheckError(
                    f"the thinned model differs from the compressed model beyond rtol={RTOL}, atol={ATOL} (in float32 "
                    f"and in float64), first at "
                    f"{where}. This is a bug in fxcondensa's channel analysis: please report it with the model; "
                    "meanwhile make the module involved a leaf (thin(..., leaf_modules=[...])) to freeze it.")
    finally:
        for m, mode in modes:
            m.training = mode


def thin(
    model: nn.Module,
    scheme: Any = None,
    example_inputs: Any = None,
    check: bool = True,
    *,
    leaf_modules: tuple[type[nn.Module], ...] = (),
) -> fx.GraphModule:
    """Return a smaller ``GraphModule`` with pruned channels physically removed.

    With a ``scheme`` (e.g. ``StructurePrune(0.5)``) the model is compressed first; without one, the
    channels that are already zero across their whole group are removed (e.g. the output of L-C with a
    structured scheme). The model is never modified. ``check=True`` compares the thinned model with the
    compressed dense one on ``example_inputs`` (eval mode, rtol 1e-4, atol 1e-5) and raises
    ``ThinningCheckError`` naming the first node that differs.

    What was removed, and which channel groups were frozen and why, is in
    ``thinned.meta["fxcondensa"]["groups"]`` and ``["frozen"]``.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), torch.randn(1, 1, 28, 28))
        >>> small.conv1.out_channels < 20 and small.ip1.out_features < 500
        True
    """
    if scheme is not None:
        check_scheme(scheme)
    inputs = _example_inputs(model, example_inputs)
    compressed = trace(model, inputs, leaf_modules=leaf_modules)
    if scheme is not None:
        with torch.no_grad():
            scheme.pi(compressed)
            scheme.delta(compressed)
    analysis = analyze(compressed)
    keep = balance_grouped(analysis, ~removable_channels(compressed, analysis))
    thinned = apply_keep(compressed, analysis, keep, inputs)
    if check:
        _check(compressed, thinned, analysis, keep, inputs)
    thinned.meta[META] = {
        **compressed.meta.get(META, {}),  # e.g. the FLOP target a scheme searched for and what it reached
        "groups": [
            {"group": g.name, "producers": list(g.producers), "channels": int(g.channels.numel()),
             "kept": int(keep[g.channels].sum()), "frozen": "; ".join(g.frozen)}
            for g in analysis.groups
        ],
        "frozen": analysis.frozen_report(),
        # The recipe: which channels stayed (by channel id of the analysis, which is deterministic for an
        # architecture and input shapes). ``rethin`` rebuilds the same thinned graph from it.
        "keep": keep.clone(),
        "input_shapes": [list(t.shape) for t in inputs],
        "input_dtypes": [str(t.dtype).removeprefix("torch.") for t in inputs],
    }
    return thinned


def apply_keep(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: torch.Tensor,
               inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A thinned copy of ``gm`` that keeps the channels marked in ``keep`` (one bool per channel id)."""
    thinned = _copy_without_annotations(gm)
    _slice_tensors(thinned, analysis, keep)
    _update_modules(thinned, analysis, keep)
    _rewrite_sizes(thinned, analysis, keep)
    thinned.graph.lint()
    thinned.recompile()
    propagate_shapes(thinned, inputs, fake=True)
    return thinned


def rethin(model: nn.Module, keep: torch.Tensor, example_inputs: Any, *,
           leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Rebuild the thinned architecture of ``model`` from a recipe (``thinned.meta["fxcondensa"]["keep"]``).

    The values are those of ``model`` sliced; load the thinned weights afterwards. Raises ``ValueError``
    when the recipe does not fit the architecture.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.schemes import StructurePrune
        >>> x = torch.randn(1, 1, 28, 28)
        >>> small = fxcondensa.thin(fxcondensa.models.LeNet5(), StructurePrune(0.3), x)
        >>> again = rethin(fxcondensa.models.LeNet5(), small.meta["fxcondensa"]["keep"], x)
        >>> again.conv1.weight.shape == small.conv1.weight.shape
        True
    """
    inputs = as_input_tuple(example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    analysis = analyze(gm)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (analysis.num_channels,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"the thinning recipe does not fit {type(model).__name__}: it needs a bool tensor of "
                         f"{analysis.num_channels} channels, got {got}")
    return apply_keep(gm, analysis, balance_grouped(analysis, keep), inputs)
