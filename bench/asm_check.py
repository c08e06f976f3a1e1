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
  max vectorizes (as an integer max, ``_math.order_key``) -- except the cold loops a kernel
  marks as scalar on purpose (``_cols._scalar``: an empty side-effecting ``asm``, which
  LLVM's vectorizer cannot widen; there a vectorized loop would gather and scatter).  The widest vector width seen in
  the kernel's loops is reported (512 bits on an AVX-512 target, 256 on AVX2).
* **no overlap test between two operands that are the same memory**: LLVM guards a vector
  loop that reads one array and writes another with a run-time overlap test, and runs its
  scalar loop when the ranges overlap.  A gradient written in place over the logits
  (``grad_out=logits``; ``softmax(x, out=x)``) is such a pair, and the scalar loop took 7x
  the time (numba cross-entropy, 2048 x 32000 float32).  The kernels avoid it with a
  run-time ``inplace`` flag under which they read the row through the output array; so the
  in-place variants below pass the same array as input and output, each kernel is compiled
  with its ``inplace`` flag as a compile-time constant (only the path that call takes is
  left), and the pointers every overlap test (``diff.check``, ``bound0/1``) compares are traced
  back to the kernel's arguments, also through the calls into the row helpers (which LLVM does
  not inline): none may compare two arguments given the same memory.  On the code before the
  fix it reported the cross-entropies (hard, soft) in place, which measured 5-7x slower than
  with a separate output (2048 x 32000 and 1024 x 32000 float32, Zen 5), and the serial
  ``log_softmax``; it missed ``softmax`` in place (7x slower then): the test that failed there
  is not recognized, so a clean report is no proof.

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
            xi = np.full_like(x, 0.5)  # in place: the output is the input
            todo = [
                ("logsumexp", nb.logsumexp, (x, np.zeros(4, dt))),
                ("softmax", nb.softmax, (x, g)),
                ("softmax in place", nb.softmax, (xi, xi)),
                ("log_softmax", nb.log_softmax, (x, g)),
                ("log_softmax in place", nb.log_softmax, (xi, xi)),
                ("softmax_backward", nb.softmax_backward, (x, y, g)),
                ("log_softmax_backward", nb.log_softmax_backward, (x, y, g)),
                ("cross_entropy", nb.cross_entropy, (x, t, None, -100, 0.0, 0.0, 0.0, n4, None, g, np.ones(4))),
                # a scalar gradient scale (reduction "mean"/"sum"), in place as in a training step
                ("cross_entropy mean", nb.cross_entropy, (x, t, None, -100, 0.0, 0.0, 0.0, n4, None, g, 1.0)),
                ("cross_entropy mean in place", nb.cross_entropy,
                 (xi, t, None, -100, 0.0, 0.0, 0.0, n4, None, xi, 1.0)),
                ("cross_entropy weight smoothing in place", nb.cross_entropy,
                 (xi, t, np.ones(300, dt), -100, 0.1, 1e-4, 0.0, n4, np.zeros(4), xi, 1.0)),
                ("cross_entropy weight smoothing softcap lse", nb.cross_entropy,
                 (x, t, np.ones(300, dt), -100, 0.1, 0.0, 3.0, n4, n4, g, np.ones(4))),
                ("cross_entropy C=8", nb.cross_entropy,
                 (xs, t, None, -100, 0.0, 0.0, 0.0, n4, None, np.zeros_like(xs), np.ones(4))),
                ("cross_entropy C=8 in place", nb.cross_entropy, (xs, t, None, -100, 0.0, 0.0, 0.0, n4, None, xs, 1.0)),
                # a middle shard [300, 600) of 900 classes, given the global lse: the one-pass kernel
                ("cross_entropy_shard", nb.cross_entropy_shard,
                 (x, t + 300, None, -100, 0.0, 0.0, 0.0, n4, 300, 900, n4, g, np.ones(4))),
                ("cross_entropy_shard weight smoothing softcap", nb.cross_entropy_shard,
                 (x, t + 300, np.ones(900, dt), -100, 0.1, 1e-4, 3.0, n4, 300, 900, n4, g, np.ones(4))),
                ("cross_entropy_shard in place", nb.cross_entropy_shard,
                 (xi, t + 300, None, -100, 0.0, 0.0, 0.0, n4, 300, 900, n4, xi, 1.0)),
                ("cross_entropy_soft", nb.cross_entropy_soft, (x, y, None, 0.0, 0.0, 0.0, n4, None, g, np.ones(4))),
                ("cross_entropy_soft in place", nb.cross_entropy_soft,
                 (xi, y, None, 0.1, 0.0, 0.0, n4, None, xi, 1.0)),
                ("bce_with_logits", nb.bce_with_logits, (e, e, None, None, None, eo, 1.0, None)),
                ("bce", nb.bce, (e, e, None, None, eo, 1.0, None)),
                ("kl_div", nb.kl_div, (e, e, False, None, eo, 1.0, None)),
                ("kl_div log_target", nb.kl_div, (e, e, True, None, eo, 1.0, None)),
                ("mse", nb.mse, (e, e, None, eo, 1.0, None)),
                ("gaussian_nll", nb.gaussian_nll, (e, e, e, False, 1e-6, None, eo, np.zeros_like(e), 1.0, None)),
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
            if 'asm sideeffect ""' in body:
                continue  # kept scalar on purpose (numba_backend._cols._scalar): a cold loop
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


# ----------------------------------------------------------------------------- overlap tests
_DEF = re.compile(r"^\s*(%[\w.$-]+|%\"[^\"]+\") = (.*)$", re.M)
_NAME = re.compile(r"%[\w.$-]+|%\"[^\"]+\"")
# a kernel argument's data pointer: Numba names the flattened fields of argument ``x`` of an
# array type ``arg.x.0`` .. ``arg.x.6``; field 4 is the data pointer (the others are the
# meminfo, parent, size, itemsize, shape and strides)
_DATA_ARG = re.compile(r'^%"?arg\.(\w+)\.4"?$')


def _roots(name, defs, params):
    """The parameters of a function (``params``: their names) that the value ``name`` is
    computed from: its definitions followed back through address arithmetic (getelementptr,
    phi, select, casts, integer arithmetic for LLVM's pointer-difference checks), never
    through a load or a call -- a loaded value (a class index, say) is data, not a base
    address."""
    out, seen, todo = set(), set(), [name]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in params:
            out.add(v)
            continue
        rhs = defs.get(v)
        if rhs is None or rhs.lstrip().startswith(("load ", "call ", "tail call ")):
            continue
        todo.extend(_NAME.findall(rhs))
    return out


def _operands(text, start):
    """The comma-separated operands of the parenthesis opened at ``text[start - 1]`` and
    the index after its closing parenthesis."""
    depth, cur, ops, k = 0, [], [], start
    while k < len(text):
        ch = text[k]
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            ops.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        k += 1
    if "".join(cur).strip():
        ops.append("".join(cur).strip())
    return ops, k + 1


# LLVM's names for the run-time overlap tests of a vectorized loop: a pointer-difference check
# (``diff.check``, for two accesses with the same stride) or a range check (``bound0``,
# ``bound1``); once SimplifyCFG has merged the ``vector.memcheck`` block into its neighbours the
# names are what is left of it (suffixes: a number, ``.i`` once inlined)
_OVERLAP_TEST = re.compile(r'^%"?(?:diff\.check|bound0|bound1)[\w.]*"?$')
_DEFINE = re.compile(r'^define [^\n]*?@("[^"]+"|[^(\s]+)\(', re.M)
_CALL = re.compile(r'\bcall [^@\n]*@("[^"]+"|[\w.$-]+)\(')


def _functions(ir):
    """``{name: (params, tests, calls)}`` of every function defined in a module: its
    parameters' names in order; ``tests``, the pairs of its parameters that an overlap test of
    its vectorized loops compares; ``calls``, ``[(callee, [parameters each operand is
    computed from])]``."""
    funcs = {}
    for m in _DEFINE.finditer(ir):
        ops, end = _operands(ir, m.end())
        params = [o.split()[-1] if o.split() else "" for o in ops]
        close = re.search(r"^}", ir[end:], re.M)
        body = ir[end:end + close.start()] if close else ir[end:]
        defs = dict(_DEF.findall(body))
        pset = set(params)
        tests = set()
        for name, rhs in defs.items():
            if _OVERLAP_TEST.match(name):
                roots = set()
                for op in _NAME.findall(rhs):
                    roots |= _roots(op, defs, pset)
                roots = sorted(roots)
                tests |= {(a, b) for i, a in enumerate(roots) for b in roots[i + 1:]}
        calls = []
        for c in _CALL.finditer(body):
            cops, _ = _operands(body, c.end())
            calls.append((c.group(1), [_roots(o.split()[-1], defs, pset) if o.split() else set() for o in cops]))
        funcs[m.group(1)] = (params, tests, calls)
    return funcs


def _overlap_tests(ir, kernel):
    """The pairs of the kernel's arguments whose memory a run-time overlap test of a
    vectorized loop compares: ``{(a, b)}``, names sorted.  A pair given the same memory fails
    its test at every call and the loop runs scalar.

    ``kernel``: the Python function's name.  Its functions (by the mangled name ``<len><name>``,
    and its parallel loops' bodies, ``__numba_parfor_gufunc``) name the data pointer of
    argument ``x`` ``arg.x.4``.  The row helpers they call (``_ce_row``, ``_sumexp_store``)
    are compiled on their own and *called* -- LLVM does not inline them -- so the arguments
    are followed into every call: a helper's overlap test between two of its parameters counts
    for the kernel arguments those parameters are computed from (a helper given the logits
    and the gradient as two arguments compares them even when they are the same memory).
    (A helper's specialization that the path under test never calls is not in the module:
    the untaken path is pruned before typing.)"""
    funcs = _functions(ir)
    pairs = set()
    done = set()

    def visit(fname, env, depth):
        key = (fname, tuple(sorted((k, tuple(sorted(v))) for k, v in env.items())))
        if key in done or depth > 20:
            return
        done.add(key)
        params, tests, calls = funcs[fname]
        for a, b in tests:
            pairs.update(tuple(sorted((u, v))) for u in env.get(a, ()) for v in env.get(b, ()) if u != v)
        for callee, ops in calls:
            if callee not in funcs:
                # a helper whose code is not in this module (Numba links some from their own
                # library): given two kernel arguments as two operands, it is assumed to compare
                # them (it does when it reads one and writes the other).  The in-place paths
                # hand the helpers None for the logits.
                names = [set().union(*(env.get(r, set()) for r in roots)) if roots else set() for roots in ops]
                for i, a in enumerate(names):
                    for b in names[i + 1:]:
                        pairs.update(tuple(sorted((u, v))) for u in a for v in b if u != v)
                continue
            cenv = {}
            for cp, roots in zip(funcs[callee][0], ops):
                names = set().union(*(env.get(r, set()) for r in roots)) if roots else set()
                if names:
                    cenv[cp] = names
            if cenv:
                visit(callee, cenv, depth + 1)

    for fname, (params, _, _) in funcs.items():
        if f"{len(kernel)}{kernel}B" in fname or "__numba_parfor_gufunc" in fname:
            env = {}
            for p_ in params:
                m = _DATA_ARG.match(p_)
                if m:
                    env[p_] = {m.group(1)}
            visit(fname, env, 0)
    return pairs


def _same_memory_args(kern, args):
    """Pairs of the kernel's 2-D array arguments given the same memory, one of them written
    (a gradient or an output written over the input), names sorted.  (Two read-only views
    of one array need no overlap test; the per-row vectors of these made-up calls may share
    a buffer no real call shares.)"""
    import inspect

    names = list(inspect.signature(kern.py_func).parameters)
    arrs = [(n, a) for n, a in zip(names, args) if isinstance(a, np.ndarray) and a.ndim == 2 and a.size]
    return {tuple(sorted((n1, n2))) for i, (n1, a1) in enumerate(arrs) for n2, a2 in arrs[i + 1:]
            if a1.__array_interface__["data"][0] == a2.__array_interface__["data"][0]
            and (a1.flags.writeable or a2.flags.writeable)}


def _signature(kern, args):
    """The types of ``args``, with a kernel's ``inplace`` flag as a literal: compiled with its
    value a constant, the kernel holds only the path this call takes, so that the path
    taken in place is checked on its own."""
    import inspect

    import numba

    names = list(inspect.signature(kern.py_func).parameters)
    return tuple(numba.types.literal(bool(a)) if n == "inplace" else numba.typeof(a) for n, a in zip(names, args))


def check(calls):
    from numba.core.caching import NullCache

    report = []
    for label, kern, args in calls:
        from fastloss._backends.numba_backend import _jit

        sig = _signature(kern, args)
        same = _same_memory_args(kern, args)
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
            overlap = _overlap_tests(ir, disp.py_func.__name__)
            report.append(dict(kernel=f"{label} ({twin})", entry=kern.py_func.__name__, slow=slow,
                               scalar_loops=scalar, vector_bits=width,
                               loops=Counter(kind for _, kind, _, _, _ in loops),
                               same_memory=sorted(same), overlap_tests=sorted(overlap),
                               aliased_tests=sorted(overlap & same)))
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
    bad = [r for r in report if r["slow"] or r["scalar_loops"] or not r["vector_bits"] or r["aliased_tests"]]
    print(f"target cpu: {cpu} ({'host features' if feats else 'its own features'}); numba {numba.__version__}")
    for r in report:
        flag = "FAIL" if r in bad else "ok"
        print(f"{flag:4} {r['kernel']:45} vector bits {r['vector_bits']:3}  loops {dict(r['loops'])}"
              + (f"  slow: {r['slow']}" if r["slow"] else "")
              + (f"  scalar: {r['scalar_loops']}" if r["scalar_loops"] else "")
              + (f"  overlap test on the same memory: {r['aliased_tests']}" if r["aliased_tests"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu, features=feats, report=report), f, indent=1, default=dict)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
