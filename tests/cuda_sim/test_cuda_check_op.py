"""The op families' check_op cases of tests/test_*.py, unchanged, on the device: every array
argument copied there, the results read back, compared with fastmoe_nb.reference (forward and
backward; central differences stay on the host). Tiny shapes of the one table: the simulator
runs each thread in Python."""
import numpy as np
import pytest

import test_activations as act
import test_dispatch as dispatch
import test_gemm as gemm
import test_moe as moe
import test_routing as routing

from helpers import SHAPES, check_op

TINY = [SHAPES[n] for n in ("T=0", "tiny", "tiny,k=E", "tiny,E=1")]
FLOAT32 = [np.float32]


def _check(op, ref, make_inputs, dtypes=(np.float32, np.float64), **kw):
    check_op(op, ref, make_inputs, TINY, backends=("cuda",), dtypes=dtypes, **kw)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh", "relu"])
def test_activations(activation):
    _check(act.OP, act.REF, act._inputs(activation))


def test_routing():
    _check(routing.SOFTMAX, routing.SOFTMAX_REF, routing._logits(3.0))
    _check(routing.SOFTMAX_TOPK, routing.SOFTMAX_TOPK_REF,
           routing._softmax_topk_inputs(routing.K_OF["k"], True))
    _check(routing.SIGMOID, routing.SIGMOID_REF,
           routing._sigmoid_inputs(routing.K_OF["E"], True, (1, 1), False, 2.5))


def test_dispatch():
    _check(dispatch.PERMUTE, dispatch.PERMUTE_REF, dispatch._permute_inputs(False), rtol=0)
    _check(dispatch.COMBINE, dispatch.COMBINE_REF, dispatch._combine_inputs(True, False))


@pytest.mark.parametrize("trans_w", [False, True])
def test_grouped_gemm(trans_w):
    _check(gemm.GEMM, gemm.GEMM_REF, gemm._gemm_inputs(trans_w))


@pytest.mark.parametrize("config", ["mixtral", "sigmoid,shared,gate,trans_w,capacity"])
def test_moe_layer(config):
    layer_opts, call_opts, _ = moe.CONFIGS[config]
    _check(moe.LAYER, moe.LAYER_REF, moe._layer_inputs(layer_opts, call_opts), FLOAT32)


def test_shared_expert():
    _check(moe._shared(moe.fm.shared_forward, moe.fm.shared_backward),
           moe._shared(moe.ref.shared_forward, moe.ref.shared_backward),
           moe._shared_inputs(True, "swiglu"), FLOAT32)
