"""One match-result convention for the passes' matchers (after onnxscript's rewriter MatchResult):
a matcher returns a MatchResult, truthy on success and carrying what it found, or falsy and
carrying the reason for the miss and the node it failed at, so that every miss reaches the report
in the same words. A match also names the linear layers it takes (`claims`): the pass that
rewrites it leaves them to no other match; passes run in registration order (passes/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from mfconvert.passes.graph import node_label


class Miss(Exception):
    """Raised inside a matcher to stop at the first failed check; `failed` turns it into a
    MatchResult. `node` is where the check failed (None: the candidate as a whole)."""

    def __init__(self, reason: str, node: gs.Node | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclass
class MatchResult:
    value: Any = None                   # what the matcher found (None on a miss)
    reason: str = ""                    # why not, on a miss
    node: gs.Node | None = None         # where the miss happened, when it is one node
    claims: list[gs.Node] = field(default_factory=list)   # linear nodes the match takes
    quiet: bool = False                 # a miss that is no candidate at all: no report line

    def __bool__(self) -> bool:
        return not self.reason

    def message_for(self, candidate: str = "") -> str:
        """The reason as the report shows it on the row of `candidate`, naming the node it failed
        at when that is another node and the reason does not already."""
        if self.node is None:
            return self.reason
        label = node_label(self.node)
        if label == candidate or f"'{label}'" in self.reason:
            return self.reason
        return f"{self.reason} (at {self.node.op} '{label}')"

    @property
    def message(self) -> str:
        return self.message_for()


def matched(value: Any, claims: list[gs.Node] | None = None) -> MatchResult:
    return MatchResult(value, claims=list(claims or []))


def failed(reason: str | Miss, node: gs.Node | None = None) -> MatchResult:
    if isinstance(reason, Miss):
        return MatchResult(reason=reason.reason or "no match", node=reason.node)
    return MatchResult(reason=reason or "no match", node=node)


def fake_quant_source(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(x, [Q, DQ]) when t = DequantizeLinear(QuantizeLinear(x)) on an activation (a QDQ model's
    fake quantisation: the identity up to rounding), else None."""
    dq = t.inputs[0] if t.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs[0].inputs:
        return None
    q = dq.inputs[0].inputs[0]
    if q.op != "QuantizeLinear" or isinstance(q.inputs[0], gs.Constant) or not q.inputs[0].inputs \
            or len(q.outputs[0].outputs) != 1:
        return None
    return q.inputs[0], [q, dq]


def fake_quant_user(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(y, [Q, DQ]) when t's one reader is QuantizeLinear and its one reader DequantizeLinear."""
    users = [u for u in t.outputs if u.op != "Shape"]
    if len(users) != 1 or users[0].op != "QuantizeLinear":
        return None
    q = users[0]
    nxt = list(q.outputs[0].outputs)
    if len(nxt) != 1 or nxt[0].op != "DequantizeLinear":
        return None
    return nxt[0].outputs[0], [q, nxt[0]]
