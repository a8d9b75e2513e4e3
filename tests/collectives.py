"""Test helper: what a traced tf.function sends over the wire.

Only tests need this, so it lives here rather than in the package; its
private TF uses are checked by the canaries below, which
`tests/test_internals.py` runs beside the package's own.
"""

from __future__ import annotations

from typing import Any

from kerasdist._internals import Canary

__all__ = ["CANARIES", "collective_dtypes"]


def collective_dtypes(tf_function: Any) -> list[str]:
    """dtypes of the `CollectiveReduceV2` ops in traced tf.functions.

    Walks every concrete function of `tf_function` (and of the
    tf.functions it closes over: Keras's `train_function` is a Python
    closure over one) and the functions nested in their graphs. Used by
    the tests of gradient compression to see what goes over the wire.
    `Function._list_all_concrete_functions` (tensorflow/python/eager/
    polymorphic_function/polymorphic_function.py) and `Graph._functions`
    (tensorflow/python/framework/ops.py) are private.

    Args:
        tf_function: a `tf.function`, or a Python function closing over
            some.

    Returns:
        sorted list of dtype names, one per collective op.

    Example:

    >>> import tensorflow as tf
    >>> collective_dtypes(tf.function(lambda: tf.constant(1)))
    []
    """
    seen: set[int] = set()
    out: list[str] = []

    def walk(graph):
        for op in graph.get_operations():
            if op.type == "CollectiveReduceV2":
                out.append(op.get_attr("T").name)
        for fn in getattr(graph, "_functions", {}).values():
            g = getattr(fn, "graph", None)
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                walk(g)

    functions = [tf_function] + [
        c.cell_contents for c in (getattr(tf_function, "__closure__", None)
                                  or ())
    ]
    for fn in functions:
        for concrete in getattr(fn, "_list_all_concrete_functions", list)():
            walk(concrete.graph)
    return sorted(out)


CANARIES = [
    Canary("tensorflow.python.eager.polymorphic_function."
           "polymorphic_function:Function", "_list_all_concrete_functions",
           "collective_dtypes"),
    Canary("tensorflow.python.framework.ops:Graph", "_functions",
           "collective_dtypes"),
]
