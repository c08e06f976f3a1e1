"""``warmup()``: compile (and cache) the numba backend's kernels ahead of use."""
from __future__ import annotations

import numpy as np

from . import _jit


def warmup(dtypes=("float32", "float64"), layouts=("C", "A"), progress=None, processes=1) -> int:
    """Compile (and cache on disk) the kernel specializations the public layer can reach.

    For each compute dtype and each layout -- ``"C"`` (C-contiguous operands) and ``"A"``
    (strided views, which also stand for Fortran order) -- every entry point is called on a
    tiny input with the argument types the public layer produces: for the row-wise kernels
    with and without class weights and gradient; every gradient of the cross-entropies (hard
    targets on the general and the few-classes path, probability targets, class-sharded) with
    both gradient scales the public layer passes -- a scalar (``reduction="mean"``/``"sum"``,
    and ``"none"`` with a scalar ``grad_output``) and per-row (``"none"`` with an array) --
    and also written in place over a strided input (``grad_out=logits``: the gradient is then
    strided too; in place over a C-contiguous input has the separate buffer's types);
    ``softmax``/``log_softmax`` with ``out`` a new array and, strided, ``out=x``; for the
    elementwise kernels each reduction's (loss, grad, grad_output)
    pattern, with the optional operands (weight, pos_weight, var) absent or broadcast
    (stride-0).  Rarer mixtures (say a C-contiguous input with a
    Fortran-ordered ``grad_out``) compile on first use.
    Each kernel has a parallel and a serial twin (small calls run serially, see ``_call``);
    both are compiled.  Later processes load the machine code from Numba's cache instead of
    compiling.

    Parameters
    ----------
    dtypes, layouts : sequences of str
        Subsets to compile.
    progress : callable, optional
        Called as ``progress(done, total, label)`` after each compilation (with
        ``processes > 1``: after each group of them).
    processes : int
        Worker processes compiling at once (Numba compiles on one core; its disk cache is safe
        to fill from several processes).  The jobs are grouped by entry point, the largest
        groups first; no two processes compile the same kernel.
        Ignored (compiled here) when Numba has no writable cache: the workers' machine code
        would be lost.

    Returns
    -------
    int
        Number of kernel calls made.
    """
    jobs = _jobs(dtypes, layouts)
    if processes > 1 and _jit._CACHE_INFO["enabled"] and not _jit._NOJIT:
        return _in_processes(jobs, processes, progress)
    return _run_jobs(jobs, progress)


