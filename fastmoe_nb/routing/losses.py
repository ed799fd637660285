"""Balancing losses and updates, each with its gradient into the router logits.

load_balancing_loss(logits, experts, normalization) with p = softmax(logits) over the E
experts, P_e = mean over (unmasked) tokens of p[t, e], and f_e = (assignments to e among the
counted choices) / tokens:

| normalization        | choices counted | value                  | balanced value | used by |
|----------------------|-----------------|------------------------|----------------|---------|
| "switch" / "gshard"  | experts[:, 0]   | E * sum_e f_e P_e      | 1              | Switch Transformer, GShard, Mesh TF, Tutel, HF Switch, DeepSpeed top-1/top-2 |
| "mixtral"            | all k           | E * sum_e f_e P_e      | k              | HF transformers `load_balancing_loss_func` (Mixtral, Qwen-MoE, OLMoE, ...) |
| "megablocks"         | all k           | E / k * sum_e f_e P_e  | 1              | MegaBlocks `batched_load_balancing_loss` |
| "deepspeed"          | all k           | E^2 / k * mean_e(f_e P_e) | 1           | DeepSpeed `topkgating` (equal to "megablocks") |

The counts are a step function of the logits: the gradient runs through P only. Coefficients
(Switch's 1e-2, Mixtral's router_aux_loss_coef) are the caller's. Losses over several layers:
concatenate their logits and experts along T (HF does the same: all terms are means).
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..kernels.cpu import routers as kr
from . import _checks

NORMALIZATIONS = ("switch", "gshard", "mixtral", "megablocks", "deepspeed")
_ONE = np.ones(1, np.float64)


def _balance_inputs(logits, experts, normalization, mask, check_finite):
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    experts = _checks.experts("experts", experts, T, E)
    chk.check_choice("normalization", normalization, NORMALIZATIONS)
    m = _checks.token_mask(mask, T)
    return logits, experts, m


def _balance_terms(logits, experts, normalization, m):
    """-> (f (E,), P (E,), coefficient c, tokens M): loss = c * sum f * P."""
    E = logits.shape[1]
    k = experts.shape[1]
    use = 1 if normalization in ("switch", "gshard") else k
    psum, count, M = kr.balance_sums_kernel(logits, experts, use, _ONE if m is None else m,
                                            m is not None)
    if M == 0:
        return np.zeros(E), np.zeros(E), 0.0, 0.0
    c = float(E) if use == 1 or normalization == "mixtral" else E / k
    return count / M, psum / M, c, M


def load_balancing_loss(logits, experts, normalization="mixtral", mask=None, check_finite=True):
    """logits: (T, E), experts: (T, k) the chosen experts, mask: (T,) 1 for real tokens, 0 for
    padding (None: all real) -> the auxiliary loss (a float; 0 when no token is counted).

    See the module docstring for the forms; "mixtral" equals HF transformers'
    load_balancing_loss_func(logits, E, k, attention_mask) for the same experts."""
    logits, experts, m = _balance_inputs(logits, experts, normalization, mask, check_finite)
    f, P, c, _ = _balance_terms(logits, experts, normalization, m)
    if normalization == "deepspeed":
        E = logits.shape[1]
        return float(E * E / experts.shape[1] * np.mean(f * P)) if f.size else 0.0
    return float(c * np.dot(f, P))


def load_balancing_loss_backward(d_loss, logits, experts, normalization="mixtral", mask=None):
    """d_loss: scalar -> d_logits (T, E): d_loss * c / M * m_t * p_t * (f - <f, p_t>)."""
    d = chk.check_real("d_loss", d_loss)
    logits, experts, m = _balance_inputs(logits, experts, normalization, mask, False)
    T, E = logits.shape
    k = experts.shape[1]
    use = 1 if normalization in ("switch", "gshard") else k
    mt = np.ones(T) if m is None else m           # the counts need no probabilities
    count = np.bincount(experts[:, :use].reshape(-1), np.repeat(mt, use), minlength=E)
    M = float(mt.sum())
    f = count / M if M else np.zeros(E)
    c = float(E) if use == 1 or normalization == "mixtral" else E / k
    d_logits = np.empty_like(logits)
    g = np.ascontiguousarray(d * c / M * f if M else np.zeros_like(f))
    kr.balance_backward_kernel(logits, g, _ONE if m is None else m, m is not None, d_logits)
    return d_logits


def _z_inputs(logits, mask, check_finite):
    logits = _checks.scores("logits", logits, check_finite)
    m = _checks.token_mask(mask, logits.shape[0])
    M = float(logits.shape[0]) if m is None else float(m.sum())
    return logits, m, M


def z_loss(logits, mask=None, check_finite=True):
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over (unmasked) tokens of
    logsumexp(logits[t])^2, as HF transformers' router_z_loss_func (0 when no token)."""
    logits, m, M = _z_inputs(logits, mask, check_finite)
    lse = np.empty(logits.shape[0], np.float64)
    kr.logsumexp_kernel(logits, lse)
    sq = lse * lse if m is None else lse * lse * m
    return float(sq.sum() / M) if M else 0.0


