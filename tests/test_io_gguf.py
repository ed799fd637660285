"""fastmoe_nb.io: an MoE layer read from a GGUF file, written here with gguf's writer (no
downloads). The expert tensors must stay memory maps of the file; the layer run on them must
equal moe_forward and reference.py's moe on the float32 weights they decode to — decoded from
the bytes the test wrote, in the layout it wrote them, so that a transposed or swapped tensor
in the reader fails. Frozen experts: dx and the float parameters' gradients only.
"""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.reference as ref
from fastmoe_nb import formats as F
from helpers import assert_close

gguf = pytest.importorskip("gguf")
from fastmoe_nb.io import gguf_moe_layers, read_gguf_moe  # noqa: E402


def _raw(w, fmt):
    """w: a float32 array in NumPy order (outermost first) -> (the bytes or array gguf's
    writer takes, its raw_dtype or None, what those bytes decode to in float32)."""
    if fmt == "f32":
        return w, None, w
    if fmt == "f16":
        h = w.astype(np.float16)
        return h, None, h.astype(np.float32)
    lead = w.shape[:-1]
    q = F.quantize(w.reshape(1, -1, w.shape[-1]), fmt)
    raw = np.ascontiguousarray(q.blocks).view(np.uint8).reshape(*lead, -1)
    kind = gguf.GGMLQuantizationType(F.FORMAT[fmt].ggml_type)
    return raw, kind, F.dequantize(q, 0).reshape(w.shape)


def _write(path, arch, meta, tensors):
    """tensors: {name: (float32 array, fmt)} -> {name: its decoded float32 values}."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    decoded = {}
    for name, (w, fmt) in tensors.items():
        raw, raw_dtype, decoded[name] = _raw(w, fmt)
        writer.add_tensor(name, raw, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def _moe_tensors(rng, E, d, h, fmts, n=0, shared=0, fused=False):
    """blk.n's MoE tensors in GGUF's layout (NumPy order): fmts = (gate/up format, down format);
    shared: the shared expert's width (0: none), in q8_0, with an f32 gate."""
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    p = f"blk.{n}."
    t = {p + "ffn_gate_inp.weight": (w(E, d), "f32")}
    if fused:
        t[p + "ffn_gate_up_exps.weight"] = (w(E, 2 * h, d), fmts[0])
    else:
        t[p + "ffn_gate_exps.weight"] = (w(E, h, d), fmts[0])
        t[p + "ffn_up_exps.weight"] = (w(E, h, d), fmts[0])
    t[p + "ffn_down_exps.weight"] = (w(E, d, h), fmts[1])
    if shared:
        t[p + "ffn_gate_shexp.weight"] = (w(shared, d), "q8_0")
        t[p + "ffn_up_shexp.weight"] = (w(shared, d), "q8_0")
        t[p + "ffn_down_shexp.weight"] = (w(d, shared), "q8_0")
        t[p + "ffn_gate_inp_shexp.weight"] = (w(d), "f32")
    return t


def _float_layer(dec, n=0, fused=False):
    """moe_forward's float32 weights from the decoded tensors, written from GGUF's layout."""
    p = f"blk.{n}."
    w1 = dec[p + "ffn_gate_up_exps.weight"] if fused else np.concatenate(
        [dec[p + "ffn_gate_exps.weight"], dec[p + "ffn_up_exps.weight"]], axis=1)
    kw = dict(router_w=dec[p + "ffn_gate_inp.weight"].T.copy(), w1=w1,
              w2=dec[p + "ffn_down_exps.weight"], trans_w=True)
    if p + "ffn_up_shexp.weight" in dec:
        kw.update(shared_w1=np.concatenate([dec[p + "ffn_gate_shexp.weight"],
                                            dec[p + "ffn_up_shexp.weight"]], axis=0).T.copy(),
                  shared_w2=dec[p + "ffn_down_shexp.weight"].T.copy(),
                  shared_gate_w=dec[p + "ffn_gate_inp_shexp.weight"])
    return kw


def _is_file_map(a, reader):
    return (isinstance(a, np.memmap) and not a.flags.owndata
            and np.shares_memory(a, reader.data))


# (gate / up, down): one format each, and Q4_K_M's pair
FORMATS = [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_k", "q6_k"), ("bf16", "bf16"),
           ("f32", "f32")]


