"""Check the machine code of the numba backend's hot kernels for one CPU target, without
running them.

Each hot kernel is compiled (parallel and serial twin, float32 and float64, C-contiguous
operands: what ``fastloss`` runs on large inputs) for the target LLVM is given, and two
things are checked:

* **no slow instruction**: no gather or scatter (``vgather*``, ``vpgather*``, ``vscatter*``,
  ``vpscatter*``), no masked move (``vmaskmov*``, ``vpmaskmov*``: microcoded on AMD), no
  AVX-512 compress/expand (``vcompress*``, ``vpcompress*``, ``vexpand*``, ``vpexpand*``).
  These appear when LLVM vectorizes a loop whose addresses it cannot prove affine -- a
  Numba index it cannot prove non-negative keeps the negative-index wrap-around in the loop.
  On Zen 5 such a loop made the Numba cross-entropy 3x slower than the Cython one.
* **no scalar hot loop**: in the optimized LLVM IR, every innermost loop that does
  floating-point arithmetic is either a vector loop (its values are ``<N x float>`` /
  ``<N x double>``) or the scalar remainder of one (marked ``llvm.loop.isvectorized`` by the
  loop vectorizer).  A loop that the vectorizer left scalar is reported with the kernel it
  is in and its shape (its FP operations, ``_loop_key``); none is allowed -- even the row
  max vectorizes (as an integer max, ``_math.order_key``).  The widest vector width seen in
  the kernel's loops is reported (512 bits on an AVX-512 target, 256 on AVX2).

The target is Numba's: the host CPU, or ``NUMBA_CPU_NAME`` (with ``NUMBA_CPU_FEATURES=""``
for that CPU's own features) -- a cross target (``znver5`` on an AVX2 machine) is compiled
but never run.  Use a cache directory of its own (``NUMBA_CACHE_DIR``) for a cross target,
so that no machine code for another CPU lands in the package's cache::

    python bench/asm_check.py                      # the host CPU
    NUMBA_CPU_NAME=znver5 NUMBA_CPU_FEATURES= NUMBA_CACHE_DIR=/tmp/nc5 python bench/asm_check.py
    python bench/asm_check.py --json out.json      # every kernel's findings

Exit status 1 when a kernel has a finding.  ``tests/test_numba_asm.py`` runs it for the host
and for an AVX2 (``znver3``) and an AVX-512 (``znver5``) target.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

import numpy as np

# instructions that must not appear in a hot kernel (see the module docstring)
SLOW = re.compile(r"^\s*(v(?:p?gather|p?scatter|p?maskmov|p?compress|p?expand)\w*)\b", re.M)


def _hot_calls():
    """[(label, kernel, args)]: the entry kernels the backend calls, with the exact arguments
    its wrappers build, for float32 and float64 C-contiguous inputs of hot shapes."""
    from fastloss._backends import numba_backend as nb
    from fastloss._backends.numba_backend import _jit

    calls = []
    real = _jit._call_jit

    def capture(kern, work, *args):
        calls.append((kern, args))
        return 0.0

    _jit._call_jit = capture
    try:
        out = []
        for dt in (np.float32, np.float64):
            name = np.dtype(dt).name
            x = np.full((4, 300), 0.5, dt)
            xs = np.full((4, 8), 0.5, dt)  # the few-classes path
            y = np.full_like(x, 1 / 300)
            t = np.zeros(4, np.int64)
            n4 = np.zeros(4)
            g = np.zeros_like(x)
            e = np.full((64, 64), 0.5, dt)
            eo = np.zeros_like(e)
            todo = [
                ("logsumexp", nb.logsumexp, (x, np.zeros(4, dt))),
                ("softmax", nb.softmax, (x, g)),
                ("log_softmax", nb.log_softmax, (x, g)),
                ("softmax_backward", nb.softmax_backward, (x, y, g)),
                ("log_softmax_backward", nb.log_softmax_backward, (x, y, g)),
                ("cross_entropy", nb.cross_entropy, (x, t, None, -100, 0.0, 0.0, 0.0, n4, None, g, np.ones(4))),
                ("cross_entropy weight smoothing softcap lse", nb.cross_entropy,
                 (x, t, np.ones(300, dt), -100, 0.1, 0.0, 3.0, n4, n4, g, np.ones(4))),
                ("cross_entropy C=8", nb.cross_entropy,
                 (xs, t, None, -100, 0.0, 0.0, 0.0, n4, None, np.zeros_like(xs), np.ones(4))),
                # a middle shard [300, 600) of 900 classes, given the global lse: the one-pass kernel
                ("cross_entropy_shard", nb.cross_entropy_shard,
                 (x, t + 300, None, -100, 0.0, 0.0, 0.0, n4, 300, 900, n4, g, np.ones(4))),
                ("cross_entropy_shard weight smoothing softcap", nb.cross_entropy_shard,
                 (x, t + 300, np.ones(900, dt), -100, 0.1, 1e-4, 3.0, n4, 300, 900, n4, g, np.ones(4))),
                ("cross_entropy_soft", nb.cross_entropy_soft, (x, y, None, 0.0, 0.0, 0.0, n4, None, g, np.ones(4))),
                ("bce_with_logits", nb.bce_with_logits, (e, e, None, None, None, eo, 1.0, None)),
                ("bce", nb.bce, (e, e, None, None, eo, 1.0, None)),
                ("kl_div", nb.kl_div, (e, e, False, None, eo, 1.0, None)),
                ("kl_div log_target", nb.kl_div, (e, e, True, None, eo, 1.0, None)),
                ("mse", nb.mse, (e, e, None, eo, 1.0, None)),
                ("gaussian_nll", nb.gaussian_nll, (e, e, e, False, 1e-6, None, eo, eo, 1.0, None)),
            ]
            for label, fn, args in todo:
                del calls[:]
                fn(*args)
                for kern, kargs in calls:
                    out.append((f"{label} {name}", kern, kargs))
        return out
    finally:
        _jit._call_jit = real


# ----------------------------------------------------------------------------- IR loops
# after _FLAGS are removed: "%a = fadd <16 x float> ..." / "%c = fcmp ogt double ..."
_FP_OP = re.compile(r"=\s*(?:fadd|fsub|fmul|fdiv|fcmp \w+) (float|double|<\d+ x (?:float|double)>)")
_FLAGS = re.compile(r" (?:reassoc|nnan|ninf|nsz|arcp|contract|afn|fast)\b")
_FP_CALL = re.compile(r"call [^\n]*@llvm\.(?:fma|fmuladd|maxnum|minnum)\.(v\d+f\d+|f32|f64)")
_VEC_W = re.compile(r"<(\d+) x (float|double)>")


def _blocks(fn_text):
    """[(label, text)] of one function's basic blocks, in order."""
    out, label, cur = [], "entry", []
    for line in fn_text.splitlines():
        m = re.match(r"^([\w.$\"-]+):", line)
        if m:
            out.append((label, "\n".join(cur)))
            label, cur = m.group(1).strip('"'), []
        else:
            cur.append(line)
    out.append((label, "\n".join(cur)))
    return out