def z_loss_backward(d_loss, logits, mask=None):
    """d_loss: scalar -> d_logits (T, E) = d_loss / M * m_t * 2 lse_t * softmax(logits[t])."""
    d = chk.check_real("d_loss", d_loss)
    logits, m, M = _z_inputs(logits, mask, False)
    d_logits = np.empty_like(logits)
    kr.z_loss_backward_kernel(logits, d / M if M else 0.0, _ONE if m is None else m,
                              m is not None, d_logits)
    return d_logits


def _seq_inputs(logits, experts, seq_len, check_finite):
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    experts = _checks.experts("experts", experts, T, E)
    if seq_len is None:
        seq_len = max(T, 1)
    seq_len = chk.check_int("seq_len", seq_len, 1, None, what="a positive integer")
    if T % seq_len:
        raise ValueError(f"seq_len: expected a divisor of T = {T} (the tokens are B sequences "
                         f"of seq_len each), got {seq_len}")
    f, P = kr.seq_balance_kernel(logits, experts, seq_len)
    return logits, seq_len, f, P


def sequence_balance_loss(logits, experts, seq_len=None, check_finite=True):
    """DeepSeek-V3's sequence-wise balance loss (without its alpha): the mean over the B
    sequences of sum_e f_e P_e, f_e = E / (k S) * (assignments to e in the sequence),
    P_e = mean over the sequence's S tokens of s'[t, e], s' = sigmoid(logits) normalized to sum
    1 over the experts (the unbiased affinities; experts are the biased choice).

    logits: (T, E) raw router logits, experts: (T, k), T = B * seq_len (None: one sequence)."""
    _, _, f, P = _seq_inputs(logits, experts, seq_len, check_finite)
    return float((f * P).sum(axis=1).mean()) if f.shape[0] else 0.0


def sequence_balance_loss_backward(d_loss, logits, experts, seq_len=None):
    """d_loss: scalar -> d_logits (T, E), through P only (f counts choices)."""
    d = chk.check_real("d_loss", d_loss)
    logits, seq_len, f, _ = _seq_inputs(logits, experts, seq_len, False)
    g = np.ascontiguousarray(d / max(f.shape[0], 1) * f)
    d_logits = np.empty_like(logits)
    kr.seq_balance_backward_kernel(logits, g, seq_len, d_logits)
    return d_logits


def update_bias(bias, load, gamma=1e-3):
    """DeepSeek-V3's auxiliary-loss-free balancing: after a step, return
    bias + gamma * sign(mean(load) - load) (a new array; the caller's is not modified).

    bias: (E,) the sigmoid_topk choice bias, load: (E,) tokens each expert received in the step
    (e.g. ctx.counts). Overloaded experts go down by gamma, underloaded ones up, exact ones
    stay. No gradient: the bias only chooses experts."""
    bias = chk.check_float("bias", _checks.host("bias", bias), ndim=1)
    E = bias.shape[0]
    load = chk.check_array("load", _checks.host("load", load), shape=(E,))
    if np.dtype(load.dtype).kind not in "iuf":
        raise TypeError(f"load: expected a numeric (E,) array, got {np.dtype(load.dtype)}")
    gamma = chk.check_real("gamma", gamma)
    lf = np.asarray(load, np.float64)
    return (np.asarray(bias, np.float64) + gamma * np.sign(lf.mean() - lf)).astype(bias.dtype)
