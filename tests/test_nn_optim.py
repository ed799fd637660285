"""SGD, AdamW and gradient clipping against hand-computed steps; frozen parameters."""
import numpy as np
import pytest

import fastmoe_nb.nn as nn


def param(values, grad, **kw):
    p = nn.Parameter(np.array(values, np.float64), **kw)
    p.grad[...] = grad
    return p


def test_sgd_plain_step():
    p = param([1.0, -2.0], [0.5, 0.25])
    nn.SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.value, [0.95, -2.025], rtol=1e-15)


def test_sgd_momentum_and_weight_decay_by_hand():
    p = param([1.0], [0.5])
    opt = nn.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step()      # g = 0.5 + 0.1*1 = 0.6; buf = 0.6; p = 1 - 0.06 = 0.94
    assert p.value[0] == pytest.approx(0.94, rel=1e-15)
    opt.step()      # g = 0.5 + 0.094 = 0.594; buf = 0.9*0.6 + 0.594 = 1.134; p = 0.94 - 0.1134
    assert p.value[0] == pytest.approx(0.8266, rel=1e-14)
    assert opt.state["0"]["momentum"][0] == pytest.approx(1.134, rel=1e-14)


def test_sgd_nesterov_by_hand():
    p = param([0.0], [1.0])
    opt = nn.SGD([p], lr=1.0, momentum=0.5, nesterov=True)
    opt.step()      # buf = 1; step = 1 + 0.5*1 = 1.5
    opt.step()      # buf = 0.5 + 1 = 1.5; step = 1 + 0.75 = 1.75
    assert p.value[0] == pytest.approx(-3.25, rel=1e-15)


def test_adamw_two_steps_by_hand():
    p = param([1.0, 2.0], [0.1, -0.2])
    opt = nn.AdamW([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    want = np.array([1.0, 2.0])
    m = v = np.zeros(2)
    for t in (1, 2):
        g = np.array([0.1, -0.2])
        want = want * (1 - 0.01 * 0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        want = want - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        opt.step()
        np.testing.assert_allclose(p.value, want, rtol=1e-14)
    # first step of Adam moves every coordinate by ~lr whatever the gradient's scale
    q = param([0.0, 0.0], [1e-3, -50.0])
    nn.AdamW([q], lr=0.01, weight_decay=0.0).step()
    np.testing.assert_allclose(q.value, [-0.01, 0.01], rtol=1e-4)


def test_decay_flag_and_frozen_parameters_are_respected():
    a = param([1.0], [0.0])
    b = param([1.0], [0.0], decay=False)
    c = param([1.0], [5.0], requires_grad=False)
    opt = nn.AdamW([a, b, c], lr=0.1, weight_decay=0.5)
    opt.step()
    assert a.value[0] == pytest.approx(0.95) and b.value[0] == 1.0 and c.value[0] == 1.0
    sgd = nn.SGD([c], lr=1.0)
    sgd.step()
    assert c.value[0] == 1.0


def test_optimizer_takes_a_module_and_keys_state_by_name():
    m = nn.Linear(3, 2)
    opt = nn.SGD(m, lr=0.1, momentum=0.9)
    assert sorted(opt.state) == ["b", "w"]
    assert set(opt.state_dict()) == {"t", "momentum/w", "momentum/b"}
    assert nn.AdamW(m).state_dict()["m/w"].dtype == np.float32


def test_float32_parameters_stay_float32():
    p = nn.Parameter(np.ones(3, np.float32))
    p.grad[...] = 0.5
    for opt in (nn.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1),
                nn.AdamW([p], lr=0.1)):
        opt.step()
        assert p.value.dtype == np.float32


def test_clip_grad_norm_by_hand():
    a = param([0.0, 0.0], [3.0, 0.0])
    b = param([0.0], [4.0])
    frozen = param([0.0], [100.0], requires_grad=False)
    norm = nn.clip_grad_norm([a, b, frozen], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-10)
    np.testing.assert_allclose(b.grad, [0.8], rtol=1e-10)
    assert frozen.grad[0] == 100.0
    assert nn.clip_grad_norm([a, b], max_norm=10.0) == pytest.approx(1.0)
    np.testing.assert_allclose(b.grad, [0.8], rtol=1e-10)   # under the limit: unchanged


def test_optimizer_bad_arguments():
    p = param([1.0], [0.0])
    with pytest.raises(ValueError, match="lr"):
        nn.SGD([p], lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        nn.SGD([p], momentum=1.0)
    with pytest.raises(ValueError, match="betas\\[1\\]"):
        nn.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        nn.AdamW([p], weight_decay=-1.0)
    with pytest.raises(TypeError, match="params\\[0\\]"):
        nn.SGD([np.ones(2)])
    with pytest.raises(ValueError, match="max_norm"):
        nn.clip_grad_norm([p], 0.0)


def test_training_reduces_a_regression_loss(rng):
    # y = x @ W* learned by Linear + mse; both optimizers should fit it
    W = rng.standard_normal((4, 2))
    x = rng.standard_normal((64, 4))
    y = x @ W
    for make in (lambda m: nn.SGD(m, lr=0.1, momentum=0.9), lambda m: nn.AdamW(m, lr=0.05)):
        m = nn.Linear(4, 2, dtype=np.float64, rng=0)
        opt = make(m)
        first = nn.mse(m.forward(x), y)[0]
        for _ in range(200):
            loss, g = nn.mse(m.forward(x), y)
            m.zero_grad()
            m.backward(g)
            opt.step()
        assert loss < 1e-3 * first