def _loop_key(body):
    """A loop's shape, for the report: the multiset of its FP operations."""
    ops = Counter(re.findall(r"=\s*(fadd|fsub|fmul|fdiv|fcmp \w+)", _FLAGS.sub("", body)))
    return ", ".join(f"{k}x{v}" for k, v in sorted(ops.items()))


def _natural_loops(blocks):
    """{(header, latch): set of block indices} of one function: for each back edge (a branch
    to an earlier block: LLVM lays a loop's header out before its latch), the blocks that
    reach the latch without passing through the header."""
    index = {lab: k for k, (lab, _) in enumerate(blocks)}
    succ = {}
    for k, (_, txt) in enumerate(blocks):
        term = txt.strip().splitlines()[-1] if txt.strip() else ""
        succ[k] = [index[t.strip('"')] for t in re.findall(r"label %([\w.\"$-]+)", term)
                   if t.strip('"') in index] if term.lstrip().startswith(("br ", "switch ")) else []
    pred = {k: [] for k in succ}
    for k, ss in succ.items():
        for t in ss:
            pred[t].append(k)
    loops = {}
    for k, ss in succ.items():
        for h in ss:
            if h > k:
                continue
            body, todo = {h, k}, ([k] if k != h else [])
            while todo:
                for p in pred[todo.pop()]:
                    if p not in body:
                        body.add(p)
                        todo.append(p)
            if min(body) == h:  # else h does not dominate the latch: not a natural loop
                loops[(h, k)] = body
    return loops


