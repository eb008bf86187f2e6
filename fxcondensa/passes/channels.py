"""The channel-analysis walk: every node of the graph, in order, through the rule the registry holds for it.

The data model and the API rules are written against (``RuleContext``, ``ChanInfo``, ...) live below, in
``fxcondensa.rules.api``; this walker only adds the loop and what happens when a rule fails.
"""

from __future__ import annotations

from ..capture.records import node_record
from ..errors import UnknownOpError
from ..rules.api import ChannelAnalysis, RuleContext, _op_text, _strict_message

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
                if self.strict:
                    raise UnknownOpError(_strict_message(
                        node, f"the rule for {_op_text(node, self.modules)} raised {type(exc).__name__}: {exc}")) from exc
                self.analysis.rule_failures.append(f"{node.name}: {type(exc).__name__}: {exc}")
                self.freeze_inputs(node, f"analysis failed at node '{node.name}' ({type(exc).__name__}: {exc})")
                self.output(node, None, None)
            node_record(node).chan = self.analysis.infos.get(node.name)
        self.analysis.finalize()
        return self.analysis
