"""Checkpoints: a model's parameters (and an optimizer's state) in one .npz file.

Keys are ``param/<dotted name>`` and ``optim/<slot>/<dotted name>`` (+ ``optim/t``). ``save``
writes a temporary file beside the target and renames it over the target with os.replace, so
a crash mid-write leaves the previous checkpoint intact. ``load`` checks every name, shape and
dtype before it changes anything.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .module import Module
from .optim import Optimizer, _describe_mismatch

PARAM = "param/"
OPTIM = "optim/"


def _check_types(model, optimizer):
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a fastmoe_nb.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a fastmoe_nb.nn optimizer or None, got "
                        f"{type(optimizer).__name__}")


def save(path, model, optimizer=None):
    """Write model's parameters (and optimizer's state) to path (.npz), atomically."""
    _check_types(model, optimizer)
    arrays = {PARAM + n: p.value for n, p in model.named_parameters()}
    if optimizer is not None:
        arrays.update({OPTIM + k: a for k, a in optimizer.state_dict().items()})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load(path, model, optimizer=None):
    """Read a checkpoint written by save into model (and optimizer), in place.

    Raises ValueError naming the missing / unexpected parameters, or the first parameter whose
    shape or dtype differs, before any parameter is changed."""
    _check_types(model, optimizer)
    with np.load(os.fspath(path), allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    params = dict(model.named_parameters())
    stored = {k[len(PARAM):]: a for k, a in data.items() if k.startswith(PARAM)}
    if set(stored) != set(params):
        raise ValueError(f"{path}: parameters do not match the model: " + _describe_mismatch(
            sorted(set(params) - set(stored)), sorted(set(stored) - set(params))))
    for n, p in params.items():
        a = stored[n]
        if a.shape != p.shape or a.dtype != p.dtype:
            raise ValueError(f"{path}: parameter {n}: the model expects shape {p.shape} "
                             f"{p.dtype}, the file holds {a.shape} {a.dtype}")
    if optimizer is not None:
        osd = {k[len(OPTIM):]: a for k, a in data.items() if k.startswith(OPTIM)}
        if not osd:
            raise ValueError(f"{path}: holds no optimizer state (saved without an optimizer)")
        try:
            optimizer.load_state_dict(osd)   # validates everything before writing
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for n, p in params.items():
        p.value[...] = stored[n]
    return model
