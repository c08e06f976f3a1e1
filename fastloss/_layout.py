"""Turning N-d arrays into the 2-D views the kernels see, and results back.

Row-wise functions see ``(N, C)``: the class axis (or axes) moved last, the others
flattened.  Elementwise functions see ``(R, K)``: the array as is, reshaped around its
last axis -- or, for a Fortran-ordered array, its transpose, so that the kernels walk
memory in order.  Inputs are reshaped as views whenever NumPy can; outputs are allocated
with the input's layout (``empty_like``), so their 2-D views are views too, and an output
that cannot be viewed (a user's ``out`` of another layout) is computed in a temporary and
copied back once.
"""
from __future__ import annotations

import math

import numpy as np

from ._validate import mark_written


def rounded(a, dtype):
    """``a`` rounded once to the result ``dtype`` (float16/bfloat16 results are computed in
    float32): a value beyond the dtype's range becomes +-inf, as PyTorch's cast does, without
    NumPy's overflow warning."""
    with np.errstate(over="ignore"):
        return a.astype(dtype, copy=False)


class Layout:
    """How an array of ``shape`` is viewed as 2-D; ``view_in``/``output`` apply it."""

    def __init__(self, x: np.ndarray, axes=None):
        self.shape = x.shape
        self.like = x
        if axes is not None:  # row-wise: class axes last
            self.src = tuple(axes)
            self.dst = tuple(range(x.ndim - len(axes), x.ndim))
            self.transpose = False
            self.N = math.prod(s for i, s in enumerate(x.shape) if i not in axes)
            self.C = math.prod(x.shape[i] for i in axes)
        else:  # elementwise
            self.src = self.dst = ()
            self.transpose = x.ndim >= 2 and x.flags.f_contiguous and not x.flags.c_contiguous
            shp = x.shape[::-1] if self.transpose else x.shape
            if x.ndim == 0:
                self.N, self.C = 1, 1
            else:
                self.N, self.C = math.prod(shp[:-1]), shp[-1]

    @property
    def shape2d(self):
        return (self.N, self.C)

    def _moved(self, a):
        if self.transpose:
            return a.T
        return np.moveaxis(a, self.src, self.dst) if self.src != self.dst else a

    def view_in(self, a: np.ndarray, dtype=None) -> np.ndarray:
        """2-D view (or, where NumPy cannot view it, a copy) of an input shaped like ``x``,
        in ``dtype`` when given (a cast copy when ``a`` has another)."""
        if dtype is not None:
            a = a.astype(dtype, copy=False)
        return self._moved(a).reshape(self.shape2d)

    def view_out(self, a: np.ndarray):
        """``(v, back)``: a 2-D view ``v`` of ``a`` and ``None``, or a temporary ``v`` and the
        N-d view ``back`` of ``a`` it must be copied into after the kernel ran."""
        m = self._moved(a)
        v = m.reshape(self.shape2d)
        if v.size == 0 or np.may_share_memory(v, a):
            return v, None
        return np.empty(self.shape2d, a.dtype), m

    def _unmove(self, buf2d):
        """The N-d array (shaped like ``x``) whose 2-D view is the C-contiguous ``buf2d``."""
        if self.transpose:
            return buf2d.reshape(self.shape[::-1]).T
        if self.src == self.dst:
            return buf2d.reshape(self.shape)
        # the moved shape: the other axes in order, then the class axes in the order of src
        moved = [s for i, s in enumerate(self.shape) if i not in self.src] + [self.shape[i] for i in self.src]
        return np.moveaxis(buf2d.reshape(moved), self.dst, self.src)

    def output(self, user, out_dtype, cdt, wrap=True):
        """A 2-D compute buffer of dtype ``cdt`` for an output shaped like ``x``, and a
        ``finish()`` that returns the user-facing array (``user`` itself when given).
        (``wrap``: whether a device layout returns its result in the caller's library;
        host arrays are the caller's already.)

        ``user`` (validated already) receives the result.  With ``user=None`` a new array
        is made with the input's layout when that layout gives a 2-D view, else with the
        class axis contiguous (a moved-axis view, as ``np.moveaxis`` returns): no copy.
        """
        if user is None:
            target = np.empty_like(self.like, dtype=cdt)
            v, back = self.view_out(target)
            if back is not None:  # the input's layout has no 2-D view: lay it out class-last
                v = np.empty(self.shape2d, cdt)
                target = self._unmove(v)
            if out_dtype == cdt:
                return v, lambda: target
            return v, lambda: rounded(target, out_dtype)
        target = user if user.dtype == cdt else np.empty_like(user, dtype=cdt)
        v, back = self.view_out(target)

        def finish():
            if back is not None:
                np.copyto(back, v.reshape(back.shape))
            if target is not user:
                with np.errstate(over="ignore"):  # rounded, as in rounded()
                    np.copyto(user, target, casting="unsafe")
            return mark_written(user)

        return v, finish
