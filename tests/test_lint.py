"""TensorRT compatibility lint: clean graphs pass, planted problems are caught by node name, Q/DQ
placement rules, and every exported tiny graph (fp32, fp16, INT8 and FP8 QDQ) passes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from osx.export.lint import lint_onnx, support_table


def _model(nodes, inputs, outputs, inits=(), opset=18, check=True):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[h.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


def _f(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def _const(name, array):
    return nh.from_array(np.asarray(array), name)


def _clean_graph():
    """A small transformer block and a conv stage: the op kinds the exported components use."""
    rng = np.random.default_rng(0)
    inits = [
        _const("w", rng.standard_normal((8, 8)).astype(np.float32)),
        _const("b", np.zeros(8, np.float32)),
        _const("gamma", np.ones(8, np.float32)), _const("beta", np.zeros(8, np.float32)),
        _const("shape4", np.array([1, 8, 2, 2], np.int64)),
        _const("k", rng.standard_normal((4, 8, 3, 3)).astype(np.float32)),
        _const("scales", np.array([1, 1, 2, 2], np.float32)),
        _const("axes", np.array([-1], np.int64)),
        _const("half", np.array(0.5, np.float32)), _const("rsqrt2", np.array(2 ** -0.5, np.float32)),
        _const("one", np.array(1.0, np.float32)),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["mm"], name="proj"),
        h.make_node("Add", ["mm", "b"], ["biased"], name="bias"),
        h.make_node("LayerNormalization", ["biased", "gamma", "beta"], ["ln"], name="norm", axis=-1, epsilon=1e-6),
        h.make_node("Mul", ["ln", "rsqrt2"], ["s"], name="gelu_scale"),  # GELU via Erf
        h.make_node("Erf", ["s"], ["e"], name="gelu_erf"),
        h.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        h.make_node("Mul", ["ln", "e1"], ["g0"], name="gelu_mul"),
        h.make_node("Mul", ["g0", "half"], ["g"], name="gelu_half"),
        h.make_node("Softmax", ["g"], ["sm"], name="softmax", axis=-1),
        h.make_node("ReduceMean", ["sm", "axes"], ["mean"], name="mean", keepdims=1),
        h.make_node("Sub", ["sm", "mean"], ["centred"], name="centre"),
        h.make_node("Reshape", ["centred", "shape4"], ["img"], name="to_image"),
        h.make_node("Resize", ["img", "", "scales"], ["up"], name="upsample", mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        h.make_node("Pad", ["up", "pads"], ["padded"], name="pad", mode="constant"),
        h.make_node("Conv", ["padded", "k"], ["y"], name="conv"),
    ]
    inits.append(_const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    return _model(nodes, [_f("x", [4, 8])], [_f("y", [1, 4, 4, 4])], inits)


def test_table_is_data_with_its_source():
    t = support_table()
    assert t["tensorrt_version"] and "onnx-tensorrt" in t["source"] and t["opset"]["min"] <= 18 <= t["opset"]["max"]
    assert t["ops"]["MatMul"] == ["FP32", "FP16", "BF16"] and t["ops"]["Unique"] is None


def test_clean_graph_passes():
    m = _clean_graph()
    out = ort.InferenceSession(m.SerializeToString()).run(None, {"x": np.ones((4, 8), np.float32)})[0]
    assert out.shape == (1, 4, 4, 4)  # a real, runnable graph
    assert lint_onnx(m) == []


def _plant(node, extra_inputs=(), extra_inits=(), opset=18, check=True):
    m = _clean_graph()
    g = m.graph
    y = g.output[0].name
    for n in g.node:  # rename the graph output so the planted node can produce it
        n.output[:] = ["y_clean" if o == y else o for o in n.output]
    node.output[:] = [y] if not node.output else node.output
    if not node.input:
        node.input[:] = ["y_clean"]
    g.node.append(node)
    g.input.extend(extra_inputs)
    g.initializer.extend(extra_inits)
    m.opset_import[0].version = opset
    if check:
        onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("node,extra,match", [
    (h.make_node("Unique", [], ["y"], name="planted_unique"), {}, "not supported by TensorRT"),
    (h.make_node("FusedGelu", [], ["y"], name="planted_custom", domain="com.microsoft"), {"check": False}, "custom-domain op"),
    (h.make_node("Resize", ["y_clean", "", "sc"], ["y"], name="planted_cubic", mode="cubic"),
     {"extra_inits": [_const("sc", np.ones(4, np.float32))]}, "mode='cubic'"),
    (h.make_node("ReduceMean", ["y_clean", "ax"], ["y"], name="planted_axes"),
     {"extra_inputs": [_f("ax", [1], T.INT64)], "check": False}, "axes must be an initializer"),
    (h.make_node("TopK", ["y_clean", "kk"], ["y", "idx"], name="planted_topk", sorted=0),
     {"extra_inits": [_const("kk", np.array([1], np.int64))], "check": False}, "sorted=0"),
    (h.make_node("MaxPool", ["y_clean"], ["y", "indices"], name="planted_pool", kernel_shape=[2, 2]),
     {"check": False}, "Indices output"),
    (h.make_node("Sin", ["iy"], ["y"], name="planted_int_sin"), {"extra_inputs": [_f("iy", [1, 4, 4, 4], T.INT32)], "check": False},
     "has type INT32"),
])
def test_planted_problem_is_caught_by_node_name(node, extra, match):
    m = _plant(node, **extra)
    issues = [i for i in lint_onnx(m) if i.severity == "error"]
    assert issues and all(i.node == node.name for i in issues), issues
    assert any(match in i.problem for i in issues), issues


def test_opset_outside_the_range():
    m = _clean_graph()
    m.opset_import[0].version = 8
    assert any(i.node == "<model>" and "opset 8" in i.problem for i in lint_onnx(m))


def test_double_is_a_warning_not_an_error():
    m = _model([h.make_node("Add", ["a", "a"], ["y"], name="add64")], [_f("a", [2], T.DOUBLE)], [_f("y", [2], T.DOUBLE)])
    issues = lint_onnx(m)
    assert [(i.node, i.severity) for i in issues] == [("add64", "warning")]


# --- explicit quantization ------------------------------------------------------------------------


def _qdq(act_zp=np.int8(0), act_scale=np.float32(0.05), q_consumer="DequantizeLinear", weight_scale=None,
         dq_scale=None, quantize_b=True, scale_input=False):
    """x -> Q -> DQ -> MatMul <- DQ(int8 weights, per output channel)."""
    rng = np.random.default_rng(0)
    inits = [_const("s", np.asarray(act_scale, np.float32)), _const("zp", np.asarray(act_zp)),
             _const("ds", np.asarray(act_scale if dq_scale is None else dq_scale, np.float32)),
             _const("wq", rng.integers(-127, 128, (8, 4)).astype(np.int8)),
             _const("ws", np.full(4, 0.01, np.float32) if weight_scale is None else weight_scale),
             _const("wzp", np.zeros(4, np.int8)), _const("wf", rng.standard_normal((8, 4)).astype(np.float32))]
    inputs = [_f("x", [2, 8])]
    scale = "s"
    if scale_input:
        inputs.append(_f("s_in", [], T.FLOAT))
        scale = "s_in"
    nodes = [h.make_node("QuantizeLinear", ["x", scale, "zp"], ["xq"], name="q_x")]
    if q_consumer == "DequantizeLinear":
        nodes.append(h.make_node("DequantizeLinear", ["xq", "ds", "zp"], ["xd"], name="dq_x"))
    else:
        nodes.append(h.make_node("Cast", ["xq"], ["xd"], name="cast_q", to=T.FLOAT))
    nodes.append(h.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], name="dq_w", axis=1))
    nodes.append(h.make_node("MatMul", ["xd", "wd" if quantize_b else "wf"], ["y"], name="gemm"))
    return _model(nodes, inputs, [_f("y", [2, 4])], inits, opset=19, check=False)


def test_good_qdq_graph_passes():
    m = _qdq()
    onnx.checker.check_model(m, full_check=True)
    ort.InferenceSession(m.SerializeToString()).run(None, {"x": np.ones((2, 8), np.float32)})
    assert lint_onnx(m) == []


@pytest.mark.parametrize("kwargs,node,match,severity", [
    ({"act_zp": np.uint8(128)}, "q_x", "UINT8", "error"),
    ({"act_zp": np.int8(3)}, "q_x", "zero point must be zero", "error"),
    ({"q_consumer": "Cast"}, "q_x", "must be followed by DequantizeLinear", "error"),
    ({"act_scale": np.full(8, 0.05, np.float32), "dq_scale": np.full(8, 0.05, np.float32)}, "q_x",
     "per-channel scales on an activation", "error"),
    ({"scale_input": True}, "q_x", "must be a constant", "error"),
    ({"dq_scale": np.float32(0.07)}, "dq_x", "requantizes", "warning"),
    ({"quantize_b": False}, "gemm", "TensorRT runs this MatMul in floating point", "warning"),
])
def test_qdq_rules(kwargs, node, match, severity):
    issues = lint_onnx(_qdq(**kwargs))
    hits = [i for i in issues if i.node == node and match in i.problem]
    assert hits and hits[0].severity == severity, issues


def test_dq_must_follow_a_q_or_read_constants():
    m = _model([h.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq_input")],
               [_f("xq", [2], T.INT8)], [_f("y", [2])], [_const("s", np.float32(0.1))], opset=19)
    assert any(i.node == "dq_input" and "graph input" in i.problem for i in lint_onnx(m))


def test_int32_bias_dequantize_is_refused():
    """onnxruntime's QDQ quantizer dequantizes biases from INT32 unless QuantizeBias=False; TensorRT's
    DequantizeLinear takes INT8/FP8/FP4/INT4 only (onnx/onnx-tensorrt#850)."""
    m = _model([h.make_node("DequantizeLinear", ["bq", "bs"], ["y"], name="bias_dq")], [], [_f("y", [4])],
               [_const("bq", np.arange(4, dtype=np.int32)), _const("bs", np.float32(0.001))], opset=19)
    assert any(i.node == "bias_dq" and "INT32" in i.problem for i in lint_onnx(m))


# --- every exported tiny graph ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_bundle, tiny_fp16_graphs, tmp_path_factory):
    """The tiny pipeline's graphs as the exporter writes them: the session bundle's fp32 graphs, fp16
    exports of the denoiser and VAE decoder (T5 is fp32 only; the session's, of the bundle's weights), and the
    calibration helper's INT8 QDQ (and FP8 where ModelOpt is installed) of the bundle's denoiser."""
    from osx.bundle import Bundle
    from osx.calibration import quantize
    from osx.calibration.shards import ShardWriter

    bundle = Bundle.open(tiny_bundle)
    graphs = {f"{name}.fp32": bundle.path(c.file) for name, c in bundle.components.items()}
    graphs.update({f"{name}.fp16": path for name, path in tiny_fp16_graphs.items()})
    out = tmp_path_factory.mktemp("tiny_onnx")
    writer = ShardWriter(out / "shards", "denoiser", 1 << 22)
    for seed in range(3):
        writer.add(bundle.spec("denoiser").sample_inputs(seed=seed))
    shards = [out / "shards" / r["file"] for r in writer.close()]
    # The Q/DQ graphs TensorRT gets (ModelOpt's, symmetric); onnxruntime's own INT8 takes asymmetric uint8
    # activations, which only onnxruntime runs, so it is not a TensorRT graph to lint.
    precisions = ["int8", "fp8"] if quantize.modelopt_available() is None else []
    for p in precisions:
        for_tensorrt = quantize.choose_quantizer(p, "denoiser", "tensorrt", "float32")
        graphs[f"denoiser.{p}"] = quantize.quantize(graphs["denoiser.fp32"], out / f"denoiser.{p}.onnx", p, shards,
                                                    quantizer=for_tensorrt).path
    return graphs


@pytest.mark.slow
def test_every_exported_tiny_graph_passes(exported):
    assert {"text_encoder.fp32", "denoiser.fp32", "denoiser.fp16", "vae_decoder.fp32", "vae_decoder.fp16"} <= set(exported)
    errors = {name: [str(i) for i in lint_onnx(path) if i.severity == "error"] for name, path in exported.items()}
    assert {name: e for name, e in errors.items() if e} == {}


def _trt_domain(model):
    """The same graph with TensorRT's own trt-domain Q/DQ ops (as ModelOpt writes them for FP8)."""
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.op_type, n.domain = f"TRT_FP8{n.op_type}", "trt"
    model.opset_import.append(h.make_opsetid("trt", 1))
    return model


def test_trt_domain_qdq_ops_are_accepted_and_checked():
    """TensorRT's parser imports trt::TRT_FP8QuantizeLinear / DequantizeLinear (and INT4) as built-ins."""
    issues = lint_onnx(_trt_domain(_qdq()))
    assert not [i for i in issues if i.severity == "error"], issues
    bad = lint_onnx(_trt_domain(_qdq(q_consumer="Cast")))  # the Q/DQ rules still apply to them
    assert any(i.node == "q_x" and "followed by DequantizeLinear" in i.problem for i in bad)
    other = _trt_domain(_qdq())
    other.graph.node[0].op_type = "TRT_SomethingElse"
    assert any("custom-domain op trt::TRT_SomethingElse" in i.problem for i in lint_onnx(other))
