"""Channel dependency analysis: which tensor dimensions must be pruned together, and which cannot be.

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

Everything is recorded in plain data on the ``ChannelAnalysis`` and in ``node.meta["fxcondensa"]["chan"]``;
the thinning pass and the structured schemes read it, neither reaches back into this module's internals.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

__all__ = ["ChanInfo", "TensorSlice", "GroupedConv", "Group", "ChannelAnalysis", "analyze", "zero_channels"]



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
    reshapes: list[str] = field(default_factory=list)
    blocked: dict[tuple[str, int], str] = field(default_factory=dict)  # view/reshape/split nodes with literal sizes to rewrite
    # filled by finalize()
    channel_of: torch.Tensor | None = None  # atom -> channel id
    num_channels: int = 0
    groups: list[Group] = field(default_factory=list)
    group_of_channel: torch.Tensor | None = None

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
        uniq, channel_of = torch.unique(label, return_inverse=True)
        self.channel_of = channel_of
        self.num_channels = int(uniq.numel())
        range_of = torch.tensor(self.range_of, dtype=torch.long)
        # Groups: ranges that share a channel are one group.
        nr = len(self.range_names)
        parent = list(range(nr))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        first_range = torch.full((self.num_channels,), -1, dtype=torch.long)
        pairs = torch.stack([channel_of, range_of], 1).unique(dim=0) if n else torch.empty(0, 2, dtype=torch.long)
        for ch, rid in pairs.tolist():
            f = int(first_range[ch])
            if f < 0:
                first_range[ch] = rid
            else:
                ra, rb = find(f), find(rid)
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

    def frozen_report(self) -> list[dict[str, Any]]:
        """Frozen groups as plain data: ``{"group", "layers", "reason"}``, for reports and metadata."""
        return [{"group": g.name, "layers": list(g.layers) or list(g.producers), "reason": "; ".join(g.frozen)}
                for g in self.groups if g.frozen]

    def channels(self, atoms: torch.Tensor) -> torch.Tensor:
        return self.channel_of[atoms]


def analyze(gm: fx.GraphModule) -> ChannelAnalysis:
    """Channel dependency analysis of a traced, shape-annotated ``GraphModule``.

    Writes each node's tracked channel dim (``ChanInfo`` or None) to ``node.meta["fxcondensa"]["chan"]``
    and returns the ``ChannelAnalysis`` with groups, slices and frozen reasons.

    Example:
        >>> import torch, fxcondensa
        >>> from fxcondensa.passes.channels import analyze
        >>> gm = fxcondensa.trace(fxcondensa.models.LeNet5(), torch.randn(1, 1, 28, 28))
        >>> a = analyze(gm)
        >>> [(g.name, g.channels.numel(), g.frozen) for g in a.groups][:2]
        [('conv1', 20, []), ('conv2', 50, [])]
    """
    cached = _CACHE.get(gm)
    if cached is not None and cached[0] == _graph_key(gm):
        return cached[1]
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("analyze needs shape metadata: trace the model with example inputs "
                         "(fxcondensa.trace(model, example_inputs))")
    analysis = _Analyzer(gm).run()
    # Schemes and thin analyse the same graph in turn; the result depends on structure and shapes only
    # (zero rules read the weights when they run), so it is kept until the graph changes.
    _CACHE[gm] = (_graph_key(gm), analysis)
    return analysis


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_key(gm: fx.GraphModule) -> tuple:
    return tuple((n.name, n.op, str(n.target), id(n.meta.get("tensor_meta"))) for n in gm.graph.nodes)


@torch.no_grad()
def zero_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, Any]:
    """For each tracked node, a bool vector: True where that channel is identically zero (eval mode)."""
    zeros: dict[str, Any] = {}
    for node in gm.graph.nodes:
        rule = analysis.rules.get(node.name)
        if rule is not None:
            zeros[node.name] = rule(zeros, gm)
    return zeros


def removable_channels(gm: fx.GraphModule, analysis: ChannelAnalysis) -> torch.Tensor:
    """Bool per channel: True where the channel is zero at every exit and its group is not frozen."""
    zeros = zero_channels(gm, analysis)
    live = torch.zeros(analysis.num_channels, dtype=torch.bool)
    for name in analysis.exits:
        info = analysis.infos[name]
        live[analysis.channel_of[info.atoms[~zeros[name]]]] = True
    return ~live & ~analysis.frozen_channels()


# The op rules live in channel_rules.py; imported last because they build on the classes above.
from .channel_rules import Analyzer as _Analyzer  # noqa: E402
