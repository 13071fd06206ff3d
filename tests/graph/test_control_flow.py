"""Models with weights inside control flow (silero VAD style) and local functions: the clean-up passes
must walk subgraphs without breaking them, the plan must say why their nodes stay float, and the
quantized model must be valid and compute what the original computes on every branch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.checker
import onnx_ir as ir
from model_builders import finish, randn, run, snr_db
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph import passes
from onnxq.placement.planner import FUNCTION_REASON, SUBGRAPH_REASON, plan_placement
from onnxq.placement.rules import load_rule_set


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(array), name=f"{name}_const"
    )


def _branch(name: str, rng: np.random.Generator) -> onnx.GraphProto:
    """A branch that keeps its Conv weight as a Constant node and reads the outer tensor c0."""
    return helper.make_graph(
        [
            _constant(f"{name}_w", randn(rng, 32, 32, 3, 3, scale=0.05)),
            helper.make_node(
                "Conv", ["c0", f"{name}_w"], [f"{name}_y"], pads=[1, 1, 1, 1], name=f"{name}_conv"
            ),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
    )


def _pass_through(name: str) -> onnx.GraphProto:
    """A branch that only returns the outer tensor c0 through an Identity (what exporters write)."""
    return helper.make_graph(
        [helper.make_node("Identity", ["c0"], [f"{name}_out"], name=f"{name}_identity")],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
    )


def _two_ifs(
    name: str, rng: np.random.Generator, conditions: list[onnx.NodeProto], conv_if: str, pass_if: str
) -> onnx.ModelProto:
    """Main Conv, then an If (condition ``conv_if``) whose branches hold Conv weights as Constant
    nodes, and an If (condition ``pass_if``) whose two branches both return the same outer value
    through Identity (the silero VAD shapes of both)."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        *conditions,
        helper.make_node(
            "If",
            [conv_if],
            ["y"],
            then_branch=_branch("then", rng),
            else_branch=_branch("else", rng),
            name="if_conv",
        ),
        helper.make_node(
            "If",
            [pass_if],
            ["z"],
            then_branch=_pass_through("then_pass"),
            else_branch=_pass_through("else_pass"),
            name="if_pass",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 32, 8, 8]),
        ],
        [numpy_helper.from_array(randn(rng, 32, 16, 3, 3), "w0")],
    )
    return finish(graph, 17)


def vad_like_model(seed: int = 60) -> onnx.ModelProto:
    """Both Ifs on a computed condition (the input's mean is positive)."""
    conditions = [
        helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0, name="mean"),
        _constant("zero", np.array(0, np.float32)),
        helper.make_node("Greater", ["mean", "zero"], ["positive"], name="is_positive"),
    ]
    return _two_ifs("vad_like", np.random.default_rng(seed), conditions, "positive", "positive")


def feeds(seed: int, samples: int, sign: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (np.abs(rng.standard_normal((samples, 16, 8, 8))) * sign).astype(np.float32)}


def test_lift_constants_inside_if_branches_does_not_break_outer_values() -> None:
    """Regression: onnx_ir's IdentityEliminationPass made two branches return the same outer value
    ("Value ... is already an output of a different graph")."""
    model = ir.serde.deserialize_model(vad_like_model())
    assert passes.lift_constant_nodes(model) == 3  # zero + one Conv weight per branch

    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    if_conv = next(n for n in proto.graph.node if n.name == "if_conv")
    for branch in if_conv.attribute:  # each branch's weight is now that branch's initializer
        assert [t.name for t in branch.g.initializer] == [f"{branch.g.name}_w"]
        assert "Constant" not in [n.op_type for n in branch.g.node]
    if_pass = next(n for n in proto.graph.node if n.name == "if_pass")
    for branch in if_pass.attribute:  # the pass-through Identity stays: its input is an outer value
        assert [n.op_type for n in branch.g.node] == ["Identity"]
    feed = feeds(1, 2, 1.0)
    for got, want in zip(run(proto, feed), run(vad_like_model(), feed)):
        np.testing.assert_array_equal(got, want)


