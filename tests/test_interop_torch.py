"""The PyTorch bridge: zero-copy tensors, MoEFunction / ExpertsFunction under
torch.autograd.gradcheck (float64), the MoE module against fm.moe_forward / moe_backward."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastmoe_nb as fm  # noqa: E402
from fastmoe_nb import reference as ref  # noqa: E402
from fastmoe_nb.formats import QuantizedWeights  # noqa: E402
from helpers import assert_close, make_experts, make_layer  # noqa: E402
from fastmoe_nb.interop import as_array, to_torch  # noqa: E402
from fastmoe_nb.interop import pytorch  # noqa: E402
from fastmoe_nb.interop.pytorch import MoE, experts, moe  # noqa: E402


def _leaves(*arrays):
    return [torch.from_numpy(a.copy()).requires_grad_() for a in arrays]


def test_tensors_cross_without_copies():
    t = torch.randn(4, 3, requires_grad=True)        # requires grad: detached, not copied
    a = as_array(t, "t")
    assert isinstance(a, np.ndarray) and a.ctypes.data == t.data_ptr()
    back = to_torch(a)
    assert back.data_ptr() == t.data_ptr() and not back.requires_grad
    n = np.arange(6.0).reshape(2, 3)
    assert to_torch(n).data_ptr() == n.ctypes.data
    n.flags.writeable = False                        # read-only: the one case that copies
    c = to_torch(n)
    assert c.data_ptr() != n.ctypes.data and torch.equal(c, torch.from_numpy(n.copy()))
    with pytest.raises(TypeError, match="w: expected a tensor NumPy can view"):
        as_array(torch.zeros(2, dtype=torch.bfloat16), "w")


@pytest.mark.parametrize("router,opts", [
    ("softmax_topk", {}),
    ("sigmoid_topk", dict(n_group=2, topk_group=1, scale=1.5)),
])
def test_moe_function_gradcheck_float64(rng, router, opts):
    T, d, h, E, k = 5, 4, 3, 4, 2
    x, rw, w1, w2 = _leaves(*make_layer(rng, T, d, h, E, np.float64).args)
    bias = torch.from_numpy(rng.standard_normal(E) * 0.1) if router == "sigmoid_topk" else None

    def f(x, rw, w1, w2):
        return moe(x, rw, w1, w2, k, router=router, bias=bias, **opts)

    assert torch.autograd.gradcheck(f, (x, rw, w1, w2), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_moe_function_router_b_gradcheck_float64(rng, router):
    T, d, h, E, k = 5, 4, 3, 4, 2
    x, rw, w1, w2, rb = _leaves(*make_layer(rng, T, d, h, E, np.float64).args,
                                rng.standard_normal(E) * 0.5)

    def f(x, rw, w1, w2, rb):
        return moe(x, rw, w1, w2, k, router=router, router_b=rb)

    assert torch.autograd.gradcheck(f, (x, rw, w1, w2, rb), eps=1e-6, atol=1e-6, fast_mode=True)
    m = MoE(d, h, E, k, router_bias=True, dtype=torch.float64)
    assert m.router_b.shape == (E,) and not m.router_b.detach().any()
    m(x.detach()).sum().backward()
    assert m.router_b.grad is not None and m.router_b.grad.shape == (E,)


def test_moe_function_shared_expert_gradcheck_float64(rng):
    T, d, h, E, k = 4, 4, 3, 3, 2
    x, rw, w1, w2 = _leaves(*make_layer(rng, T, d, h, E, np.float64, trans_w=True).args)
    sw1, sw2, sg = _leaves(rng.standard_normal((d, 2 * h)) * 0.5,
                           rng.standard_normal((h, d)) * 0.5, rng.standard_normal(d) * 0.5)

    def f(*a):
        return moe(*a[:4], k, shared_w1=a[4], shared_w2=a[5], shared_gate_w=a[6],
                   trans_w=True)

    assert torch.autograd.gradcheck(f, (x, rw, w1, w2, sw1, sw2, sg), fast_mode=True)


def test_experts_function_gradcheck_float64(rng):
    """HF's interface: the routing is given; gradients reach x, the weights, w1 and w2."""
    T, d, h, E, k = 6, 4, 3, 4, 2
    x, _, w1, w2 = _leaves(*make_layer(rng, T, d, h, E, np.float64, trans_w=True).args)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 1], [1, 0], [3, 1]])   # expert 2 empty
    wts = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, wts, w1, w2: experts(x, idx, wts, w1, w2, trans_w=True), (x, wts, w1, w2),
        fast_mode=True)
    y = experts(x, idx, wts, w1, w2, trans_w=True)
    with torch.no_grad():
        y0 = experts(x, idx, wts, w1, w2, trans_w=True)
    assert y.grad_fn is not None and y0.grad_fn is None
    assert_close(y0.numpy(), y.detach().numpy())