def _loops(ir):
    """Innermost loops doing floating-point work in every function of an optimized module:
    [(function, kind, vector_bits, key, body)], kind 'vector', 'remainder' or 'scalar'."""
    md = dict(re.findall(r"^(![\w.]+) = (?:distinct )?(![^\n]*)$", ir, re.M))
    res = []
    for fm in re.finditer(r"^define [^\n]*@(\"?[^(\s]+\"?)\(.*?^}", ir, re.M | re.S):
        fname = fm.group(1)
        blocks = _blocks(fm.group(0).split("\n", 1)[1])
        loops = _natural_loops(blocks)
        for (h, k), members in loops.items():
            if any(h2 != h and h2 in members for (h2, _k2) in loops):
                continue  # not innermost: another loop's header is inside
            if blocks[h][0].endswith((".prol", ".epil")) or ".prol." in blocks[h][0] or ".epil." in blocks[h][0]:
                continue  # the prologue/epilogue of an unrolled loop: a remainder of < 8 trips
            body = _FLAGS.sub("", "\n".join(blocks[b][1] for b in sorted(members)))
            if re.search(r"call [^\n]*@(?!llvm\.)", body):
                continue  # a driver loop calling a kernel function: the work is in the callee
            fp = _FP_OP.findall(body) + ["<%s x %s>" % (v[1:].split("f")[0], "float" if v.endswith("f32") else "double")
                                         if v.startswith("v") else v for v in _FP_CALL.findall(body)]
            if not fp:
                continue
            widths = [int(n) * (32 if t == "float" else 64) for n, t in _VEC_W.findall(" ".join(fp))]
            term = blocks[k][1].strip().splitlines()[-1]
            m = re.search(r"!llvm\.loop (![\w.]+)", term)
            meta = ""
            if m:
                meta = md.get(m.group(1), "")
                for ref in re.findall(r"![\w.]+", meta):
                    meta += md.get(ref, "")
            vec = any(w.startswith("<") for w in fp)
            if vec:
                kind = "vector"
            elif "llvm.loop.isvectorized" in meta:
                kind = "remainder"
            else:
                kind = "scalar"
            res.append((fname, kind, max(widths) if vec and widths else 0, _loop_key(body), body))
    return res


def check(calls):
    import numba
    from numba.core.caching import NullCache

    report = []
    for label, kern, args in calls:
        from fastloss._backends.numba_backend import _jit

        sig = tuple(numba.typeof(a) for a in args)
        for twin, disp in (("parallel", kern), ("serial", _jit._SERIAL[kern.py_func.__name__])):
            # compiled here, never loaded from the on-disk cache: Numba cannot show the machine
            # code of a cached kernel
            disp._cache = NullCache()
            disp.compile(sig)
            asm = disp.inspect_asm(sig)
            ir = disp.inspect_llvm(sig)
            slow = sorted(set(SLOW.findall(asm)))
            loops = _loops(ir)
            scalar = sorted({key for _, kind, _, key, _ in loops if kind == "scalar"})
            width = max([w for _, kind, w, _, _ in loops if kind == "vector"] + [0])
            report.append(dict(kernel=f"{label} ({twin})", entry=kern.py_func.__name__, slow=slow,
                               scalar_loops=scalar, vector_bits=width,
                               loops=Counter(kind for _, kind, _, _, _ in loops)))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the findings to FILE")
    ap.add_argument("--only", help="only kernels whose label contains this")
    a = ap.parse_args(argv)
    import numba

    from numba.core import codegen

    cg = codegen.JITCPUCodegen("probe")
    cpu, feats = cg._get_host_cpu_name(), cg._get_host_cpu_features()
    calls = [c for c in _hot_calls() if not a.only or a.only in c[0]]
    report = check(calls)
    # no vector loop at all: the inspection failed, or the kernel lost its vector loops
    bad = [r for r in report if r["slow"] or r["scalar_loops"] or not r["vector_bits"]]
    print(f"target cpu: {cpu} ({'host features' if feats else 'its own features'}); numba {numba.__version__}")
    for r in report:
        flag = "FAIL" if r in bad else "ok"
        print(f"{flag:4} {r['kernel']:45} vector bits {r['vector_bits']:3}  loops {dict(r['loops'])}"
              + (f"  slow: {r['slow']}" if r["slow"] else "")
              + (f"  scalar: {r['scalar_loops']}" if r["scalar_loops"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu, features=feats, report=report), f, indent=1, default=dict)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
