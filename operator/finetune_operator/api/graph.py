"""The stage graph: what each training stage starts from, and what the pipeline ends with.

Stages run in list order; each starts from the *result* of one earlier stage (or from the base model):

* ``startFrom`` names it explicitly: ``base``, or the name of an earlier stage;
* by default a stage starts from the nearest earlier stage that is not ``rm`` (the base model for the first):
  today's linear chaining, except that a reward model is never stacked into a policy. An ``rm`` stage's output
  is a value head plus (for LoRA) an adapter scoring answers; only a ``ppo`` stage consumes it (``rewardModel``).

A stage's result is a model plus the LoRA adapters to apply on it, in order:

* LoRA after LoRA stacks adapters (the new stage trains a fresh adapter on the merged earlier ones);
* a stage that cannot stack (``qlora``: 4-bit base; ZeRO-3: partitioned weights) continues the single adapter
  it starts from, and its output replaces that adapter;
* a full/freeze stage's output is a whole model (the adapter list restarts); it cannot start from adapters.

The merge (and serving) takes the result of ``merge.stage`` when given, else of the last stage that is not
``rm``. Because references point only backwards, the graph cannot have cycles.

This module is pure and works on :class:`Node` values, so that validation (on the raw, possibly invalid
object, reporting every problem with its path) and the renderer (on the typed model) walk the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: ``startFrom: base``: the base model (``spec.model``), no adapters.
BASE = "base"
#: Stage types whose output is not a policy (never chained or merged unless named).
NON_POLICY_TYPES: frozenset[str] = frozenset({"rm"})
ADAPTER_METHODS: frozenset[str] = frozenset({"lora", "qlora"})


@dataclass(frozen=True)
class Node:
    """What the graph needs to know about one stage."""

    index: int
    name: str
    type: str
    method: str = "lora"
    #: LLaMA-Factory cannot stack a new adapter for this stage (qlora, ZeRO-3): it continues the one it starts from.
    continues: bool = False
    rank: int = 8
    start_from: str | None = None


@dataclass(frozen=True)
class Result:
    """A model and the adapters to apply to it, as stage indices."""

    #: Index of the full/freeze stage whose output is the model; None: the base model.
    model: int | None = None
    adapters: tuple[int, ...] = ()
    #: LoRA rank of each adapter (vLLM's --max-lora-rank).
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Start:
    """What one stage loads, and how."""

    #: Index of the stage it starts from; None: the base model.
    source: int | None
    loads: Result
    #: Train a fresh adapter on top of ``loads.adapters`` (False: continue the single one, or no adapters).
    create_new_adapter: bool


@dataclass(frozen=True)
class GraphError:
    """A problem found while walking: the stage index, the stage field, the reason."""

    index: int
    field: str
    message: str


@dataclass
class Graph:
    """The walked graph."""

    nodes: list[Node]
    starts: dict[int, Start] = field(default_factory=dict)
    results: dict[int, Result] = field(default_factory=dict)
    errors: list[GraphError] = field(default_factory=list)

    def by_name(self, name: str) -> Node | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def final(self, stage: str | None = None) -> Result:
        """What the merge and serving use: the result of ``stage`` (``merge.stage``), else of the last policy
        stage, else of the last stage."""
        if stage is not None:
            node = self.by_name(stage)
            if node is not None and node.index in self.results:
                return self.results[node.index]
        policy = [n for n in self.nodes if n.type not in NON_POLICY_TYPES]
        pick = policy[-1] if policy else (self.nodes[-1] if self.nodes else None)
        return self.results.get(pick.index, Result()) if pick is not None else Result()


def default_source(nodes: Sequence[Node], position: int) -> int | None:
    """The nearest earlier stage that is not rm (None: the base model)."""
    for node in reversed(nodes[:position]):
        if node.type not in NON_POLICY_TYPES:
            return node.index
    return None


def resolve_earlier(nodes: Sequence[Node], position: int, name: str, what: str) -> tuple[int | None, str | None]:
    """The index of the stage ``name`` that stage ``nodes[position]`` refers to, or an error message."""
    me = nodes[position]
    if name == me.name:
        return None, f"{what} {name!r} is this stage itself (a cycle): name an earlier stage"
    for node in nodes[:position]:
        if node.name == name:
            return node.index, None
    if any(n.name == name for n in nodes[position + 1 :]):
        return None, f"{what} {name!r} runs after this stage (stages run in list order): name an earlier stage"
    known = ", ".join(repr(n.name) for n in nodes[:position]) or "none"
    return None, f"{what} {name!r} is not a stage of this job (earlier stages: {known})"


def walk(nodes: Sequence[Node]) -> Graph:
    """Each stage's start and result (see the module docstring); problems become :class:`GraphError`s and the
    walk goes on from the base model, so that every problem is reported at once."""
    graph = Graph(nodes=list(nodes))
    for pos, node in enumerate(nodes):
        source: int | None
        if node.start_from is None:
            source = default_source(nodes, pos)
        elif node.start_from == BASE:
            source = None
            if any(n.name == BASE for n in nodes):
                graph.errors.append(
                    GraphError(node.index, "startFrom", "ambiguous: 'base' is also a stage name; rename that stage")
                )
        else:
            source, problem = resolve_earlier(nodes, pos, node.start_from, "startFrom")
            if problem is not None:
                graph.errors.append(GraphError(node.index, "startFrom", problem))
        inp = graph.results.get(source, Result()) if source is not None else Result()
        if node.method not in ADAPTER_METHODS:
            if inp.adapters:
                graph.errors.append(
                    GraphError(
                        node.index,
                        "method",
                        f"a {node.method} stage cannot start from the LoRA adapters of earlier stages (LLaMA-Factory "
                        "loads adapters only for LoRA training): use method lora, or put full/freeze stages first "
                        "(or start it from a full model with startFrom)",
                    )
                )
            graph.starts[node.index] = Start(source, Result(inp.model), create_new_adapter=False)
            graph.results[node.index] = Result(model=node.index)
        elif inp.adapters and node.continues:
            if len(inp.adapters) != 1:
                why = "qlora (4-bit base)" if node.method == "qlora" else "ZeRO-3"
                graph.errors.append(
                    GraphError(
                        node.index,
                        "method",
                        f"a {why} stage can only continue a single earlier adapter (LLaMA-Factory cannot create a "
                        f"new adapter upon a quantized or partitioned model), but {len(inp.adapters)} are stacked "
                        "before it",
                    )
                )
            graph.starts[node.index] = Start(source, inp, create_new_adapter=False)
            graph.results[node.index] = Result(inp.model, (node.index,), (max(node.rank, *inp.ranks),))
        else:
            graph.starts[node.index] = Start(source, inp, create_new_adapter=bool(inp.adapters))
            graph.results[node.index] = Result(inp.model, (*inp.adapters, node.index), (*inp.ranks, node.rank))
    return graph
