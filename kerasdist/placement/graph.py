"""A Keras model's layer graph, seen as a chain of stages.

Sequential and functional models record how their layers connect
(`Functional._nodes_by_depth`; every `Node` knows its operation, its input
tensors and its output tensors). Any contiguous run of the nodes in
execution order can be a stage: what crosses a cut is every tensor produced
before it and consumed after it, so a cut may carry several tensors (for
instance a residual branch). This module finds those nodes, checks that an
assignment of layers to stages is such a chain, and runs one stage on
concrete tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
from keras import tree

from kerasdist import _internals


def functional_of(model) -> keras.Model:
    """Returns the functional graph behind `model`.

    Args:
        model: keras.Model. A built Sequential model or a functional model.

    Returns:
        The functional model whose nodes describe `model`'s computation
        (`model` itself, or a built Sequential model's inner graph).

    Raises:
        ValueError: if `model` is not a keras.Model, is a Sequential model
            without a known input shape, or is a subclassed model (its
            layer graph is not visible).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Invalid value for argument `model`. "
            f"Received: model={model!r}. Expected a keras.Model "
            "(Sequential or functional)."
        )
    if isinstance(model, keras.Sequential):
        # Keras 3 keeps a built Sequential model's graph in `_functional`
        # (keras/src/models/sequential.py, `build`).
        functional = _internals.sequential_graph(model)
        if functional is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no known input shape, "
                "so its layer graph cannot be split. Start it with "
                "keras.Input(shape) or call model.build(input_shape) first."
            )
        return functional
    if _internals.has_layer_graph(model):
        return model
    raise ValueError(
        f"Model {model.name!r} of type {type(model).__name__} is a "
        "subclassed model: its layer graph is not visible, so it cannot be "
        "split into stages. Build it as a functional model "
        "(keras.Model(inputs, outputs)) or a Sequential model."
    )


@dataclasses.dataclass
class StageGraph:
    """The part of the graph one stage runs.

    Attributes:
        index: int. Position of the stage in the chain.
        operations: list of keras.Operation run by the stage, in order.
        nodes: list of Node, in execution order.
        inputs: list of int. Ids of the tensors the stage receives (model
            inputs or outputs of earlier stages).
        outputs: list of int. Ids of the tensors the stage produces that
            later stages or the model's outputs use.
    """

    index: int
    operations: list
    nodes: list
    inputs: list[int]
    outputs: list[int]


class LayerGraph:
    """The nodes of a Sequential/functional model in execution order.

    Args:
        model: keras.Model. A built Sequential or functional model.

    Raises:
        ValueError: see `functional_of`.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.functional = functional_of(model)
        f = self.functional
        self.nodes = []
        by_depth = _internals.nodes_by_depth(f)
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if node.operation is None or node.is_input:
                    continue
                self.nodes.append(node)
        # Operations in the order of their first node (a topological order
        # for operations used once).
        self.operations = []
        seen = set()
        for node in self.nodes:
            if id(node.operation) not in seen:
                seen.add(id(node.operation))
                self.operations.append(node.operation)
        self.input_ids = [id(t) for t in f.inputs]
        self.output_ids = [id(t) for t in f.outputs]
        self.tensors = {}
        for t in f.inputs:
            self.tensors[id(t)] = t
        for node in self.nodes:
            for t in node.outputs:
                self.tensors[id(t)] = t
        input_layers = {id(_internals.producing_layer(t)) for t in f.inputs}
        self.layers = [
            layer for layer in f.layers if id(layer) not in input_layers
        ]

    def stages(self, assignment: Mapping[str, int]) -> list[StageGraph]:
        """Splits the nodes by an operation-name → stage assignment.

        Args:
            assignment: mapping of operation name to stage index (0-based).
                Every operation of the graph must be assigned.

        Returns:
            list of StageGraph, one per stage index 0..max.

        Raises:
            ValueError: if an operation is unassigned, a stage is empty, or
                a stage uses a tensor that only a later stage produces (the
                stages are not a chain).
        """
        missing = [
            op.name for op in self.operations if op.name not in assignment
        ]
        if missing:
            raise ValueError(
                f"The plan does not cover layer(s) {missing} of model "
                f"{self.model.name!r}. Was it made for another model?"
            )
        num_stages = max(assignment[op.name] for op in self.operations) + 1
        stage_of_tensor = {i: -1 for i in self.input_ids}
        nodes = [[] for _ in range(num_stages)]
        ops = [[] for _ in range(num_stages)]
        for op in self.operations:
            ops[assignment[op.name]].append(op)
        for node in self.nodes:
            s = assignment[node.operation.name]
            for t in node.input_tensors:
                producer = stage_of_tensor.get(id(t))
                if producer is None:
                    raise ValueError(
                        "Graph error: tensor consumed before it is produced "
                        f"at layer {node.operation.name!r}."
                    )
                if producer > s:
                    raise ValueError(
                        f"Invalid plan: layer {node.operation.name!r} "
                        f"(stage {s}) uses the output of "
                        f"{_internals.producing_layer(t).name!r} "
                        f"(stage {producer}). "
                        "Stages must form a chain: a layer may only use "
                        "tensors from its own or earlier stages."
                    )
            for t in node.outputs:
                stage_of_tensor[id(t)] = s
            nodes[s].append(node)
        empty = [s for s in range(num_stages) if not nodes[s]]
        if empty:
            raise ValueError(f"Invalid plan: stage(s) {empty} have no layers.")
        result = []
        for s in range(num_stages):
            produced, consumed = [], []
            for node in nodes[s]:
                for t in node.input_tensors:
                    if stage_of_tensor[id(t)] != s and id(t) not in consumed:
                        consumed.append(id(t))
                produced.extend(id(t) for t in node.outputs)
            later = set(self.output_ids)
            for node in self.nodes:
                if assignment[node.operation.name] > s:
                    later.update(id(t) for t in node.input_tensors)
            outputs = [t for t in produced if t in later]
            result.append(StageGraph(s, ops[s], nodes[s], consumed, outputs))
        return result

    def flat_inputs(self, x) -> list:
        """Flattens model inputs `x` in the order of the graph's inputs."""
        return _internals.standardize_inputs(self.functional, x)

    def pack_outputs(self, flat: Sequence):
        """Packs flat output values into the model's output structure."""
        out = tree.pack_sequence_as(
            _internals.outputs_structure(self.functional), flat
        )
        if isinstance(out, (list, tuple)) and len(out) == 1:
            return out[0]
        return out


def call_operation(operation, training, /, *args, **kwargs):
    """Calls `operation` passing `training` when it accepts it.

    Mirrors `keras/src/models/functional.py` `operation_fn`, which injects
    the call-context arguments a functional model receives. Positional-only
    parameters: a node's own keyword arguments may hold `training` (e.g.
    Dropout in a Sequential model); the pipeline's phase replaces it.
    """
    if training is not None and "training" in _internals.call_context_args(
        operation
    ):
        kwargs["training"] = training
    return operation(*args, **kwargs)


def run_nodes(nodes: Sequence, values: dict, training=None) -> None:
    """Runs `nodes` in order, reading and adding tensors in `values`.

    Args:
        nodes: sequence of Node, in execution order.
        values: dict mapping a symbolic tensor's id to its value; every
            node's inputs must be present. Outputs are added.
        training: bool or None. Passed to layers that take `training`.
    """
    for node in nodes:
        args, kwargs = node.arguments.fill_in(values)
        outputs = call_operation(node.operation, training, *args, **kwargs)
        for t, value in zip(node.outputs, tree.flatten(outputs), strict=False):
            values[id(t)] = value