@pytest.mark.parametrize("fmts", FORMATS)
def test_qwen2moe_layer_runs_on_the_files_blocks(tmp_path, rng, fmts):
    """A Qwen2-MoE layer (softmax, no renormalization, a gated shared expert) in layer 1 of
    two; decode (T = 3: the streaming kernels) and prefill (T = 64: BLAS on decoded panels)."""
    E, d, h, k = 4, 256, 512, 2
    t = _moe_tensors(rng, E, d, h, fmts, n=1, shared=64)
    t["blk.0.ffn_up.weight"] = ((rng.standard_normal((h, d)) / 16).astype(np.float32), "f32")
    dec = _write(tmp_path / "m.gguf", "qwen2moe", dict(block_count=2, expert_count=E,
                                                       expert_used_count=k), t)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert gguf_moe_layers(reader) == [1]
    layer = read_gguf_moe(reader, 1)
    assert (layer.arch, layer.k, layer.num_experts, layer.router) == ("qwen2moe", k, E,
                                                                      "softmax_topk")
    assert layer.router_options == {"renormalize": False}
    assert layer.w1.shape == (E, 2 * h, d) and layer.w2.shape == (E, d, h)
    assert layer.w1.stacked and layer.w1.format == fmts[0] and layer.w2.format == fmts[1]
    for _, b in layer.w1.parts + layer.w2.parts:
        assert _is_file_map(b, reader)                   # the blocks were not copied
    want = _float_layer(dec, n=1)
    np.testing.assert_array_equal(layer.router_w, want["router_w"])
    np.testing.assert_array_equal(layer.shared_w1, want["shared_w1"])
    np.testing.assert_array_equal(F.dequantize(layer.w1), want["w1"])
    for T in (3, 64):
        x = rng.standard_normal((T, d)).astype(np.float32)
        y = layer.forward(x)
        assert_close(y, fm.moe_forward(x, k=k, renormalize=False, **want))
        assert_close(y, ref.moe_forward(x, k=k, renormalize=False, **want))


@pytest.mark.parametrize("fmts", [("q4_0", "q8_0"), ("q4_k", "q6_k")])
def test_backward_with_frozen_experts(tmp_path, rng, fmts):
    """dx and the router's and shared expert's gradients as on the decoded float32 weights
    (fastmoe_nb and reference.py), no w1 / w2 gradient."""
    E, d, h, k, T = 4, 256, 256, 2, 20
    dec = _write(tmp_path / "m.gguf", "qwen2moe", dict(expert_count=E, expert_used_count=k),
                 _moe_tensors(rng, E, d, h, fmts, shared=32))
    layer = read_gguf_moe(str(tmp_path / "m.gguf"), 0)
    want = _float_layer(dec)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    y, ctx = layer.forward(x, return_context=True)
    dx, grads = fm.moe_backward(dy, ctx)
    assert sorted(grads) == ["router_w", "shared_gate_w", "shared_w1", "shared_w2"]
    yf, ctxf = fm.moe_forward(x, k=k, renormalize=False, return_context=True, **want)
    dxf, gradsf = fm.moe_backward(dy, ctxf)
    _, rctx = ref.moe_forward(x, k=k, renormalize=False, return_context=True, **want)
    dxr, gradsr = ref.moe_backward(dy, rctx)
    assert_close(y, yf)
    for got, (a, b) in [(dx, (dxf, dxr))] + [(g, (gradsf[n], gradsr[n]))
                                             for n, g in grads.items()]:
        assert_close(got, a)
        assert_close(got, b)


def test_mixtral_fused_gate_up_and_deepseek_v3_router(tmp_path, rng):
    """llama (Mixtral): renormalized softmax, here with gate and up in one ffn_gate_up_exps
    tensor; deepseek2 with V3's metadata: sigmoid_topk with its choice bias (exp_probs_b),
    groups, renormalization and scale."""
    E, d, h, k = 8, 64, 96, 2
    dec = _write(tmp_path / "a.gguf", "llama", dict(expert_count=E, expert_used_count=k),
                 _moe_tensors(rng, E, d, h, ("q8_0", "q8_0"), fused=True))
    layer = read_gguf_moe(str(tmp_path / "a.gguf"), 0)
    assert not layer.w1.stacked and layer.w1.shape == (E, 2 * h, d)
    assert (layer.router, layer.router_options) == ("softmax_topk", {"renormalize": True})
    x = rng.standard_normal((5, d)).astype(np.float32)
    assert_close(layer.forward(x), ref.moe_forward(x, k=k, **_float_layer(dec, fused=True)))

    t = _moe_tensors(rng, E, d, h, ("q4_0", "q8_0"))
    bias = rng.standard_normal(E).astype(np.float32)
    t["blk.0.exp_probs_b.bias"] = (bias, "f32")
    meta = dict(expert_count=E, expert_used_count=k, expert_gating_func=2,
                expert_weights_norm=True, expert_weights_scale=2.5, expert_group_count=4,
                expert_group_used_count=2)
    dec = _write(tmp_path / "b.gguf", "deepseek2", meta, t)
    layer = read_gguf_moe(str(tmp_path / "b.gguf"), 0)
    assert layer.router == "sigmoid_topk"
    opts = dict(layer.router_options)
    np.testing.assert_array_equal(opts.pop("bias"), bias)
    assert opts == dict(renormalize=True, scale=2.5, n_group=4, topk_group=2)
    x = rng.standard_normal((7, d)).astype(np.float32)
    want = ref.moe_forward(x, k=k, router="sigmoid_topk", bias=bias, n_group=4, topk_group=2,
                           renormalize=True, scale=2.5, **_float_layer(dec))
    assert_close(layer.forward(x), want)
    y = layer.forward(x, router="softmax_topk")      # the caller's router, not the file's options
    assert_close(y, ref.moe_forward(x, k=k, **_float_layer(dec)))


