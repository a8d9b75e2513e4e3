"""Tests for kd.placement.plan: balance, memory estimate, manual plans,
transfer time at the cuts."""

import itertools

import keras
import numpy as np
import pytest

import kerasdist as kd
from kerasdist.placement import graph as graph_lib
from kerasdist.placement import planning as plan_lib

CPUS = ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


def mlp(widths, name="mlp", input_dim=8):
    return keras.Sequential(
        [keras.Input((input_dim,))]
        + [keras.layers.Dense(w, name=f"d{i}") for i, w in enumerate(widths)],
        name=name,
    )


def skip_model():
    """x -> d0 -> d1 -> d2; add(d0, d2) -> out: a skip over d1, d2."""
    i = keras.Input((8,), name="x")
    a = keras.layers.Dense(16, activation="relu", name="d0")(i)
    b = keras.layers.Dense(16, activation="relu", name="d1")(a)
    c = keras.layers.Dense(16, name="d2")(b)
    s = a + c  # a non-layer operation
    o = keras.layers.Dense(3, name="out")(s)
    return keras.Model(i, o, name="skip")


def test_memory_estimate_matches_hand_computation():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="hidden"),
            keras.layers.Dense(4, name="logits"),
        ],
        name="tiny",
    )
    p = kd.placement.plan(
        model,
        2,
        devices=CPUS[:2],
        batch_size=8,
        num_microbatches=2,
        optimizer="adam",
    )
    s0, s1 = p.stages
    # hidden: 8*16 + 16 = 144 float32 parameters = 576 bytes; Adam keeps
    # 2 slots per parameter = 1152 bytes; a micro-batch of 8/2 = 4 examples
    # of 16 float32 outputs = 256 bytes.
    assert (s0.layers, s0.params, s0.param_bytes) == (("hidden",), 144, 576)
    assert (s0.slot_bytes, s0.activation_bytes) == (1152, 256)
    # logits: 16*4 + 4 = 68 parameters = 272 bytes; slots 544; 4*4*4 = 64.
    assert (s1.layers, s1.params, s1.param_bytes) == (("logits",), 68, 272)
    assert (s1.slot_bytes, s1.activation_bytes) == (544, 64)
    assert p.microbatch_size == 4 and p.optimizer_slots == 2
    table = str(p)
    rows = table.splitlines()
    assert "stage" in rows[1] and "activations/micro-batch" in rows[1]
    assert rows[3].split() == [
        "0",
        "CPU:0",
        "hidden",
        "144",
        "576",
        "B",
        "1.1",
        "KiB",
        "256",
        "B",
        "256",  # the hidden layer's output goes on to stage 1
        "B",
    ]
    assert rows[4].split() == [
        "1",
        "CPU:1",
        "logits",
        "68",
        "272",
        "B",
        "544",
        "B",
        "64",
        "B",
        "0",  # the last stage sends nothing on
        "B",
    ]


@pytest.mark.parametrize(
    "optimizer, slots",
    [
        ("sgd", 0),
        (keras.optimizers.SGD(momentum=0.9), 1),
        ("rmsprop", 1),
        ("adam", 2),
        (keras.optimizers.Adam(amsgrad=True), 3),
    ],
)
def test_optimizer_slots(optimizer, slots):
    assert plan_lib.optimizer_slots(optimizer) == slots


def test_partition_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = list(rng.integers(0, 50, size=rng.integers(3, 9)))
        for k in range(1, min(4, len(costs)) + 1):
            cuts = plan_lib.partition(costs, k)
            bounds = [0, *cuts, len(costs)]
            assert len(cuts) == k - 1 and all(
                lo < hi for lo, hi in zip(bounds, bounds[1:], strict=False)
            )
            got = max(
                sum(costs[lo:hi])
                for lo, hi in zip(bounds, bounds[1:], strict=False)
            )
            best = min(
                max(sum(costs[lo:hi]) for lo, hi in zip(b, b[1:], strict=False))
                for c in itertools.combinations(range(1, len(costs)), k - 1)
                for b in [[0, *c, len(costs)]]
            )
            assert got == best


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_balanced_plan_within_bound(num_stages):
    model = mlp([64, 8, 256, 32, 32, 128, 16, 64, 4], name="uneven")
    p = kd.placement.plan(model, num_stages)
    params = [layer.count_params() for layer in model.layers]
    ideal = sum(params) / num_stages
    # Stated bound: the largest stage is at most ideal + largest layer.
    assert max(s.params for s in p.stages) <= ideal + max(params)
    assert sum(s.params for s in p.stages) == sum(params)
    # Contiguous stages covering every layer in order.
    names = [n for s in p.stages for n in s.layers]
    assert names == [layer.name for layer in model.layers]
    assert p.devices == kd.devices.check_devices(CPUS[:num_stages])


