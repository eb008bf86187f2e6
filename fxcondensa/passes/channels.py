"""The channel-analysis walk: every node of the graph, in order, through the rule the registry holds for it.

The data model and the API rules are written against (``RuleContext``, ``ChanInfo``, ...) live below, in
``fxcondensa.rules.api``; this walker only adds the loop and what happens when a rule fails.
"""

from __future__ import annotations

import torch.fx as fx

from ..capture.records import node_record
from ..errors import RuleFailedError, UnknownOpError
from ..rules import registry
from ..rules.api import ChannelAnalysis, RuleContext, _op_text, _source_line

__all__ = ["ChannelWalker"]


class ChannelWalker(RuleContext):
    """A ``RuleContext`` that walks the whole graph: ``ChannelWalker(gm).run()`` is the analysis."""

    # -- the walk ---------------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except UnknownOpError:
                raise
            except Exception as exc:  # never crash on an op we misjudged: freeze what flows into it
                rule = self._rule_name(node)
                if self.strict:
                    raise RuleFailedError(_failed_message(node, rule, _op_text(node, self.modules), exc)) from exc
                self.analysis.rule_failures.append(f"{node.name}: {rule}: {type(exc).__name__}: {exc}")
                self.freeze_inputs(node, f"analysis failed at node '{node.name}' ({rule} raised "
                                         f"{type(exc).__name__}: {exc})")
                self.output(node, None, None)
            node_record(node).chan = self.analysis.infos.get(node.name)
        self.analysis.finalize()
        return self.analysis

    def _rule_name(self, node: fx.Node) -> str:
        """"rule 'mul'" for the registry entry that handles ``node`` (a failure names the rule that raised)."""
        try:
            rule = registry.rule_for(node, self.modules.get(node.target) if node.op == "call_module" else None)
        except Exception:
            rule = None
        return f"rule '{rule.name}'" if rule is not None else "the walker"


def _failed_message(node: fx.Node, rule: str, op: str, exc: BaseException) -> str:
    target = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
    first = (str(exc).strip().splitlines() or [""])[0]
    return (f"strict=True: {rule} for {op} at node '{node.name}' ({node.op} {target}; {_source_line(node)}) failed: "
            f"{type(exc).__name__}: {first}. The op is known, but its rule does not handle this call. Call without "
            "strict=True to keep the channels that flow into it whole (counted in thin_record(...).rule_failures), "
            "or replace the rule with fxcondensa.register_rule(<the op>, ..., replace=True).")