def test_experts_bf16_weights_run_in_place_frozen_in_float32(rng, monkeypatch):
    """bf16 w1 / w2 (a bf16 model's experts): y, dx and d_weights equal the float64 reference
    on the same bf16 values to float32 rounding (the compute is float32: bf16 weights decode
    exactly); the weights are read in place; a bf16 x gives y rounded to bf16 once; asking
    for the weights' gradient, a non-contiguous weight and float16 are clear errors."""
    T, d, h, E, k = 13, 40, 24, 5, 2                 # expert 4 left empty
    x, _, w1, w2 = make_layer(rng, T, d, h, E, np.float32, trans_w=True).args
    w1b, w2b = (torch.from_numpy(w).to(torch.bfloat16) for w in (w1, w2))
    idx = torch.from_numpy(make_experts(rng, T, E, k, empty=True)).long()
    wts = torch.rand(T, k, generator=torch.Generator().manual_seed(3))
    dy = rng.standard_normal((T, d)).astype(np.float32)
    seen = []
    real = pytorch.routed_experts
    monkeypatch.setattr(pytorch, "routed_experts",
                        lambda *a, **kw: (seen.append(a[3:5]), real(*a, **kw))[1])
    xt, wt = torch.from_numpy(x).requires_grad_(), wts.clone().requires_grad_()
    y = experts(xt, idx, wt, w1b, w2b, trans_w=True)
    y.backward(torch.from_numpy(dy))
    for q, t in zip(seen[0], (w1b, w2b)):
        assert isinstance(q, QuantizedWeights) and q.format == "bf16"
        assert np.shares_memory(q.blocks, t.view(torch.int16).numpy())
    f64 = lambda t: t.double().numpy()              # noqa: E731
    want, ctx = ref.routed_experts(f64(xt.detach()), idx.numpy(), f64(wts), f64(w1b), f64(w2b),
                                   "swiglu", True, return_context=True)
    dx, d_wts, _, _ = ref.routed_experts_backward(dy.astype(np.float64), ctx)
    assert y.dtype == torch.float32
    assert_close(y.detach().numpy(), want.astype(np.float32))
    assert_close(xt.grad.numpy(), dx.astype(np.float32))
    assert_close(wt.grad.numpy(), d_wts.astype(np.float32))
    xb = xt.detach().to(torch.bfloat16)
    yb = experts(xb, idx, wts, w1b, w2b, trans_w=True)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, experts(xb.float(), idx, wts, w1b, w2b, trans_w=True).bfloat16())
    w1g = w1b.clone().requires_grad_()              # forward works; backward asks for dw1
    y = experts(xt, idx, wts, w1g, w2b, trans_w=True)
    with pytest.raises(RuntimeError, match=r"w1: fastmoe_nb's bfloat16 experts are frozen.*"
                                           r"requires_grad_\(False\)"):
        y.sum().backward()
    with pytest.raises(ValueError, match="w2: expected a contiguous bfloat16 tensor"):
        experts(xt, idx, wts, w1b, w2b.transpose(1, 2).contiguous().transpose(1, 2),
                trans_w=True)
    with pytest.raises(TypeError, match="w1: float16 is neither"):
        experts(xt, idx, wts, w1b.half(), w2b, trans_w=True)


def test_moe_module_matches_numpy_forward_and_backward(rng):
    torch.manual_seed(0)
    m = MoE(d=8, h=5, num_experts=4, k=2)
    x = torch.randn(2, 3, 8, requires_grad=True)     # (B, S, d): flattened to (T, d)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    p = [t.detach().numpy() for t in (x.reshape(6, 8), m.router_w, m.w1, m.w2)]
    want, ctx = fm.moe_forward(*p, k=2, return_context=True)
    assert y.shape == x.shape and y.dtype == torch.float32
    np.testing.assert_array_equal(y.detach().numpy().reshape(6, 8), want)
    dx, grads = fm.moe_backward(dy.numpy().reshape(6, 8), ctx)
    np.testing.assert_array_equal(x.grad.numpy().reshape(6, 8), dx)
    for name in ("router_w", "w1", "w2"):
        assert_close(getattr(m, name).grad.numpy(), grads[name])
    assert "num_experts=4" in repr(m)
    with torch.no_grad():                            # inference: no Function, no activations
        y0 = m(x)
    assert y0.grad_fn is None
    np.testing.assert_array_equal(y0.numpy().reshape(6, 8), fm.moe_forward(*p, k=2))


def test_bad_input_is_rejected_before_any_work(rng):
    x, rw, w1, w2 = (torch.from_numpy(a) for a in make_layer(rng, 4, 6, 3, 3).args)
    with pytest.raises(TypeError, match="w1: expected dtype float32"):
        moe(x, rw, w1.double(), w2, 2)
    with pytest.raises(ValueError, match="k: expected an integer in 1..E"):
        moe(x, rw, w1, w2, 4)
    with pytest.raises(ValueError, match="experts: expected expert ids"):
        experts(x, torch.full((4, 2), 3), torch.ones(4, 2), w1, w2)
