"""nn.save / nn.load: round trip, atomic writes, name / shape / dtype mismatches."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmoe_nb.nn as nn


def model(d=4, h=3, dtype=np.float32, seed=0):
    return nn.Sequential(nn.Embedding(7, d, dtype=dtype, rng=seed), nn.RMSNorm(d, dtype=dtype),
                         nn.Linear(d, h, dtype=dtype, rng=seed + 1))


def trained(seed=0):
    m = model(seed=seed)
    opt = nn.AdamW(m, lr=0.01)
    ids = np.arange(5) % 7
    for _ in range(3):
        m.forward(ids)
        m.zero_grad()
        m.backward(np.ones((5, 3), np.float32))
        opt.step()
    return m, opt


def test_round_trip_restores_parameters_and_optimizer_state(tmp_path):
    m, opt = trained()
    path = tmp_path / "ckpt.npz"
    nn.save(path, m, opt)
    m2 = model(seed=5)
    opt2 = nn.AdamW(m2, lr=0.01)
    ref_w = m2.layers[2].w.value              # load writes in place: references stay valid
    nn.load(path, m2, opt2)
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        np.testing.assert_array_equal(a.value, b.value, err_msg=n)
    assert ref_w is m2.layers[2].w.value
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert opt2.t == opt.t == 3
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k], err_msg=k)
    # the exact path given, no ".npz" appended twice, and no temporary left behind
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]


def test_model_only_checkpoint(tmp_path):
    m, _ = trained()
    nn.save(tmp_path / "m.npz", m)
    m2 = model(seed=9)
    nn.load(tmp_path / "m.npz", m2)
    np.testing.assert_array_equal(m2.layers[0].w.value, m.layers[0].w.value)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        nn.load(tmp_path / "m.npz", m2, nn.SGD(m2))


def test_crash_mid_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    m, opt = trained()
    path = tmp_path / "ckpt.npz"
    nn.save(path, m, opt)
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    m.layers[2].w.value[...] = 42
    with pytest.raises(OSError, match="disk full"):
        nn.save(path, m, opt)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    monkeypatch.undo()
    m2 = model(seed=3)
    nn.load(path, m2)
    assert not (m2.layers[2].w.value == 42).any()


def test_mismatches_raise_before_anything_changes(tmp_path):
    m, opt = trained()
    path = tmp_path / "ckpt.npz"
    nn.save(path, m, opt)

    wider = model(d=5)
    w0 = [p.value.copy() for p in wider.parameters()]
    with pytest.raises(ValueError, match=r"parameter layers.0.w: the model expects shape "
                                         r"\(7, 5\) float32, the file holds \(7, 4\) float32"):
        nn.load(path, wider)
    assert all((a == p.value).all() for a, p in zip(w0, wider.parameters()))

    with pytest.raises(ValueError, match="float64"):
        nn.load(path, model(dtype=np.float64))

    other = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"missing layers.1.b, layers.1.w; unexpected layers.1.g"):
        nn.load(path, other)

    m3 = model()
    sgd = nn.SGD(m3, momentum=0.9)
    before = [p.value.copy() for p in m3.parameters()]
    with pytest.raises(ValueError, match="optimizer state: missing momentum/"):
        nn.load(path, m3, sgd)
    assert all((a == p.value).all() for a, p in zip(before, m3.parameters()))


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model: expected a fastmoe_nb.nn.Module"):
        nn.save(tmp_path / "x.npz", {"w": np.ones(2)})
    with pytest.raises(TypeError, match="optimizer"):
        nn.save(tmp_path / "x.npz", model(), optimizer="adam")
    with pytest.raises(FileNotFoundError):
        nn.load(tmp_path / "missing.npz", model())


# ----------------------------------------------------------------------------- failed loads

def snapshot(m, opt):
    return ({n: p.value.copy() for n, p in m.named_parameters()}, opt.t,
            {k: np.array(a, copy=True) for k, a in opt.state_dict().items()})


def assert_unchanged(m, opt, snap):
    """Every parameter, optimizer array (dtype included) and the step count as in snap."""
    values, t, sd = snap
    now_p = dict(m.named_parameters())
    assert set(now_p) == set(values)
    for n, a in values.items():
        assert now_p[n].value.dtype == a.dtype and np.array_equal(now_p[n].value, a), n
    assert opt.t == t
    now = opt.state_dict()
    assert set(now) == set(sd)
    for k, a in sd.items():
        assert now[k].dtype == a.dtype and np.array_equal(now[k], a), k


def assert_load_refused(path, m, opt, exc, match=None):
    """nn.load(path) raises exactly exc (message matching) and changes nothing; -> message."""
    snap = snapshot(m, opt)
    with pytest.raises(exc, match=match) as info:
        nn.load(path, m, opt)
    assert type(info.value) in (exc if isinstance(exc, tuple) else (exc,)), type(info.value)
    assert_unchanged(m, opt, snap)
    return str(info.value)


def tampered(tmp_path, **changes):
    """A checkpoint of trained() with some optim/ entries replaced."""
    m, opt = trained()
    path = tmp_path / "ckpt.npz"
    nn.save(path, m, opt)
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data.update({"optim/" + k: v for k, v in changes.items()})
    np.savez(path, **data)
    return path


def fresh():
    m = model(seed=5)
    return m, nn.AdamW(m, lr=0.01)


def last_slot_key():
    return list(fresh()[1].state_dict())[-1]


def test_failed_optimizer_load_changes_nothing(tmp_path):
    key = last_slot_key()
    shape = fresh()[1].state_dict()[key].shape
    path = tampered(tmp_path, t=np.array(99, np.int64), **{key: np.full(shape, "x")})
    m, opt = fresh()
    snap = snapshot(m, opt)
    assert_load_refused(path, m, opt, TypeError,
                        f"{key} expected a real floating array of dtype float32, got dtype <U1")
    # the same through load_state_dict
    with np.load(path) as f:
        sd = {k[len("optim/"):]: f[k] for k in f.files if k.startswith("optim/")}
    with pytest.raises(TypeError, match=key):
        opt.load_state_dict(sd)
    assert_unchanged(m, opt, snap)


def test_complex_optimizer_state_is_rejected(tmp_path):
    key = last_slot_key()
    shape = fresh()[1].state_dict()[key].shape
    path = tampered(tmp_path, **{key: np.ones(shape, np.complex64) * 1j})
    m, opt = fresh()
    assert_load_refused(path, m, opt, TypeError,
                        f"{key} expected a real floating array of dtype float32, got dtype "
                        "complex64")


@pytest.mark.parametrize("t, exc, msg", [
    (np.arange(3), ValueError, r"t expected a scalar \(shape \(\)\), got shape \(3,\)"),
    (np.array(2.5), TypeError, "t expected an integer scalar, got dtype float64"),
    (np.array(True), TypeError, "t expected an integer scalar, got dtype bool"),
    (np.array(-1), ValueError, "t expected a non-negative step count, got -1"),
])
def test_bad_step_count_is_rejected(tmp_path, t, exc, msg):
    path = tampered(tmp_path, t=t)
    m, opt = fresh()
    assert_load_refused(path, m, opt, exc, msg)


def test_optimizer_shape_mismatch_changes_nothing(tmp_path):
    key = last_slot_key()
    path = tampered(tmp_path, **{key: np.zeros((1, 1), np.float32)})
    m, opt = fresh()
    assert_load_refused(path, m, opt, ValueError, f"{key} expected shape")


def test_single_npy_file_is_rejected(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.ones(3))
    m, opt = fresh()
    assert_load_refused(path, m, opt, ValueError,
                        r"w\.npy.*expected an \.npz checkpoint written by nn\.save")


def test_save_into_a_missing_directory_raises_and_leaves_nothing(tmp_path):
    m, opt = trained()
    blocker = tmp_path / "some_file"
    blocker.write_bytes(b"not a directory")
    for path in (blocker / "sub" / "ckpt.npz", tmp_path / "absent" / "ckpt.npz"):
        with pytest.raises(FileNotFoundError, match="cannot save the checkpoint: its directory "
                                                    ".* does not exist or is not a directory"):
            nn.save(path, m, opt)
    assert sorted(os.listdir(tmp_path)) == ["some_file"]
    assert blocker.read_bytes() == b"not a directory"


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(4, 3, rng=0),
    lambda: nn.Embedding(7, 4, rng=0),
    lambda: nn.RMSNorm(4),
    lambda: nn.LayerNorm(4),
    lambda: nn.MLP(4, 3, rng=0),
    lambda: nn.MoE(4, 3, num_experts=4, k=2, rng=0),
])
def test_backward_before_forward_is_a_runtime_error(make):
    m = make()
    with pytest.raises(RuntimeError, match=r"\.backward: call forward first"):
        m.backward(np.ones((2, 4), np.float32))


# ------------------------------------------------- property-based: corrupted checkpoints (MoE)

MOE_OPTIMIZERS = {
    "adamw": lambda m: nn.AdamW(m, lr=0.01),
    "sgd_momentum": lambda m: nn.SGD(m, lr=0.01, momentum=0.9),
}


def moe_trained(opt_name, seed, steps):
    m = nn.MoE(4, 3, num_experts=4, k=2, rng=seed)
    opt = MOE_OPTIMIZERS[opt_name](m)
    x = np.random.default_rng(seed).standard_normal((5, 4)).astype(np.float32)
    for _ in range(steps):
        m.forward(x)
        m.zero_grad()
        m.backward(np.ones((5, 4), np.float32))
        opt.step()
    return m, opt


_SAVED = {}


def moe_saved(opt_name, tmp_dir):
    """{key: array} of a checkpoint of a trained MoE (built once per optimizer)."""
    if opt_name not in _SAVED:
        m, opt = moe_trained(opt_name, seed=0, steps=3)
        path = os.path.join(tmp_dir, f"src_{opt_name}.npz")
        nn.save(path, m, opt)
        with np.load(path) as f:
            _SAVED[opt_name] = {k: f[k] for k in f.files}
    return _SAVED[opt_name]


def short_name(key):
    for prefix in ("param/", "optim/"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def wrong_dtypes(a):
    if a.dtype.kind in "iu":      # the step count: any integer kind is a valid step count
        return [np.complex64, np.float64, np.float32, np.bool_, "<U3"]
    other = np.float64 if a.dtype == np.float32 else np.float32
    return [np.complex64, np.complex128, "<U3", np.int64, np.int32, np.bool_, other]


@st.composite
def corruptions(draw, data):
    """(new data dict, key the error must name)."""
    data = dict(data)
    kind = draw(st.sampled_from(["truncate", "dtype", "rank", "drop", "unknown"]))
    if kind == "unknown":
        key = draw(st.sampled_from(["param/ghost", "param/w1.extra", "optim/m/ghost",
                                    "optim/momentum/router_w2", "optim/lr", "junk",
                                    "extra_param"]))
        data[key] = np.zeros(draw(st.sampled_from([(), (3,), (4, 4)])), np.float32)
        return data, key
    key = draw(st.sampled_from(sorted(data)))
    a = data[key]
    if kind == "drop":
        del data[key]
    elif kind == "truncate":
        if a.ndim == 0:
            data[key] = np.zeros((0,), a.dtype)
        else:
            axis = draw(st.integers(0, a.ndim - 1))
            n = draw(st.integers(0, a.shape[axis] - 1))
            data[key] = np.take(a, np.arange(n), axis=axis)
    elif kind == "dtype":
        dt = np.dtype(draw(st.sampled_from(wrong_dtypes(a))))
        data[key] = np.full(a.shape, "abc", dt) if dt.kind == "U" else a.astype(dt)
    else:  # rank
        if a.ndim >= 2 and draw(st.booleans()):
            data[key] = a.reshape(-1)
        elif a.ndim >= 1 and draw(st.booleans()):
            data[key] = a[None]
        else:
            data[key] = a[..., None]
    return data, key


@pytest.mark.parametrize("opt_name", sorted(MOE_OPTIMIZERS))
def test_any_corrupted_entry_is_rejected_and_changes_nothing(tmp_path_factory, opt_name):
    src_dir = str(tmp_path_factory.mktemp("src"))
    base = moe_saved(opt_name, src_dir)
    assert "optim/t" in base and any(k.startswith("param/") for k in base)

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(corruptions(base))
    def check(case):
        data, key = case
        path = tmp_path_factory.mktemp("bad") / "ckpt.npz"
        np.savez(path, **data)
        m, opt = moe_trained(opt_name, seed=7, steps=2)
        msg = assert_load_refused(path, m, opt, (ValueError, TypeError))
        assert key in msg or short_name(key) in msg, (key, msg)

    check()


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9, 0.99])
@pytest.mark.parametrize("opt_name", sorted(MOE_OPTIMIZERS))
def test_truncated_file_is_a_value_error_naming_the_path(tmp_path, opt_name, fraction):
    src, src_opt = moe_trained(opt_name, seed=0, steps=3)
    path = tmp_path / "ckpt.npz"
    nn.save(path, src, src_opt)
    b = path.read_bytes()
    path.write_bytes(b[:int(len(b) * fraction)])
    m, opt = moe_trained(opt_name, seed=7, steps=2)
    msg = assert_load_refused(path, m, opt, ValueError, "not a readable checkpoint")
    assert str(path) in msg


def test_garbage_file_is_a_value_error_naming_the_path(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"\x00garbage, not a zip" * 10)
    m, opt = moe_trained("adamw", seed=7, steps=1)
    msg = assert_load_refused(path, m, opt, ValueError, "not a readable checkpoint")
    assert str(path) in msg