def test_unmapped_routing_takes_the_callers_router(tmp_path, rng):
    """An architecture whose routing only llama.cpp's code knows (no gating metadata): no
    router, an error naming it until the caller passes one."""
    E, d, h = 4, 64, 64
    dec = _write(tmp_path / "m.gguf", "somemoe", dict(expert_count=E, expert_used_count=1),
                 _moe_tensors(rng, E, d, h, ("q8_0", "q8_0")))
    layer = read_gguf_moe(str(tmp_path / "m.gguf"), 0)
    assert layer.router is None and "somemoe" in layer.router_note
    x = rng.standard_normal((4, d)).astype(np.float32)
    with pytest.raises(ValueError, match="router: blk.0 of this 'somemoe' file"):
        layer.forward(x)
    y = layer.forward(x, router="softmax_topk", renormalize=False)
    assert_close(y, ref.moe_forward(x, k=1, renormalize=False, **_float_layer(dec)))
    assert read_gguf_moe(str(tmp_path / "m.gguf"), 0, k=3).k == 3


def test_bad_files_name_the_tensor(tmp_path, rng):
    E, d, h = 2, 64, 32
    t = {}
    for n in range(6):
        t.update(_moe_tensors(rng, E, d, h, ("q8_0", "f32"), n=n, shared=32 if n == 4 else 0))
    del t["blk.0.ffn_down_exps.weight"]                                    # missing
    for name in [s for s in t if s.startswith("blk.1.")]:                  # dense layer
        del t[name]
    t["blk.1.ffn_up.weight"] = (np.zeros((h, d), np.float32), "f32")
    t["blk.2.ffn_gate_exps.weight"] = (np.zeros((E, h + 32, d), np.float32), "q8_0")
    t["blk.3.ffn_up_exps.weight"] = (np.zeros((E, h, d), np.float32), "f16")  # no format
    del t["blk.4.ffn_down_shexp.weight"]                                   # half a shared
    t["blk.5.ffn_down_exps.weight"] = (np.zeros((E, d, h + 32), np.float32), "f32")
    _write(tmp_path / "bad.gguf", "qwen2moe", dict(block_count=6, expert_count=E), t)
    reader = gguf.GGUFReader(str(tmp_path / "bad.gguf"))
    cases = [(0, "blk.0.ffn_down_exps.weight: missing"),
             (1, "layer: blk.1 is not an MoE layer"),
             (2, r"blk.2.ffn_gate_exps.weight: expected shape \(E, R, C\) = \(2, 32, 64\)"),
             (3, "blk.3.ffn_up_exps.weight: tensor type F16 is not a fastmoe_nb"),
             (4, "blk.4.ffn_down_shexp.weight: missing"),
             (5, r"blk.5.ffn_down_exps.weight: expected shape \(E, R, C\) = \(2, 64, 32\)"),
             (6, "layer: expected a block number in 0..5")]
    for n, msg in cases:
        with pytest.raises(ValueError, match=msg):
            read_gguf_moe(reader, n, k=1)
    with pytest.raises(ValueError, match="k: the file has no qwen2moe.expert_used_count"):
        _read_without_k(tmp_path, rng)
    with pytest.raises(TypeError, match="layer: expected a block number"):
        read_gguf_moe(reader, "0")
    with pytest.raises(TypeError, match="source: expected a path"):
        read_gguf_moe(3, 0)


def _read_without_k(tmp_path, rng):
    _write(tmp_path / "nok.gguf", "qwen2moe", dict(expert_count=2),
           _moe_tensors(rng, 2, 64, 32, ("q8_0", "q8_0")))
    return read_gguf_moe(str(tmp_path / "nok.gguf"), 0)