def test_eliminate_identities_keeps_same_graph_cases() -> None:
    """Identity inside one graph: removed, and a graph output keeps its name."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["i"], name="inner"),
            helper.make_node("Neg", ["i"], ["n"], name="neg"),
            helper.make_node("Identity", ["n"], ["y"], name="last"),
            helper.make_node("Identity", ["x"], ["x_copy"], name="input_to_output"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "x_copy")],
    )
    model = ir.serde.deserialize_model(finish(graph))
    assert passes.eliminate_identities(model) == 2
    assert [n.name for n in model.graph] == ["relu", "neg", "input_to_output"]
    assert [v.name for v in model.graph.outputs] == ["y", "x_copy"]


def test_quantize_model_with_weights_in_if_branches() -> None:
    """End to end: valid output, main Conv quantized, branch Convs left float with the reason."""
    model = vad_like_model()
    result = onnxq.quantize(model, calibration_data=feeds(2, 8, 1.0))
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)

    assert result.plan.decision("conv0").quantized
    for name in ("then_conv", "else_conv"):
        found = result.plan.decision(name)
        assert found is not None and not found.quantized
        assert found.category == "inside subgraph"
        branch = name.split("_")[0] + "_branch"
        assert found.reason == f"inside If body '{branch}' of node if_conv: {SUBGRAPH_REASON}"
    assert (
        f"2 candidate nodes stay float: 2 inside If/Loop/Scan bodies ({SUBGRAPH_REASON})" in result.plan.notes
    )
    for sign in (1.0, -1.0):  # both branches still compute what the original computes
        feed = feeds(3, 2, sign)
        for got, want in zip(run(proto, feed), run(model, feed)):
            assert snr_db(want, got) > 30


def function_model(seed: int = 61) -> onnx.ModelProto:
    """A MatMul + Relu inside a local function, called from the main graph with an initializer weight."""
    rng = np.random.default_rng(seed)
    function = helper.make_function(
        "local",
        "Project",
        ["a", "b"],
        ["c"],
        [
            helper.make_node("MatMul", ["a", "b"], ["m"], name="fn_matmul"),
            helper.make_node("Relu", ["m"], ["c"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Project", ["x", "w"], ["y"], domain="local", name="call")],
        "with_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(randn(rng, 64, 64), "w")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_plan_lists_nodes_inside_local_functions() -> None:
    model = ir.serde.deserialize_model(function_model())
    plan = plan_placement(model, load_rule_set("tensorrt"))
    found = plan.decision("fn_matmul")
    assert found is not None and not found.quantized and found.category == "inside function"
    assert found.reason.startswith("inside local function 'local:Project'")
    assert plan.notes == [f"1 candidate nodes stay float: 1 inside local functions ({FUNCTION_REASON})"]


def test_local_functions_are_inlined_and_quantized() -> None:
    model = function_model()
    rng = np.random.default_rng(62)
    data = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    result = onnxq.quantize(model, calibration_data=data)
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions
    quantized = [d.op_type for d in result.plan.quantized_nodes()]
    assert quantized == ["MatMul"]
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 25


def loop_model(seed: int = 63) -> onnx.ModelProto:
    """A Loop that applies a MatMul by a Constant-node weight three times; the body passes its carried
    state through an Identity when done (a body output that is a body input)."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            _constant("body_w", randn(rng, 32, 32, scale=0.2)),
            helper.make_node("MatMul", ["state_in", "body_w"], ["mm"], name="body_matmul"),
            helper.make_node("Tanh", ["mm"], ["state_out"], name="body_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"], name="main_matmul"),
            helper.make_node("Loop", ["trips", "", "h"], ["y"], body=body, name="loop"),
        ],
        "with_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [
            numpy_helper.from_array(randn(rng, 32, 32, scale=0.2), "w0"),
            numpy_helper.from_array(np.array(3), "trips"),
        ],
    )
    return finish(graph, 17)


def test_quantize_model_with_weights_in_a_loop_body() -> None:
    model = loop_model()
    rng = np.random.default_rng(64)
    result = onnxq.quantize(model, calibration_data={"x": rng.standard_normal((16, 32)).astype(np.float32)})
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert result.plan.decision("main_matmul").quantized
    inner = result.plan.decision("body_matmul")
    assert inner is not None and not inner.quantized
    assert inner.reason == f"inside Loop body 'body' of node loop: {SUBGRAPH_REASON}"
    feed = {"x": rng.standard_normal((4, 32)).astype(np.float32)}
    # one INT8 MatMul whose error the three float iterations carry on: ~24 dB here
    assert snr_db(run(model, feed)[0], run(proto, feed)[0]) > 20


def constant_if_model(seed: int = 65) -> onnx.ModelProto:
    """The vad-like Ifs with constant conditions (true for the Conv If, false for the pass-through)."""
    conditions = [
        _constant("yes", np.array(True)),
        helper.make_node("Not", ["yes"], ["no"], name="not"),  # computed: stays an If
    ]
    return _two_ifs("constant_ifs", np.random.default_rng(seed), conditions, "yes", "no")


def test_inline_constant_ifs_takes_the_constant_branch() -> None:
    model = ir.serde.deserialize_model(constant_if_model())
    passes.lift_constant_nodes(model)
    assert passes.inline_constant_ifs(model) == 1
    assert [n.name for n in model.graph if n.op_type == "If"] == ["if_pass"]
    assert "then_conv" in [n.name for n in model.graph]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feed = feeds(4, 2, 1.0)
    for got, want in zip(run(proto, feed), run(constant_if_model(), feed)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_quantize_inlines_constant_ifs_and_quantizes_their_convs() -> None:
    model = constant_if_model()
    result = onnxq.quantize(model, calibration_data=feeds(5, 8, 1.0))
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert result.plan.decision("then_conv").quantized
    assert result.plan.decision("else_conv") is None  # the branch never taken is gone
    feed = feeds(6, 2, 1.0)
    for got, want in zip(run(proto, feed), run(model, feed)):
        assert snr_db(want, got) > 25