def test_cost_callable_and_time():
    model = mlp([16, 16, 16, 16], name="even")
    p = kd.placement.plan(model, 2, cost=lambda layer: 1.0)
    assert [s.layers for s in p.stages] == [("d0", "d1"), ("d2", "d3")]
    timed = kd.placement.plan(model, 2, cost="time", batch_size=4)
    assert all(s.cost > 0 for s in timed.stages)
    assert [n for s in timed.stages for n in s.layers] == [
        "d0",
        "d1",
        "d2",
        "d3",
    ]


def test_skip_connection_crosses_the_cut():
    model = skip_model()
    p = kd.placement.plan(model, 2, devices=CPUS[:2])
    assert p.assignment["d0"] == 0 and p.assignment["out"] == 1
    stages = graph_lib.LayerGraph(model).stages(p.assignment)
    # When d1 (or d2) is in stage 1, stage 1 receives d0's output for the
    # skip as well as the main path: one cut, several tensors.
    if p.assignment["d1"] == 1:
        assert len(stages[1].inputs) == 1  # d0's output feeds d1 and add
    else:
        assert len(stages[1].inputs) == 2


def test_manual_plan():
    model = skip_model()
    p = kd.placement.plan(model, {"d[01]": "/cpu:2", "d2|out": "/cpu:3"})
    assert p.devices == ["/cpu:2", "/cpu:3"]
    (add,) = [
        op.name
        for op in model.operations
        if not isinstance(op, keras.layers.Layer)
    ]
    # The unmatched `a + c` joins the stage of its latest input (d2).
    assert p.assignment == {"d0": 0, "d1": 0, "d2": 1, add: 1, "out": 1}
    # Devices order stages by where their first layer runs.
    q = kd.placement.plan(model, {"d2|out": "/cpu:3", "d[01]": "/cpu:2"})
    assert q.devices == ["/cpu:2", "/cpu:3"]


def test_manual_plan_errors():
    model = skip_model()
    with pytest.raises(
        ValueError,
        match=r"Layer 'd1' is matched by more "
        r"than one pattern.*\['d.', 'd1'\]",
    ):
        kd.placement.plan(
            model, {"d.": "/cpu:0", "d1": "/cpu:1", "out": "/cpu:1"}
        )
    with pytest.raises(
        ValueError, match="Layer 'out' is matched by no pattern"
    ):
        kd.placement.plan(model, {"d.": "/cpu:0"})
    with pytest.raises(ValueError, match="Invalid layer-name pattern '"):
        kd.placement.plan(model, {"d[": "/cpu:0"})
    with pytest.raises(
        ValueError,
        match=r"Device\(s\) \['/cpu:3'\] of the "
        "manual plan get no layer",
    ):
        kd.placement.plan(model, {"d.|out": "/cpu:0", "nothing": "/cpu:3"})
    with pytest.raises(ValueError, match="Stages must form a chain"):
        kd.placement.plan(model, {"d0|d2|out": "/cpu:0", "d1": "/cpu:1"})


def test_bad_arguments():
    model = mlp([4, 4], name="two")
    with pytest.raises(
        ValueError,
        match=r"num_stages=0\. Expected an "
        "integer from 1 to 2",
    ):
        kd.placement.plan(model, 0)
    with pytest.raises(ValueError, match="num_stages=3"):
        kd.placement.plan(model, 3)
    with pytest.raises(ValueError, match="num_stages='2'"):
        kd.placement.plan(model, "2")
    with pytest.raises(
        ValueError, match="cost='flops'. Expected 'params', 'time'"
    ):
        kd.placement.plan(model, 2, cost="flops")
    with pytest.raises(
        ValueError,
        match="batch_size=10, which num_microbatches=4 does not divide",
    ):
        kd.placement.plan(model, 2, batch_size=10, num_microbatches=4)
    with pytest.raises(ValueError, match="optimizer='nope'"):
        kd.placement.plan(model, 2, optimizer="nope")
    with pytest.raises(ValueError, match=r"devices=\['/cpu:0'\] \(1 device"):
        kd.placement.plan(model, 2, devices=["/cpu:0"])
    with pytest.raises(ValueError, match="'/cpu:7' does not exist"):
        kd.placement.plan(model, 2, devices=["/cpu:0", "/cpu:7"])
    with pytest.raises(ValueError, match="has no known input shape"):
        kd.placement.plan(keras.Sequential([keras.layers.Dense(2)]), 1)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="is a subclassed model"):
        kd.placement.plan(Sub(name="sub"), 1)
    with pytest.raises(ValueError, match="Expected a keras.Model"):
        kd.placement.plan("model", 1)


