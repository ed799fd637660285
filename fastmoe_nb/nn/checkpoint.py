"""Checkpoints: a model's parameters (and an optimizer's state) in one .npz file.

Keys are ``param/<dotted name>`` and ``optim/<slot>/<dotted name>`` (+ ``optim/t``). ``save``
writes a temporary file beside the target and renames it over the target with os.replace, so
a crash mid-write leaves the previous checkpoint intact. ``load`` checks every name, shape and
dtype before it changes anything.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
import zlib

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
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot save the checkpoint: its directory "
                                f"{folder} does not exist or is not a directory", path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# what np.load raises on a truncated or corrupt file; zipfile's NotImplementedError is its
# answer to a corrupt header that names an unknown compression method (not a missing feature)
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError,
               NotImplementedError)


def _read(path):
    """{key: array} of the .npz checkpoint at path. A missing file is FileNotFoundError; a
    file that cannot be read as an .npz (truncated, corrupt, a single .npy array) is a
    ValueError naming the path."""
    try:
        f = np.load(os.fspath(path), allow_pickle=False)
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e
    if isinstance(f, np.ndarray):
        raise ValueError(f"{path}: holds a single array (.npy format), not a checkpoint: "
                         f"expected an .npz checkpoint written by nn.save")
    try:
        with f:
            return {k: f[k] for k in f.files}
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def _unreadable(path, e):
    return ValueError(f"{path}: not a readable checkpoint (truncated or corrupt .npz file?): "
                      f"{type(e).__name__}: {e}")


def load(path, model, optimizer=None):
    """Read a checkpoint written by save into model (and optimizer), in place.

    Every parameter name, shape and dtype, and every optimizer key, shape, dtype and the step
    count's kind, is checked first; then all of it is written, or (on any ValueError /
    TypeError) nothing is."""
    _check_types(model, optimizer)
    data = _read(path)
    foreign = sorted(k for k in data if not k.startswith((PARAM, OPTIM)))
    if foreign:
        raise ValueError(f"{path}: unexpected keys (neither {PARAM}... nor {OPTIM}...): "
                         + ", ".join(foreign[:8]) + (" ..." if len(foreign) > 8 else ""))
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
    checked = None
    if optimizer is not None:
        osd = {k[len(OPTIM):]: a for k, a in data.items() if k.startswith(OPTIM)}
        if not osd:
            raise ValueError(f"{path}: holds no optimizer state (saved without an optimizer)")
        try:
            checked = optimizer.check_state_dict(osd)   # validates, changes nothing
        except (ValueError, TypeError) as e:
            raise type(e)(f"{path}: {e}") from None
    # everything is checked: from here on nothing can fail
    if checked is not None:
        optimizer.apply_state_dict(checked)
    for n, p in params.items():
        p.value[...] = stored[n]
    return model