def _jobs(dtypes, layouts) -> list:
    """The warm-up's kernel calls, ``[(label, entry point, args)]`` (see :func:`warmup`)."""
    import itertools

    from . import (bce, bce_with_logits, cross_entropy, cross_entropy_shard, cross_entropy_soft, gaussian_nll,
                   kl_div, log_softmax, log_softmax_backward, logsumexp, mse, softmax, softmax_backward)

    jobs = []

    def arr(shape, dt, layout, fill=0.5):
        a = np.full(shape, fill, dt)
        if layout == "C":
            return a
        big = np.full((shape[0], 2 * shape[1]) if len(shape) == 2 else (2 * shape[0],), fill, dt)
        return big[:, ::2] if len(shape) == 2 else big[::2]

    for dname, lay in itertools.product(dtypes, layouts):
        dt = np.dtype(dname)
        for c in (40, 8):  # 8 classes: the small-class path
            n = 3
            x = arr((n, c), dt, lay)
            y = arr((n, c), dt, lay, 1.0 / c)
            t = np.zeros(n, np.int64)
            w1 = np.ones(c, dt)
            for fn in (logsumexp, softmax, log_softmax):
                out = np.zeros(n if fn is logsumexp else (n, c), dt)
                jobs.append((f"{fn.__name__} {dname} {lay}", fn, (x, out)))
                if lay == "A" and fn is not logsumexp:  # out=x on a strided view: 'A' out
                    xi = arr((n, c), dt, lay)
                    jobs.append((f"{fn.__name__} {dname} {lay} in place", fn, (xi, xi)))
            for fn in (softmax_backward, log_softmax_backward):
                jobs.append((f"{fn.__name__} {dname} {lay}", fn, (x, y, np.zeros((n, c), dt))))
            for w, g in itertools.product((None, w1), (None, np.zeros((n, c), dt))):
                # the gradient scale: 1.0 without a gradient (the public layer passes no other);
                # with one, both kinds -- a scalar and a per-row float64 array -- which the
                # entry point turns into one operand type (so does it for a missing weight):
                # the second of each pair compiles nothing, it checks that no type is missed
                for gs in ((1.0,) if g is None else (1.0, np.ones(n))):
                    jobs.append((f"cross_entropy {dname} {lay} C={c}", cross_entropy,
                                 (x, t, w, -100, 0.1, 0.0, 0.0, np.zeros(n), None, g, gs)))
                    if lay == "A" and g is not None:  # in place on a strided view: grad is 'A' too
                        xi = arr((n, c), dt, lay)
                        jobs.append((f"cross_entropy {dname} {lay} C={c} in place", cross_entropy,
                                     (xi, t, w, -100, 0.1, 0.0, 0.0, np.zeros(n), None, xi, gs)))
                    if c == 40:  # one row kernel for every C: C=8 would add no type
                        jobs.append((f"cross_entropy_soft {dname} {lay}", cross_entropy_soft,
                                     (x, y, w, 0.1, 0.0, 0.0, np.zeros(n), None, g, gs)))
                        if lay == "A" and g is not None:
                            xi = arr((n, c), dt, lay)
                            jobs.append((f"cross_entropy_soft {dname} {lay} in place", cross_entropy_soft,
                                         (xi, y, w, 0.1, 0.0, 0.0, np.zeros(n), None, xi, gs)))
                        # a middle shard [c, 2c) of 3c classes with the whole (3c,) weight vector
                        wk = None if w is None else np.ones(3 * c, dt)
                        jobs.append((f"cross_entropy_shard {dname} {lay}", cross_entropy_shard,
                                     (x, t + c, wk, -100, 0.1, 0.0, 0.0, np.zeros(n), c, 3 * c, np.zeros(n), g,
                                      gs)))
                        if lay == "A" and g is not None:  # in place on a strided view
                            xi = arr((n, c), dt, lay)
                            jobs.append((f"cross_entropy_shard {dname} {lay} in place", cross_entropy_shard,
                                         (xi, t + c, wk, -100, 0.1, 0.0, 0.0, np.zeros(n), c, 3 * c,
                                          np.zeros(n), xi, gs)))
        shape = (2, 16)
        a = arr(shape, dt, lay)
        bcast = np.broadcast_to(np.full(shape[1], 0.5, dt), shape)  # stride-0 rows
        out = np.zeros(shape, dt)
        # (loss, grad, gout) as the public layer passes them: reductions "mean"/"sum" give no
        # loss array and a scalar grad scale; "none" gives a loss array and, with a grad, an
        # optional (broadcast) grad_output
        outs = [(None, None, None), (None, out, None), (out, None, None), (out, out, None),
                (out, out, bcast)]
        # optional operands (weight, pos_weight, var) arrive broadcast to the input's shape
        opts = (None, bcast) if lay == "C" else (None,)
        lbl = f"{dname} {lay}"
        for loss, g, go in outs:
            for log_target in (False, True):  # one kernel each
                jobs.append(("kl_div " + lbl, kl_div, (a, a, log_target, loss, g, 1.0, go)))
            jobs.append(("mse " + lbl, mse, (a, a, loss, g, 1.0, go)))
            for w in opts:
                jobs.append(("bce " + lbl, bce, (a, a, w, loss, g, 1.0, go)))
                for pw in opts:
                    jobs.append(("bce_with_logits " + lbl, bce_with_logits, (a, a, w, pw, loss, g, 1.0, go)))
            for var in ((a, bcast) if lay == "C" else (a,)):
                jobs.append(("gaussian_nll " + lbl, gaussian_nll,
                             (a, a, var, False, 1e-6, loss, g, g, 1.0, go)))
    return jobs


def _run_jobs(jobs, progress=None) -> int:
    """Both twins of each job, in this process (the in-process warm-up, and the worker side
    of :func:`_in_processes`); ``progress`` after each call.  Returns the calls made."""
    n = 0
    try:
        for mode in ("serial", "parallel"):  # both twins of every kernel
            _jit._force_mode = mode
            for label, fn, args in jobs:
                fn(*args)
                n += 1
                if progress is not None:
                    progress(n, 2 * len(jobs), f"{label} ({mode})")
    finally:
        _jit._force_mode = None
    return n


def _in_processes(jobs, processes, progress) -> int:
    """Run ``jobs`` in ``processes`` fresh (spawned) processes, grouped by entry point: every
    specialization of a kernel (all dtypes and layouts) is compiled by one worker, because
    Numba keeps one index file per kernel and two processes adding entries to it at once
    could drop one (it would then be compiled again on first use)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    groups = {}
    for job in jobs:
        groups.setdefault(job[1].__name__, []).append(job)
    units = sorted(groups.values(), key=len, reverse=True)
    total = 2 * len(jobs)
    done = 0
    # spawn, not fork: a forked child of a process that ran a parallel kernel cannot use
    # the threading layer, and the workers compile parallel kernels
    with ProcessPoolExecutor(max_workers=min(processes, len(units)), mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_run_jobs, unit): unit for unit in units}
        for fut in as_completed(futs):
            done += fut.result()
            if progress is not None:
                unit = futs[fut]
                progress(done, total, f"{unit[0][1].__name__} ({len(unit)} calls x 2 twins)")
    return total