def test_plan_shows_the_bytes_crossing_each_cut():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(16, name="a")(inputs)
    b = keras.layers.Dense(32, name="b")(a)
    c = keras.layers.Dense(16, name="c")(b)
    d = keras.layers.Dense(4, name="d")(keras.layers.Add(name="skip")([a, c]))
    model = keras.Model(inputs, d, name="cut_bytes")
    p = kd.placement.plan(model, {"a|b": "/cpu:0", "c|skip|d": "/cpu:1"},
                          batch_size=64, num_microbatches=4)
    # Stage 0 sends a (16 floats, the skip) and b (32 floats) per example,
    # 16 examples per micro-batch; the last stage sends nothing on.
    assert [s.cut_bytes for s in p.stages] == [(16 + 32) * 4 * 16, 0]
    table = str(p)
    assert "to next stages/micro-batch" in table.splitlines()[1]
    assert table.splitlines()[3].endswith("3.0 KiB")


def wide_middle():
    """d0 -> d1 -> d2 -> d3; d1's output (1024 floats) is 64× d0's."""
    return mlp([16, 1024, 16, 4], name="wide_middle")


def test_slow_link_moves_the_cut_off_the_wide_activation():
    model = wide_middle()
    same = kd.placement.plan(model, 2, cost=lambda layer: 1.0)
    assert [s.layers for s in same.stages] == [("d0", "d1"), ("d2", "d3")]
    assert same.bandwidth is None
    # 32 examples × 1024 floats × 4 bytes at 64 KiB/s: 2 s after d1, as
    # much as two layers; 16 floats after d0 or d2: 1/32 s.
    slow = kd.placement.plan(model, 2, cost=lambda layer: 1.0,
                             bandwidth=64 * 1024, batch_size=32)
    assert slow.assignment["d1"] == slow.assignment["d2"], slow
    moved = 32 * 16 * 4 / (64 * 1024)
    assert [s.transfer_seconds for s in slow.stages] == [moved, moved]
    assert sorted(s.cost for s in slow.stages) == [1 + moved, 3 + moved]
    # A fast link changes nothing.
    fast = kd.placement.plan(model, 2, cost=lambda layer: 1.0,
                             bandwidth=1e12)
    assert fast.assignment == same.assignment


def test_transfer_counts_what_a_stage_receives_and_sends():
    # Stage 1 of 3 receives d0's output twice over (main path and skip:
    # one tensor, counted once) and sends d2's output to the last stage.
    model = skip_model()
    p = kd.placement.plan(
        model, 3, cost=lambda layer: 1.0, bandwidth=1000.0, batch_size=10
    )
    spans = [s.layers for s in p.stages]
    receive_send = []
    for s in p.stages:
        graph = graph_lib.LayerGraph(model)
        sg = graph.stages(p.assignment)[s.index]
        received = sum(
            16 * 4 for t in sg.inputs if t not in graph.input_ids
        )
        receive_send.append(received + s.cut_bytes // p.microbatch_size)
    assert [s.transfer_seconds for s in p.stages] == pytest.approx(
        [b * 10 / 1000.0 for b in receive_send]
    ), spans


def test_plan_table_shows_transfer_time():
    p = kd.placement.plan(wide_middle(), 2, cost=lambda layer: 1.0,
                          bandwidth=64 * 1024, batch_size=32)
    lines = str(p).splitlines()
    assert "transfers at 64.0 KiB/s counted in the balance" in lines[0]
    assert lines[1].endswith("transfer/batch")
    assert lines[3].endswith("31.25 ms") and lines[4].endswith("31.25 ms")
    assert "transfer" not in str(kd.placement.plan(wide_middle(), 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bandwidth=1e6), "cannot be added to parameter counts"),
        (dict(cost="time", bandwidth=0), "Received: bandwidth=0"),
        (dict(cost="time", bandwidth=-5.0), "Received: bandwidth=-5.0"),
        (dict(cost="time", bandwidth=True), "Received: bandwidth=True"),
        (dict(cost="time", bandwidth="fast"), "Received: bandwidth='fast'"),
        (dict(cost="time", bandwidth=float("inf")), "positive finite"),
    ],
)
def test_bad_bandwidth(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kd.placement.plan(wide_middle(), 2, batch_size=4, **kwargs)


def test_measured_bandwidth():
    bandwidth = kd.placement.measure_bandwidth(CPUS[0], CPUS[1])
    assert 0 < bandwidth < float("inf")
    p = kd.placement.plan(wide_middle(), 2, cost="time", batch_size=4,
                          devices=CPUS[:2], bandwidth="measure")
    assert p.bandwidth > 0
    assert all(s.transfer_seconds > 0 for s in p.stages)
    # Local devices by default: no transfer charged.
    local = kd.placement.plan(wide_middle(), 2, cost="time", batch_size=4,
                              devices=CPUS[:2])
    assert local.bandwidth is None
    assert all(s.transfer_seconds == 0 for s in local.stages)
