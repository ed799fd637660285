"""examples/train_charlm.py: its data pipeline and its model's hand-written backward."""
import importlib.util
import pathlib

import numba
import numpy as np
import pytest

import fastmoe_nb.nn as nn

_path = pathlib.Path(__file__).parents[1] / "examples" / "train_charlm.py"
_spec = importlib.util.spec_from_file_location("train_charlm", _path)
charlm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(charlm)


def test_corpus_is_the_stdlib_encoded_in_the_vocabulary():
    train, val, vocab = charlm.load_corpus(50_000)
    assert len(train) + len(val) >= 50_000 and len(val) > 0
    assert train.min() >= 0 and train.max() < len(vocab) and len(vocab) == 97
    text = "".join(vocab[i] for i in train[:2000])
    assert "def " in text or "import " in text          # Python source, decoded back
    ids, tgt = charlm.windows(train, np.array([0, 5]), 4)
    np.testing.assert_array_equal(ids[1], train[5:9])
    assert tgt[1] == train[9]


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_charlm_backward_matches_central_differences(ffn):
    rng = np.random.default_rng(0)
    if ffn == "dense":
        make = lambda: nn.MLP(6, 4, "swiglu", dtype=np.float64, rng=rng)        # noqa: E731
    else:
        make = lambda: nn.MoE(6, 3, 4, 2, dtype=np.float64, rng=rng,           # noqa: E731
                              aux_loss_coef=0.0)
    m = charlm.CharLM(V=7, n=3, d_emb=2, d=6, layers=2, make_ffn=make, rng=rng,
                      dtype=np.float64).eval()
    ids = rng.integers(0, 7, (5, 3))
    params = [p for _, p in m.named_parameters()]

    def fn(*values):
        for p, v in zip(params, values):
            p.value = v
        return m.forward(ids)

    def backward(dy):
        m.zero_grad()
        assert m.backward(dy) is None
        return [p.grad for p in params]

    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        nn.gradcheck(fn, [p.value for p in params], backward, max_entries=4)
    finally:
        numba.set_num_threads(n)
    if ffn == "moe":
        assert m.active_parameters() < m.num_parameters()
