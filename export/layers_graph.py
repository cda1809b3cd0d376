"""``nformer_layers.onnx`` written node by node: the refinement layers for lists given as inputs.

Place in the flow: export (numpy + onnx, weights from the PyTorch reference).  The file computes
``NFormer.forward(features, landmarks, neighbors=(neighbor_index, neighbor_valid))`` of
``export.reference.nformer`` -- the same function as the layers of ``nformer.onnx`` -- rearranged for
a CPU, where the exported module spent most of its time moving [N, k, C] tensors:

* **Landmark algebra.**  ``q_hat = q . k[L]`` and ``k_hat = k . q[L]`` (per head) only need q and k
  through l landmark rows: ``q_hat[i, h] = x_i (Wq_h k_h[L]^T) + bq_h . k_h[L]``, so each layer
  projects the rows once onto ``[Wv | Aq | Ak]`` (C + 2 H l columns) instead of 3 C.
* **Row blocks.**  The softmax weights over the k slots need only ``k_hat`` at the lists (H l
  values a slot) and are computed for all rows at once; everything that needs ``v`` at the lists
  (the weighted sums, ``c_proj``, LayerNorms, the MLP) runs in an ONNX ``Loop`` over blocks of
  ``BLOCK_ROWS`` rows, so the [rows, k, C] gather stays in cache and the memory is
  O(N (C + H l k) + BLOCK_ROWS k C) per layer instead of O(N k C).
* **No head transposes.**  ``p [b, H, k] @ v[idx] [b, k, C]`` gives every head's weights applied
  to all C columns; head h keeps its own ``dh`` columns.

Inputs and output are those of the exported module (DESIGN.md section 2): ``features`` float32
[1, N, C], ``landmarks`` int64 [n_layer, l], ``neighbor_index`` / ``neighbor_valid`` int32
[1, N, k]; ``refined`` float32 [1, N, C].  ``export.to_onnx`` checks the file against the
reference before it publishes it, like the other files.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: rows per iteration of the Loop (measured on a 2-core CPU, N = 19,281: 256-1024 within a few %)
BLOCK_ROWS = 512

_F, _I64, _BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


class _Graph:
    """Nodes and initialisers of one graph (names carry a prefix: Loop bodies see outer names)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.prefix = prefix
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}{base}_{self.count}"

    def const(self, value, base: str = "const") -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), "ints")

    def op(self, op_type: str, inputs, outputs: int = 1, base: str | None = None, **attrs):
        names = [self.name(base or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def _weights(state: dict, key: str) -> np.ndarray:
    value = state[key]
    value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return np.ascontiguousarray(value, dtype=np.float32)


def layers_model(state: dict, n_layer: int, n_embd: int, n_head: int, ln_eps: float = 1e-5,
                 bn_eps: float = 1e-5, block_rows: int = BLOCK_ROWS, opset: int = 20,
                 ir_version: int = 10) -> onnx.ModelProto:
    """The model from the refinement's weights: ``state`` holds the keys of
    ``export.reference.nformer.NFormer.state_dict()`` (``h.{i}.attn.c_attn.w``, ..., ``bottleneck.*``)."""
    c, heads = n_embd, n_head
    dh = c // heads
    g = _Graph()

    features = g.op("Squeeze", ["features", g.ints(0)], base="features")               # [N, C]
    idx = g.op("Cast", [g.op("Squeeze", ["neighbor_index", g.ints(0)])], to=_I64, base="idx")
    valid = g.op("Cast", [g.op("Squeeze", ["neighbor_valid", g.ints(0)])], to=_BOOL)
    mask = g.op("Where", [valid, g.const(np.float32(0)), g.const(np.float32(-np.inf))], base="mask")
    n = g.op("Gather", [g.op("Shape", [features]), g.const(np.int64(0))], axis=0, base="n")
    rows = g.op("Min", [n, g.const(np.int64(block_rows))], base="rows")               # per iteration
    trips = g.op("Div", [g.op("Sub", [g.op("Add", [n, rows]), g.const(np.int64(1))]), rows], base="trips")
    pad = g.op("Reshape", [g.op("Sub", [g.op("Mul", [trips, rows]), n]), g.ints(1)], base="pad")
    # every layer runs on trips * rows rows: the set and its lists padded once with zero rows (row 0
    # as neighbour, valid), which stay finite and are dropped at the end
    row_pads = g.op("Concat", [g.ints(0, 0), pad, g.ints(0)], axis=0)
    x, idx, mask = (g.op("Pad", [t, row_pads], base="padded") for t in (features, idx, mask))
    mask = g.op("Unsqueeze", [mask, g.ints(2)])                                          # [Np, k, 1]
    scale = g.const(np.float32(math.sqrt(dh)))
    head_cols = g.ints(*[h * (heads + 1) for h in range(heads)])   # o[:, h, h*dh:(h+1)*dh] in [b, H*H, dh]
    for layer in range(n_layer):
        p = f"h.{layer}."
        w_attn, b_attn = _weights(state, p + "attn.c_attn.w"), _weights(state, p + "attn.c_attn.b")
        wq, wk, wv = w_attn[:, :c], w_attn[:, c:2 * c], w_attn[:, 2 * c:]
        bq, bk, bv = b_attn[:c], b_attn[c:2 * c], b_attn[2 * c:]
        lm = g.op("Gather", ["landmarks", g.const(np.int64(layer))], axis=0, base="landmarks")   # [l]
        qk_l = g.op("Add", [g.op("MatMul", [g.op("Gather", [x, lm], axis=0), g.const(w_attn[:, :2 * c])]),
                            g.const(b_attn[:2 * c])])                                 # q, k of the landmarks
        q_l, k_l = g.op("Split", [qk_l, g.ints(c, c)], outputs=2, axis=1)

        def per_head(t):   # [l, C] -> [H, dh, l]
            return g.op("Transpose", [g.op("Reshape", [t, g.ints(-1, heads, dh)])], perm=[1, 2, 0])

        def onto(w, b, t):  # x W_h t_h + b_h t_h for every head: ([C, H*l], [H*l])
            w_h = g.const(w.reshape(c, heads, dh).transpose(1, 0, 2).copy())           # [H, C, dh]
            a = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [w_h, t])], perm=[1, 0, 2]), g.ints(c, -1)])
            return a, g.op("Reshape", [g.op("MatMul", [g.const(b.reshape(heads, 1, dh)), t]), g.ints(-1)])

        a_q, c_q = onto(wq, bq, per_head(k_l))
        a_k, c_k = onto(wk, bk, per_head(q_l))
        proj = g.op("Concat", [g.const(wv), a_q, a_k], axis=1)                          # [C, C + 2 H l]
        bias = g.op("Concat", [g.const(bv), c_q, c_k], axis=0)
        y = g.op("Add", [g.op("MatMul", [x, proj]), bias])                               # [Np, C + 2 H l]
        hl = g.op("Reshape", [g.op("Mul", [g.op("Gather", [g.op("Shape", [lm]), g.const(np.int64(0))], axis=0),
                                           g.const(np.int64(heads))]), g.ints(1)])
        v, q_hat, k_hat = g.op("Split", [y, g.op("Concat", [g.ints(c), hl, hl], axis=0)], outputs=3, axis=1)
        # the softmax weights of every row over its k slots, [Np, k, H]: small (no [N, k, C] tensor)
        k_nb = g.op("Reshape", [g.op("Gather", [k_hat, idx], axis=0), g.ints(0, 0, heads, -1)])   # [Np, k, H, l]
        q4 = g.op("Reshape", [q_hat, g.ints(0, 1, heads, -1)])                            # [Np, 1, H, l]
        logits = g.op("Div", [g.op("ReduceSum", [g.op("Mul", [q4, k_nb]), g.ints(-1)], keepdims=0), scale])
        weights = g.op("Softmax", [g.op("Add", [logits, mask])], axis=1)                 # [Np, k, H]

        b = _Graph(prefix=f"layer{layer}_")          # the Loop body: rows [i * rows, (i + 1) * rows)
        start = b.op("Reshape", [b.op("Mul", ["i", rows]), b.ints(1)])
        stop = b.op("Add", [start, rows])

        def block(t):
            return b.op("Slice", [t, start, stop, b.ints(0)])

        w_t = b.op("Transpose", [block(weights)], perm=[0, 2, 1])                          # [b, H, k]
        o = b.op("MatMul", [w_t, b.op("Gather", [v, block(idx)], axis=0)])                # [b, H, C]
        a = b.op("Reshape", [b.op("Gather", [b.op("Reshape", [o, b.ints(0, heads * heads, dh)]), head_cols], axis=1),
                             b.ints(0, c)])

        def conv1d(t, name):
            return b.op("Add", [b.op("MatMul", [t, b.const(_weights(state, p + name + ".w"))]),
                                b.const(_weights(state, p + name + ".b"))])

        def layer_norm(t, name):
            return b.op("LayerNormalization", [t, b.const(_weights(state, p + name + ".g")),
                                               b.const(_weights(state, p + name + ".b"))], axis=-1, epsilon=ln_eps)

        h1 = layer_norm(b.op("Add", [block(x), conv1d(a, "attn.c_proj")]), "ln_1")
        mlp = conv1d(b.op("Gelu", [conv1d(h1, "mlp.c_fc")], approximate="tanh"), "mlp.c_proj")
        out = layer_norm(b.op("Add", [h1, mlp]), "ln_2")
        body = helper.make_graph(
            b.nodes + [helper.make_node("Identity", ["cond"], ["cond_out"])], f"layer{layer}_rows",
            [helper.make_tensor_value_info("i", _I64, []), helper.make_tensor_value_info("cond", _BOOL, [])],
            [helper.make_tensor_value_info("cond_out", _BOOL, []), helper.make_tensor_value_info(out, _F, None)],
            initializer=b.initializers)
        stacked = g.op("Loop", [trips, ""], body=body, base=f"layer{layer}")              # [trips, rows, C]
        x = g.op("Reshape", [stacked, g.ints(-1, c)], base="x")                          # [Np, C]
    x = g.op("Slice", [x, g.ints(0), g.op("Reshape", [n, g.ints(1)]), g.ints(0)], base="x")
    bn = {k: _weights(state, "bottleneck." + k) for k in ("weight", "bias", "running_mean", "running_var")}
    y = g.op("BatchNormalization", [x, g.const(bn["weight"]), g.const(bn["bias"]), g.const(bn["running_mean"]),
                                    g.const(bn["running_var"])], epsilon=bn_eps)
    g.nodes.append(helper.make_node("Unsqueeze", [y, g.ints(0)], ["refined"]))
    graph = helper.make_graph(
        g.nodes, "nformer_layers",
        [helper.make_tensor_value_info("features", _F, [1, "N", c]),
         helper.make_tensor_value_info("landmarks", _I64, [n_layer, "l"]),
         helper.make_tensor_value_info("neighbor_index", TensorProto.INT32, [1, "N", "k"]),
         helper.make_tensor_value_info("neighbor_valid", TensorProto.INT32, [1, "N", "k"])],
        [helper.make_tensor_value_info("refined", _F, [1, "N", c])], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="nformer-trt")
    model.ir_version = ir_version
    return model
