"""The rule API: the channel analysis' data model and the context every op rule is written against.

Vocabulary
----------
- An **atom** is one channel of one producer (a conv filter, a linear neuron). Every tensor dimension
  that the analysis tracks is described by a vector of atoms, one per index (``ChanInfo``). A flatten
  repeats each atom ``H*W`` times; a ``torch.cat`` concatenates atom vectors.
- Ops that make two channels inseparable (a residual ``add``, an elementwise ``mul``, the tied input and
  output of a depthwise conv, one GroupNorm group) **unite** atoms. A **channel** is then a connected
  set of atoms: removing it removes every tensor index that carries one of its atoms.
- A **group** is a connected set of producers (their atoms were united somewhere): a conv and its
  BatchNorm, all the convs that feed one residual stream, ... Groups are what the report names and what
  gets **frozen** (kept whole, with a reason) when a channel reaches something the analysis cannot slice:
  the graph output, an unknown op, a LayerNorm or softmax over the channel dim.
- A tensor's values at an **exit** (the input of a conv / linear, which sums over channels) decide
  whether a channel can go: it can when it is exactly zero at every exit. ``zero_channels`` propagates
  "this channel is identically zero" through the graph with each node's rule, reading current weights.

How an op is handled is looked up in the op registry (``fxcondensa.rules.registry``; built-in entries in
``fxcondensa.rules``): the walker (``fxcondensa.passes.channels``) calls the entry's channel function with a ``RuleContext``, the small
API a rule uses to read tracked inputs and record outputs, slices, unions and frozen reasons. Everything is
recorded in plain data on the ``ChannelAnalysis`` and in ``node_record(node).chan``; the thinning pass and
the structured schemes read it, neither reaches back into the rules.

Devices: channel bookkeeping (atoms, zero flags, keep vectors) always lives on the CPU; a rule that reads
weights computes on their device and brings back only the small per-channel vector (``host``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.records import FrozenGroup
from ..errors import UnknownOpError
from . import registry
from .registry import node_shape  # the rules' one reader of a node's shape

__all__ = [
    "ChanInfo",
    "TensorSlice",
    "GroupedConv",
    "Group",
    "ChannelAnalysis",
    "RuleContext",
    "Speculation",
    "KeptView",
    "ZeroRule",
    "host",
    "node_shape",
    "node_arg",
    "tensor_at",
]


def host(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of a small per-channel tensor (scores, zero flags, masks) read off the weights."""
    return t.detach().to("cpu")


def tensor_at(gm: fx.GraphModule, path: str) -> Any:
    """The parameter or buffer at ``path`` of ``gm`` (what a zero rule reads: rules get the module, never keep it)."""
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument of ``node`` by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@dataclass
class ChanInfo:
    """The tracked channel dimension of one tensor: ``atoms[i]`` is the atom at index ``i`` of ``dim``."""

    dim: int
    atoms: torch.Tensor


@dataclass
class TensorSlice:
    """A parameter or buffer dimension indexed by atoms; thinning keeps the indices whose channel stays.

    ``role`` is ``"producer"`` (rows that create the channel: scored and zeroed by the schemes),
    ``"bias"`` (a producer's bias), ``"norm"`` (per-channel affine parameters and statistics of a norm
    layer or a broadcast parameter: zeroed by the schemes when it is a parameter) or ``"consumer"``
    (input columns of the next layer: only sliced).
    """

    path: str
    dim: int
    atoms: torch.Tensor
    role: str
    node: str


@dataclass
class GroupedConv:
    """A grouped conv whose input and output channels are tied position by position (depthwise too).

    Thinning must keep the same number of channels in every non-empty conv group.
    """

    node: str
    module: str
    groups: int
    out_atoms: torch.Tensor


@dataclass
class Group:
    """Producers linked by united atoms; ``channels`` are the channel ids that belong to it."""

    id: int
    producers: list[str]
    layers: list[str]
    channels: torch.Tensor
    frozen: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # the kind of each producer

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"group{self.id}"


# A zero rule gets the zero vectors computed so far and the module (never captured: analyses are cached
# and must not keep their module alive).
ZeroRule = Callable[[dict[str, Any], fx.GraphModule], Any]


