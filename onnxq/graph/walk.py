"""Every node and value of a model: the main graph, the bodies of If/Loop/Scan (recursively) and the
local functions with their bodies. Passes and checks that must see all of a model walk it through here."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def all_values(model: ir.Model) -> Iterator[ir.Value]:
    """Graph inputs and initializers of every graph, and every node output."""
    for graph in model.graphs():
        yield from graph.inputs
        yield from graph.initializers.values()
    for node in all_nodes(model):
        yield from node.outputs