@dataclass
class ChannelAnalysis:
    """The result of ``analyze``: atoms, how they unite, what slices them, and what freezes them."""

    num_atoms: int = 0
    range_of: list[int] = field(default_factory=list)  # range id of each atom
    range_names: list[str] = field(default_factory=list)  # the layer (or node) that created each range
    range_kinds: list[str] = field(default_factory=list)  # "conv", "linear" or "other", for the schemes
    edges: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    slices: list[TensorSlice] = field(default_factory=list)
    frozen: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # nodes whose tracked values enter a channel-summing op
    grouped: list[GroupedConv] = field(default_factory=list)
    infos: dict[str, Any] = field(default_factory=dict)  # node name -> ChanInfo | list[ChanInfo|None] | None
    rules: dict[str, ZeroRule] = field(default_factory=dict)  # node name -> zero rule
    reshapes: list[str] = field(default_factory=list)  # view/reshape/split nodes with literal sizes to rewrite
    blocked: dict[tuple[str, int], str] = field(default_factory=dict)  # (tensor, dim) no use may slice
    # filled by finalize()
    channel_of: torch.Tensor | None = None  # atom -> channel id
    num_channels: int = 0
    groups: list[Group] = field(default_factory=list)
    group_of_channel: torch.Tensor | None = None
    # nodes where a rule raised and the analysis froze what flows in instead (``strict=True`` raises there)
    rule_failures: list[str] = field(default_factory=list)
    # A reshape into (..., heads, head_dim) tracks head_dim columns (shared by every head) instead of whole
    # heads: ``analyze(gm, head_dim=True)``, the second stage of ``thin`` (see ``rules/attention.py``).
    head_dim: bool = False
    # With ``head_dim``: the atoms of the head_dim columns found, one vector per split into heads or
    # ``nn.MultiheadAttention`` (``head_dim_channels`` reads them).
    head_dim_atoms: list[torch.Tensor] = field(default_factory=list)
    # Node of a module that returns a tuple and whose own channels are internal (the heads of a
    # MultiheadAttention, the hidden units of an LSTM) -> {index: (channels of that item, their zero rule)};
    # the getitem rule reads it, and an index not listed carries no channels.
    tuple_outputs: dict[str, dict[int, Any]] = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------------------
    def new_atoms(self, n: int, name: str, kind: str) -> torch.Tensor:
        """Atoms for ``n`` new channels created by ``name``; ``kind`` is "conv", "linear" or "other"."""
        rid = len(self.range_names)
        self.range_names.append(name)
        self.range_kinds.append(kind)
        start = self.num_atoms
        self.num_atoms += n
        self.range_of.extend([rid] * n)
        return torch.arange(start, start + n)

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise AssertionError(f"cannot unite atom vectors of sizes {a.numel()} and {b.numel()}")
        self.edges.append((a, b))

    def freeze(self, atoms: torch.Tensor, reason: str) -> None:
        self.frozen.append((atoms, reason))

    def block_slice(self, path: str, dim: int, reason: str) -> None:
        """A use of this tensor cannot be sliced along ``dim`` (e.g. a tied weight that also reads the graph
        input): every channel any other use would slice there must stay."""
        self.blocked.setdefault((path, dim), reason)
        for s in self.slices:
            if s.path == path and s.dim == dim:
                self.freeze(s.atoms, reason)

    def add_slice(self, path: str, dim: int, atoms: torch.Tensor, role: str, node: str) -> None:
        if (path, dim) in self.blocked:
            self.freeze(atoms, self.blocked[(path, dim)])
        for s in self.slices:
            if s.path == path and s.dim == dim:  # a shared module called twice: its channels are one
                self.unite(s.atoms, atoms)
                return
        self.slices.append(TensorSlice(path, dim, atoms, role, node))

    def state(self) -> dict[str, Any]:
        """What ``rewind`` needs to undo what was recorded since: the length of every list (they only grow),
        a copy of every dict, every other value."""
        return {f.name: len(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
                for f in fields(self) for v in [getattr(self, f.name)]}

    def rewind(self, state: dict[str, Any]) -> None:
        """Back to ``state`` (from ``state()``): what was recorded since is gone."""
        for name, before in state.items():
            now = getattr(self, name)
            if isinstance(now, list):
                del now[before:]
            elif isinstance(now, dict):
                now.clear()
                now.update(before)
            else:
                setattr(self, name, before)

    # -- reading results ---------------------------------------------------------------------------------
    def info(self, node: Any) -> ChanInfo | None:
        """The tracked channel dim of a node's output (by node or name), None when nothing is tracked."""
        i = self.infos.get(node.name if isinstance(node, fx.Node) else node)
        return i if isinstance(i, ChanInfo) else None

    def kept(self, keep: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
        """Bool per atom: True where its channel stays under ``keep`` (one bool per channel id)."""
        return keep[self.channel_of[atoms]]

    def kept_indices(self, keep: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
        """The positions along a tracked dim (described by ``atoms``) that stay under ``keep``."""
        return torch.nonzero(self.kept(keep, atoms)).flatten()

    # -- results --------------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Compute channels (connected atoms) and groups (connected producers) and their frozen reasons."""
        n = self.num_atoms
        label = torch.arange(n)
        if self.edges and n:
            a = torch.cat([e[0] for e in self.edges])
            b = torch.cat([e[1] for e in self.edges])
            # Connected components by min-label propagation: a few vectorised sweeps instead of a
            # Python union-find over tens of thousands of atoms.
            while True:
                m = torch.minimum(label[a], label[b])
                new = label.clone()
                new.scatter_reduce_(0, a, m, reduce="amin")
                new.scatter_reduce_(0, b, m, reduce="amin")
                new = new[new]  # pointer jumping speeds convergence on long chains
                if torch.equal(new, label):
                    break
                label = new
        # Labels are atom ids: number the distinct ones in order (what ``torch.unique(label,
        # return_inverse=True)`` gives) by counting, without sorting a million atoms.
        present = torch.zeros(n, dtype=torch.bool)
        present[label] = True
        rank = torch.cumsum(present, 0) - 1
        channel_of = rank[label]
        self.channel_of = channel_of
        self.num_channels = int(present.sum())
        range_of = torch.tensor(self.range_of, dtype=torch.long)
        # Groups: ranges that share a channel are one group.
        nr = len(self.range_names)
        parent = list(range(nr))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        # Each channel links its first (lowest) range with every other range it touches. Done on tensors:
        # a per-atom Python loop costs a quarter of a second on a ResNet-50; only the few distinct
        # (range, range) links reach the union-find below.
        first_range = torch.full((self.num_channels,), -1, dtype=torch.long)
        if n:
            key = torch.unique(channel_of * nr + range_of)  # sorted: by channel, then by range
            ch, rid = key // nr, key % nr
            starts = torch.ones_like(ch, dtype=torch.bool)
            starts[1:] = ch[1:] != ch[:-1]
            first_range[ch[starts]] = rid[starts]
            links = torch.unique(first_range[ch[~starts]] * nr + rid[~starts])
            for f, rid_other in zip((links // nr).tolist(), (links % nr).tolist(), strict=True):
                ra, rb = find(f), find(rid_other)
                if ra != rb:
                    parent[rb] = ra
        root_of_range = [find(r) for r in range(nr)]
        group_ids: dict[int, int] = {}
        for r in range(nr):
            group_ids.setdefault(root_of_range[r], len(group_ids))
        range_group = torch.tensor([group_ids[root_of_range[r]] for r in range(nr)], dtype=torch.long)
        self.group_of_channel = range_group[first_range] if n else torch.empty(0, dtype=torch.long)
        producers: dict[int, list[str]] = {g: [] for g in range(len(group_ids))}
        kinds: dict[int, list[str]] = {g: [] for g in range(len(group_ids))}
        for r in range(nr):
            producers[int(range_group[r])].append(self.range_names[r])
            kinds[int(range_group[r])].append(self.range_kinds[r])
        layers: dict[int, list[str]] = {g: [] for g in producers}
        for s in self.slices:
            if s.atoms.numel():
                g = int(self.group_of_channel[channel_of[s.atoms[0]]])
                owner = s.path.rsplit(".", 1)[0]
                if owner not in layers[g]:
                    layers[g].append(owner)
        self.groups = [
            Group(g, producers[g], layers[g], torch.nonzero(self.group_of_channel == g).flatten(), kinds=kinds[g])
            for g in range(len(group_ids))
        ]
        for atoms, reason in self.frozen:
            if atoms.numel():
                for g in self.group_of_channel[channel_of[atoms]].unique().tolist():
                    if reason not in self.groups[g].frozen:
                        self.groups[g].frozen.append(reason)

    def frozen_channels(self) -> torch.Tensor:
        """Boolean per channel: True where its group is frozen."""
        frozen_groups = torch.tensor([bool(g.frozen) for g in self.groups] or [False], dtype=torch.bool)
        return frozen_groups[self.group_of_channel] if self.num_channels else torch.zeros(0, dtype=torch.bool)

    def frozen_report(self) -> list[FrozenGroup]:
        """Frozen groups with the layers they span and their reasons, for reports and metadata."""
        return [FrozenGroup(g.name, tuple(g.layers) or tuple(g.producers), "; ".join(g.frozen))
                for g in self.groups if g.frozen]




@dataclass(frozen=True)
class KeptView:
    """Which channels thinning keeps, seen from any node of the analysed graph (for ``OpRule.rewrite``)."""

    analysis: ChannelAnalysis
    keep: torch.Tensor  # one bool per channel id

    def info(self, node: Any) -> ChanInfo | None:
        i = self.analysis.infos.get(node.name if isinstance(node, fx.Node) else node)
        return i if isinstance(i, ChanInfo) else None

    def kept_indices(self, node: Any) -> torch.Tensor | None:
        """Indices kept along the tracked dim of ``node``'s output (CPU), None when nothing is tracked."""
        i = self.info(node)
        return None if i is None else torch.nonzero(self.keep[self.analysis.channel_of[i.atoms]]).flatten()

    def kept_count(self, node: Any) -> int | None:
        idx = self.kept_indices(node)
        return None if idx is None else int(idx.numel())

    def width(self, node: Any) -> int | None:
        """The dense width of the tracked dim of ``node``'s output."""
        i = self.info(node)
        return None if i is None else int(i.atoms.numel())


class Speculation:
    """What ``RuleContext.speculate`` yields: ``keep()`` keeps what the block recorded."""

    def __init__(self) -> None:
        self.kept = False

    def keep(self) -> None:
        self.kept = True


class RuleContext:
    """What an op's channel rule sees: the graph, the analysis being built, and helpers to record results.

    A channel rule ``fn(ctx, node)`` reads the channels tracked on its inputs (``ctx.info(x)``), and then
    either records where the output's channels come from (``ctx.output`` / ``ctx.passthrough``), creates
    new ones (``ctx.new_channels``), ties channels together (``ctx.unite``), declares the tensor dims that
    carry them (``ctx.slice_param``), or freezes them with a reason (``ctx.freeze`` / ``ctx.freeze_inputs``).
    It also gives the zero rule: ``fn(zeros, gm) -> bool vector`` (True where the output channel is exactly
    zero, given the zero vectors of earlier nodes, on the CPU).
    """

    def __init__(self, gm: fx.GraphModule, *, strict: bool = False):
        self.gm = gm
        self.strict = strict
        self.analysis = ChannelAnalysis()
        self.modules = dict(gm.named_modules())
        self.param_alias = self._aliases()
        self._order: tuple[fx.Graph, list[fx.Node], dict[fx.Node, int]] | None = None

    def _aliases(self) -> dict[str, str]:
        """Every name of a parameter/buffer -> its canonical (first) name, so tied weights slice once."""
        canonical: dict[int, str] = {}
        alias: dict[str, str] = {}
        for name, t in [*self.gm.named_parameters(remove_duplicate=False), *self.gm.named_buffers(remove_duplicate=False)]:
            alias[name] = canonical.setdefault(id(t), name)
        return alias

    # -- reading ----------------------------------------------------------------------------------------
    def info(self, x: Any) -> ChanInfo | None:
        """The tracked channel dim of an input node, or None when nothing is tracked there."""
        if isinstance(x, fx.Node):
            i = self.analysis.infos.get(x.name)
            return i if isinstance(i, ChanInfo) else None
        return None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def param(self, path: str) -> torch.Tensor | None:
        """The parameter or buffer at ``path``, or None when there is none."""
        owner, _, attr = path.rpartition(".")
        mod = self.modules.get(owner)
        t = getattr(mod, attr, None) if mod is not None else None
        return t if isinstance(t, torch.Tensor) else None

    def graph_order(self, graph: fx.Graph) -> tuple[list[fx.Node], dict[fx.Node, int]]:
        """The nodes of ``graph`` in order and the position of each (listed once per graph)."""
        if self._order is None or self._order[0] is not graph:
            nodes = list(graph.nodes)
            self._order = (graph, nodes, {n: k for k, n in enumerate(nodes)})
        return self._order[1], self._order[2]

    def tracked_inputs(self, node: fx.Node) -> list[fx.Node]:
        # A split's tuple (a list of infos) counts: the getitem nodes that read it carry its channels.
        return [x for x in node.all_input_nodes if self.analysis.infos.get(x.name) is not None]

    # -- recording --------------------------------------------------------------------------------------
    def new_channels(self, n: int, name: str, kind: str) -> torch.Tensor:
        """Atoms for ``n`` new channels created by layer ``name``; ``kind`` is "conv", "linear" or "other"."""
        return self.analysis.new_atoms(n, name, kind)

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.analysis.unite(a, b)

    def freeze(self, atoms: torch.Tensor, reason: str) -> None:
        self.analysis.freeze(atoms, reason)

    def exit(self, x: fx.Node) -> None:
        """``x``'s values enter an op that sums over its channels: a channel may go only where it is zero here."""
        self.analysis.exits.append(x.name)

    def rewrite_sizes(self, node: fx.Node) -> None:
        """``node`` holds literal sizes that count channels (view, reshape, split): thinning rewrites them."""
        self.analysis.reshapes.append(node.name)

    def grouped_conv(self, node: fx.Node, module: str, groups: int, out_atoms: torch.Tensor) -> None:
        self.analysis.grouped.append(GroupedConv(node.name, module, groups, out_atoms))

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        """Freeze every channel that flows into ``node``."""
        for x in node.all_input_nodes:
            i = self.info(x)
            if i is not None:
                self.freeze(i.atoms, reason)
            elif isinstance(self.analysis.infos.get(x.name), list):  # a split's tuple reaching an unknown op
                for part in self.analysis.infos[x.name]:
                    if part is not None:
                        self.freeze(part.atoms, reason)

    def block(self, path: str, dim: int, node: fx.Node) -> None:
        self.analysis.block_slice(self.param_alias.get(path, path), dim,
                                  f"'{path}' is shared with node '{node.name}', whose input channels cannot be sliced")

    def slice_param(self, path: str, dim: int, atoms: torch.Tensor, role: str, node: fx.Node) -> None:
        """Parameter or buffer ``path`` carries ``atoms`` along ``dim``: thinning slices it there. ``role`` is
        "producer", "bias", "norm" (zeroed by structured schemes with the channel) or "consumer" (only sliced)."""
        self.analysis.add_slice(self.param_alias.get(path, path), dim, atoms, role, node.name)

    def output(self, node: fx.Node, info: Any, rule: ZeroRule | None) -> None:
        """Record the node's tracked channels (``ChanInfo``, a list for a split, or None) and its zero rule."""
        self.analysis.infos[node.name] = info
        if rule is not None:
            self.analysis.rules[node.name] = rule

    def passthrough(self, node: fx.Node, src: Any, zero_preserving: bool, dim: int | None = None) -> None:
        """The output carries ``src``'s channels (on ``dim``, default the same); zeros stay zero when
        ``zero_preserving`` (``f(0) == 0``), otherwise they may not."""
        i = self.info(src)
        if i is None:
            return self.output(node, None, None)
        info = ChanInfo(i.dim if dim is None else dim, i.atoms)
        name = src.name
        if zero_preserving:
            self.output(node, info, lambda z, gm: z[name])
        else:
            self.output(node, info, lambda z, gm: torch.zeros_like(z[name]))

    def unknown(self, node: fx.Node, what: str) -> None:
        """An op the analysis has no rule for: freeze what flows in (``strict=True``: raise)."""
        if self.strict:
            raise UnknownOpError(_strict_message(node, what))
        self.freeze_inputs(node, f"{what} at node '{node.name}' is not known to the channel analysis")
        self.output(node, None, None)

    def unsupported(self, node: fx.Node, what: str) -> None:
        """A known op used in a form that cannot be thinned (advanced indexing, a reshape that mixes the
        channel dim): freeze what flows in, with the reason. Not an error in strict mode."""
        self.freeze_inputs(node, f"{what} at node '{node.name}' cannot be thinned")
        self.output(node, None, None)

    @contextmanager
    def speculate(self) -> Iterator[Speculation]:
        """Visits that may be undone: everything the analysis records inside the block is rewound on leaving
        it, unless the block called ``keep()`` on what it was given (an exception rewinds too).

        Example (a rule trying a reading of its inputs that may not hold)::

            with ctx.speculate() as attempt:
                ctx.visit(other)
                if ctx.info(x) is not None:
                    attempt.keep()
        """
        state = self.analysis.state()
        attempt = Speculation()
        try:
            yield attempt
        finally:
            if not attempt.kept:
                self.analysis.rewind(state)

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            return self.output(node, None, None)
        if node.op == "output":
            self.freeze_inputs(node, f"reaches the graph output ('{node.name}')")
            return None
        module = self.modules.get(node.target) if node.op == "call_module" else None
        rule = registry.rule_for(node, module)
        if not self.tracked_inputs(node) and not registry.creates(rule, node):
            # Nothing tracked flows in and nothing is produced: shape arithmetic, constants, ...
            return self.output(node, None, None)
        if rule is None:
            return self.unknown(node, _op_text(node, self.modules))
        for refinement in rule.refinements:  # special cases other families know, before the op's own rule
            if refinement.channels(self, node):
                return None
        if rule.channels == "elementwise":
            return self._elementwise(node, rule)
        if rule.channels == "freeze":
            self.freeze_inputs(node, f"{_op_text(node, self.modules)} at node '{node.name}' keeps its channels "
                                     f"(rule '{rule.name}')")
            return self.output(node, None, None)
        return rule.channels(self, node)

    def _elementwise(self, node: fx.Node, rule: registry.OpRule) -> None:
        """The "elementwise" preset: channels pass through from the first tracked input; the module
        parameters the rule names are sliced with them."""
        x = next((a for a in node.all_input_nodes if self.info(a) is not None), None)
        i = self.info(x)
        if i is None:
            return self.unknown(node, f"{_op_text(node, self.modules)} with a split tuple as input")
        if rule.params:
            for pname, dim in rule.params.items():
                if self.param(f"{node.target}.{pname}") is not None:
                    self.slice_param(f"{node.target}.{pname}", dim, i.atoms, "norm", node)
        zeros = rule.zeros
        preserving = zeros(node) if callable(zeros) else zeros == "preserve"
        self.passthrough(node, x, preserving)

def _op_text(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}".replace(" .", " ")


def _source_line(node: fx.Node) -> str:
    """The innermost frame of the node's recorded stack outside torch and fxcondensa: the user's line."""
    trace = node.stack_trace or node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    found = "source line unknown"
    for k, line in enumerate(lines):
        if line.startswith("File ") and not any(d in line for d in _LIBRARY_DIRS):
            code = lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File ") else ""
            found = f"{line}: {code}".rstrip(": ")
    return found


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _strict_message(node: fx.Node, what: str) -> str:
    target = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
    return (f"strict=True: {what} at node '{node.name}' ({node.op} {target}; {_source_line(node)}) is not known "
            "to the channel analysis. Teach it the op with fxcondensa.register_rule(<the module class, function or "
            "method name>, channels='elementwise', zeros='preserve' or 'fill', ...) (see the README, 'Teaching thin "
            "a new op'), make the module a leaf and register it, or call without strict=True to keep these "
            "channels whole.")
