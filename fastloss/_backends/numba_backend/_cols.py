"""The few-classes (C <= ``fastloss._config.NUMBA_SMALL_C``) hard-target cross-entropy of the
numba backend: blocks of rows turned on their side so that every step vectorizes across rows.
"""
from __future__ import annotations

import numpy as np

from ... import _config as cfg
from ._jit import _JIT, _NOJIT, _kernel, njit, numba, prange
from ._math import cast_like, neg_log_p, sub_sub, vexp, vexpn, vlog
from ._rows import _finite, _mx, _softcap

# rows per block of float32 logits, half as many of float64 -- the same bytes (fastloss/_config.py:
# NUMBA_COL_ROWS): its (C, rows) buffers stay in L1/L2; a global, so compiled into the kernel
_SB = cfg.NUMBA_COL_ROWS
# most exponentials a row sums in the dtype of x before adding the partial sum in float64
# (the Cython kernel's FL_CB_SUMC): at most 32 terms in [0, 1]
_SUMC = 32


# ----------------------------------------------------------------------------- tile transpose
def _tile_w(a):
    """The side of a :func:`_tile`: 8 float32 or 4 float64 -- one 256-bit vector per row."""
    return 8 if a.itemsize == 4 else 4


def _block_rows(x):
    """Rows per block of the column-block kernel for logits ``x``: ``_SB`` for float32, half as
    many for float64 (the same bytes of scratch).  Compiled, a constant of the kernel's
    specialization (from the dtype, not read from the array at run time)."""
    return _SB if x.itemsize <= 4 else _SB // 2


def _gscale_block(gsa, n, r0, r1):
    """The gradient scales of rows ``[r0, r1)`` (of ``n``): ``gsa[r0:r1]`` for per-row scales
    (``gsa`` of ``n``), its first ``r1 - r0`` for a scalar one (``gsa`` a block of ones,
    shorter than ``n``, the scalar in ``gsc``: see ``_gscale_rows`` in ``__init__.py``), None
    for none (plain-Python twin of the overload)."""
    if gsa is None:
        return None
    return gsa[r0:r1] if gsa.shape[0] == n else gsa[0:r1 - r0]


def _tile(src, i, j, dst, p, q):
    """``dst[p + b, q + a] = src[i + a, j + b]`` for ``a, b < W = _tile_w(src)``: one W x W
    tile transposed (plain-Python twin of the compiled one).

    Both arrays are 2-D of one dtype with unit stride along their rows (the caller checks),
    the tile lies inside both, and they do not overlap.  Compiled (``_tile_ir``), the tile
    is W vector loads, ``W log2 W`` two-input shuffles and W vector stores -- about a
    quarter of the time of the scalar loop, which moves one element per load and per store
    (measured on Zen 5: the scalar transposes in and out were 60% of the float32 262144 x 10
    kernel).  LLVM's loop vectorizer cannot get there on its own: a loop over rows reading a
    column is strided (a gather: microcoded, or scalar loads), a loop over a row's C <= 32
    classes is too short to vectorize across.
    """
    w = _tile_w(src)
    dst[p:p + w, q:q + w] = src[i:i + w, j:j + w].T


def _tile_part(src, i, j, dst, p, q, m, rows):
    """The part of :func:`_tile` (W x W at ``src[i, j]``, into ``dst[p, q]``) that a partial
    last tile needs: with ``rows`` False its last ``m`` columns of ``src`` (``dst`` rows ``p +
    W - m`` to ``p + W``), with ``rows`` True its last ``m`` rows of ``src`` (``dst`` columns
    ``q + W - m`` to ``q + W``); ``0 < m < W``, anything else does nothing (plain-Python twin).

    Why: with C = 8k + m classes (float32; float64: W = 4) the last tile of a row of tiles
    used to be a whole one, overlapping the one before and rewriting W - m columns with the
    same values: at C = 10, 16 columns transposed for 10.  Compiled, the partial tile is the
    full tile's shuffles for the wanted outputs only (LLVM drops the rest), W loads and m
    vector stores into the scratch (``rows`` False: the transpose in), or m loads and W short
    stores of m elements into the gradient's rows (``rows`` True: the transpose out).
    """
    w = _tile_w(src)
    if not 0 < m < w:
        return
    if rows:
        dst[p:p + w, q + w - m:q + w] = src[i + w - m:i + w, j:j + w].T
    else:
        dst[p + w - m:p + w, q:q + w] = src[i:i + w, j + w - m:j + w].T


def _scalar():
    """Keeps the loop it is called in scalar (the plain-Python twin does nothing).  Compiled, an
    empty ``asm`` statement with side effects: no instruction, but a call LLVM cannot widen,
    so its loop vectorizer leaves that loop alone.

    Why: for the block's cold element-by-element loops (the transposes of blocks too small or
    too strided for tiles, the patch pass over a row's classes), whose one operand walks the
    scratch across its rows.  With the block inlined into the kernel (``forceinline``), the
    scratch's row stride is a known constant, and LLVM vectorized those loops with AVX-512
    gathers and scatters -- microcoded on AMD cores, slower than the scalar loop, and what
    ``tests/test_numba_asm.py`` rejects."""
    return None


def _opaque(n):
    """``n`` unchanged, as a value LLVM knows nothing about (the plain-Python twin returns it).
    Compiled, an empty ``asm`` that returns its operand: no instruction.

    Why: for the number of rows of a block.  Inlined into the kernel (``forceinline``), the
    block's ``nr = min(n, r0 + rows) - r0`` has a known maximum, ``rows``, and LLVM then folded
    the tail of some of the loops over the rows into their vector body with masked loads and
    stores -- on AVX2 ``vmaskmov``, microcoded on AMD cores -- instead of a remainder loop."""
    return n


def _prefetch(a, i, off, write):
    """Hint that the byte ``off`` past ``a[i, 0]`` (``a[i]`` of a 1-D ``a``) will be read
    (``write`` False) or written soon: into L2 (the plain-Python twin does nothing).  Compiled, one ``prefetcht1`` /
    ``prefetchw`` that never faults (any address is allowed) and changes no result.

    Why: the column-block kernel reads its block of ``x`` and writes its block of ``grad``
    in bursts (the two transposes) between long stretches of arithmetic on the L1 scratch.
    The hardware prefetchers follow a stream only while it is being read, so each burst
    waited on memory: both transposes took twice the Cython kernel's time, whose blocks are
    an eighth as long (32 rows) -- a block size Numba's per-block overhead makes slow.  Asked
    for a block ahead, the next block's lines of ``x`` are in L2 by the time its transpose
    in runs (and its targets); the block's own lines of ``grad`` are asked for during its exp
    passes, before its transpose out (a line written is read first).  (``prefetchw`` lands in L1, where the
    scratch lives: the kernel asks for reads.)"""
    return None


if numba is not None and not _NOJIT:
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload

    # The W x W tile transpose as the Cython kernel's fl_tile writes it with AVX intrinsics:
    # rounds of two-input shuffles, each given as (mask, (input a, input b) per output) on the
    # list of the W row vectors.  Masks within 128-bit lanes (unpcklps/unpckhps, shufps) where
    # the intrinsics use them, so LLVM selects those in-lane instructions; only the last round
    # crosses lanes (vperm2f128).  (A log2(W)-round full-width interleave -- one mask pair for
    # every round -- compiled to cross-lane vpermt2ps and zero-extending loads on AVX-512
    # targets; in cache, in + out, these tiles take 0.22-0.26 ns per float32 element to its
    # 0.26-0.29 on Zen 4.  In the 262144 x 10 kernel the transposes wait on memory: no change
    # there beyond the noise.)
    _UNPLO8, _UNPHI8 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    _SHUF44, _SHUFEE = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    _LO128_8, _HI128_8 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    _UNPLO4, _UNPHI4 = [0, 4, 2, 6], [1, 5, 3, 7]
    _LO128_4, _HI128_4 = [0, 1, 4, 5], [2, 3, 6, 7]
    _TILE_ROUNDS = {
        8: [  # t = unpack(r0, r1), ...; u = shufps(t0, t2), ...; out = vperm2f128(u0, u4), ...
            [(_UNPLO8 if k % 2 == 0 else _UNPHI8, 2 * (k // 2), 2 * (k // 2) + 1) for k in range(8)],
            [(_SHUF44 if k % 2 == 0 else _SHUFEE, 4 * (k // 4) + (k % 4) // 2, 4 * (k // 4) + (k % 4) // 2 + 2)
             for k in range(8)],
            [(_LO128_8 if k < 4 else _HI128_8, k % 4, k % 4 + 4) for k in range(8)],
        ],
        4: [  # t = unpackpd(r0, r1), ...; out = vperm2f128(t0, t2), ...
            [(_UNPLO4 if k % 2 == 0 else _UNPHI4, 2 * (k // 2), 2 * (k // 2) + 1) for k in range(4)],
            [(_LO128_4 if k < 2 else _HI128_4, k % 2, k % 2 + 2) for k in range(4)],
        ],
    }

    def _tile_corner(context, builder, aty, a, r, rty, c, cty):
        """The address (as ``i8*``) of ``a[r, c]`` and the row stride of ``a`` in bytes."""
        ary = context.make_array(aty)(context, builder, a)
        strides = _cgutils.unpack_tuple(builder, ary.strides, 2)
        idx = [context.cast(builder, r, rty, _types.intp), context.cast(builder, c, cty, _types.intp)]
        ptr = _cgutils.get_item_pointer2(context, builder, ary.data, _cgutils.unpack_tuple(
            builder, ary.shape, 2), strides, aty.layout, idx)
        return builder.bitcast(ptr, _ir.IntType(8).as_pointer()), strides[0]

    def _tile_at(builder, base, stride, k, col_bytes, ty):
        """A ``ty*`` to ``col_bytes`` past the start of row ``k`` from ``base`` (a corner)."""
        i64 = _ir.IntType(64)
        off = builder.add(builder.mul(stride, _ir.Constant(i64, k)), _ir.Constant(i64, col_bytes))
        return builder.bitcast(builder.gep(base, [off], source_etype=_ir.IntType(8)), ty.as_pointer())

    def _tile_shuffle(builder, v, w):
        """The ``W x W`` transpose of the ``w`` row vectors ``v``, by :data:`_TILE_ROUNDS`."""
        mty = _ir.VectorType(_ir.IntType(32), w)
        for rnd in _TILE_ROUNDS[w]:
            v = [builder.shuffle_vector(v[a], v[b], _ir.Constant(mty, m)) for m, a, b in rnd]
        return v

    @_intrinsic
    def _tile_ir(typingctx, src, i, j, dst, p, q):
        if not (isinstance(src, _types.Array) and isinstance(dst, _types.Array) and src.ndim == dst.ndim == 2
                and src.dtype == dst.dtype and src.dtype in (_types.float32, _types.float64)):
            return None
        w = 8 if src.dtype == _types.float32 else 4
        sig = _types.void(src, i, j, dst, p, q)

        def codegen(context, builder, signature, args):
            sty, ity, jty, dty, pty, qty = signature.args
            a_s, a_i, a_j, a_d, a_p, a_q = args
            vty = _ir.VectorType(context.get_data_type(sty.dtype), w)
            isz = context.get_abi_sizeof(context.get_data_type(sty.dtype))
            sp, ss = _tile_corner(context, builder, sty, a_s, a_i, ity, a_j, jty)
            dp, ds = _tile_corner(context, builder, dty, a_d, a_p, pty, a_q, qty)
            v = [builder.load(_tile_at(builder, sp, ss, k, 0, vty), typ=vty, align=isz) for k in range(w)]
            v = _tile_shuffle(builder, v, w)
            for k in range(w):
                builder.store(v[k], _tile_at(builder, dp, ds, k, 0, vty), align=isz)
            return context.get_dummy_value()

        return sig, codegen

    @_intrinsic
    def _tile_part_ir(typingctx, src, i, j, dst, p, q, m, rows):
        if not (isinstance(src, _types.Array) and isinstance(dst, _types.Array) and src.ndim == dst.ndim == 2
                and src.dtype == dst.dtype and src.dtype in (_types.float32, _types.float64)
                and isinstance(m, _types.Integer) and isinstance(rows, _types.BooleanLiteral)):
            return None
        w = 8 if src.dtype == _types.float32 else 4
        by_rows = rows.literal_value
        sig = _types.void(src, i, j, dst, p, q, m, rows)

        def codegen(context, builder, signature, args):
            sty, ity, jty, dty, pty, qty, mty_, _ = signature.args
            a_s, a_i, a_j, a_d, a_p, a_q, a_m, _ = args
            i64 = _ir.IntType(64)
            ety = context.get_data_type(sty.dtype)
            vty = _ir.VectorType(ety, w)
            isz = context.get_abi_sizeof(ety)
            sp, ss = _tile_corner(context, builder, sty, a_s, a_i, ity, a_j, jty)
            dp, ds = _tile_corner(context, builder, dty, a_d, a_p, pty, a_q, qty)

            def at(base, stride, k, col, ty):  # (col in elements)
                return _tile_at(builder, base, stride, k, col * isz, ty)

            # one case per m: the number of outputs (and so the code) depends on it
            end = builder.append_basic_block("tile_part_end")
            sw = builder.switch(context.cast(builder, a_m, mty_, _types.int64), end)
            for mm in range(1, w):
                blk = builder.append_basic_block(f"tile_part_{mm}")
                sw.add_case(_ir.Constant(i64, mm), blk)
                builder.position_at_end(blk)
                if by_rows:  # only src rows w - mm .. w exist for the result: the rest undefined
                    v = [builder.load(at(sp, ss, k, 0, vty), typ=vty, align=isz) if k >= w - mm
                         else _ir.Constant(vty, _ir.Undefined) for k in range(w)]
                else:
                    v = [builder.load(at(sp, ss, k, 0, vty), typ=vty, align=isz) for k in range(w)]
                v = _tile_shuffle(builder, v, w)
                if by_rows:  # every dst row, its last mm elements
                    pty_ = _ir.VectorType(ety, mm) if mm > 1 else ety
                    for k in range(w):
                        if mm > 1:
                            part = builder.shuffle_vector(v[k], _ir.Constant(vty, _ir.Undefined), _ir.Constant(
                                _ir.VectorType(_ir.IntType(32), mm), list(range(w - mm, w))))
                        else:
                            part = builder.extract_element(v[k], _ir.Constant(_ir.IntType(32), w - 1))
                        builder.store(part, at(dp, ds, k, w - mm, pty_), align=isz)
                else:  # the last mm dst rows, whole
                    for k in range(w - mm, w):
                        builder.store(v[k], at(dp, ds, k, 0, vty), align=isz)
                builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    @_intrinsic
    def _prefetch_ir(typingctx, a, i, off, write):
        if not (isinstance(a, _types.Array) and a.ndim in (1, 2) and isinstance(write, _types.BooleanLiteral)):
            return None
        sig = _types.void(a, i, off, write)
        rw = 1 if write.literal_value else 0

        def codegen(context, builder, signature, args):
            aty, ity, oty, _ = signature.args
            ary = context.make_array(aty)(context, builder, args[0])
            strides = _cgutils.unpack_tuple(builder, ary.strides, aty.ndim)
            row = builder.mul(context.cast(builder, args[1], ity, _types.intp), strides[0])
            byte = builder.add(row, context.cast(builder, args[2], oty, _types.intp))
            base = builder.bitcast(ary.data, _ir.IntType(8).as_pointer())
            ptr = builder.gep(base, [byte], source_etype=_ir.IntType(8))
            i32 = _ir.IntType(32)
            fnty = _ir.FunctionType(_ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty)
            # (address, rw, locality 2: keep in L2 and up, data cache)
            builder.call(fn, [ptr, i32(rw), i32(2), i32(1)])
            return context.get_dummy_value()

        return sig, codegen

    @_intrinsic
    def _scalar_ir(typingctx):
        def codegen(context, builder, signature, args):
            asm = _ir.InlineAsm(_ir.FunctionType(_ir.VoidType(), []), "", "", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return _types.void(), codegen

    @_intrinsic
    def _opaque_ir(typingctx, n):
        if not isinstance(n, _types.Integer):
            return None

        def codegen(context, builder, signature, args):
            v = args[0]
            asm = _ir.InlineAsm(_ir.FunctionType(v.type, [v.type]), "", "=r,0", side_effect=False)
            return builder.call(asm, [v])

        return n(n), codegen

    @_overload(_opaque, inline="always")
    def _ov_opaque(n):
        return lambda n: _opaque_ir(n)

    @_overload(_scalar, inline="always")
    def _ov_scalar():
        return lambda: _scalar_ir()

    @_overload(_prefetch, inline="always")
    def _ov_prefetch(a, i, off, write):
        return lambda a, i, off, write: _prefetch_ir(a, i, off, write)

    @_overload(_block_rows, inline="always")
    def _ov_block_rows(x):
        rows = _SB if x.dtype.bitwidth <= 32 else _SB // 2
        return lambda x: rows

    @_overload(_gscale_block, inline="always")
    def _ov_gscale_block(gsa, n, r0, r1):
        if isinstance(gsa, _types.NoneType):
            return lambda gsa, n, r0, r1: None
        return lambda gsa, n, r0, r1: gsa[r0:r1] if gsa.shape[0] == n else gsa[0:r1 - r0]

    @_overload(_tile_w, inline="always")
    def _ov_tile_w(a):
        return lambda a: 8 if a.itemsize == 4 else 4

    @_overload(_tile_part, inline="always")
    def _ov_tile_part(src, i, j, dst, p, q, m, rows):
        return lambda src, i, j, dst, p, q, m, rows: _tile_part_ir(src, i, j, dst, p, q, m, rows)

    @_overload(_tile, inline="always")
    def _ov_tile(src, i, j, dst, p, q):
        return lambda src, i, j, dst, p, q: _tile_ir(src, i, j, dst, p, q)


# forceinline: LLVM inlines the block into its kernel's task loop; the call of a function with
# thirty array arguments per block of rows, and the block's code compiled without knowing its
# scratch arrays, cost 5-12 % of the 262144 x 10 kernel (float32 and float64, 1 and 2 threads,
# Zen 4; first compile +1.5 s).  (Numba's own inline="always" gave the same speed and doubled
# the compile time: its parfor passes then run over the whole block.)
@njit(forceinline=True, **_JIT)
def _ce_cols_block(x, target, w, sumw, ignore, eps, z, cap, lb, lse_out, grad, gsc, gsa, r0, r1,
                   xt, et, dc, sh, sh2, cg, xtt, tj, bt, gt, st, wt, s, dd, lse):
    """Rows ``[r0, r1)`` of a hard-target cross-entropy with few classes, vectorized across rows.

    With C <= 32 a per-row loop is too short to vectorize, and its row max and row sum are
    dependency chains (a ``select`` or an ``add`` per class, each waiting on the previous one):
    per-row latency, not arithmetic, would set the speed.  So the block is turned on its side,
    ``xt[j, r] = x[r0 + r, j]`` (a transpose in L1, by vector tiles: :func:`_tile`), and every
    step after that is a loop over the *rows* of the block, a few classes per pass --
    independent lanes, which LLVM vectorizes: the running max and, with it, the target's logit
    and weight (selected by class, not gathered), ``et[j, r] = exp(xt[j, r] - shift[r])`` with
    the row sums (in the dtype of ``x``, as the Cython kernel: at most ``_SUMC`` terms in
    [0, 1]) and their logs, the label-smoothing sums, the per-row loss and gradient
    coefficients (float64), and the gradient itself, written over ``et``.  Several classes per
    pass because a one-class pass over the rows loads and stores the per-row arrays once per
    class: bound by its loads and stores, not by its arithmetic.  Only its transpose back into ``grad`` rows
    remains, by tiles again.  Every read of this block of ``x`` happens before the first write
    of its gradient rows, so ``grad`` may be ``x`` (in place).  (Scalar, the two transposes
    were 60% of the time on 262144 x 10 float32, Zen 5.)

    With a cap (``cap != 0``) the transposed block is capped in place (``xt = cap tanh(xt /
    cap)``, vectorized across rows like the rest) and ``dc`` keeps the cap's derivative for the
    gradient.  ``lse_out`` is ``(N,)``, or ``(0,)`` when not wanted; every row of the block has
    its lse computed anyway (ignored ones included), so writing it is free.  The block's row
    losses go to ``lb`` (indexed from 0: a scratch row the caller copies out or sums).

    Scratch: ``xt``, ``et`` (and ``dc``, with a cap) are ``(C, rows)``; the rest ``(rows,)``
    (``rows``: :func:`_block_rows`): in
    the dtype of ``x`` the shift, a second buffer for the max, the gradient coefficient, the
    target logit, the target class (-1: ignored), the smoothing and target terms of the
    gradient, the row sum and the target weight; in float64 the row sum across partial sums
    (more than ``_SUMC`` classes), the smoothing sum and lse.  Separate
    arrays, not rows of one.  (LLVM still guards most of the block's vector loops with
    run-time overlap tests between them -- the fixed cost per block that makes small blocks
    slow here, see ``NUMBA_COL_ROWS`` in fastloss/_config.py.)
    """
    c = x.shape[1]
    nr = _opaque(r1 - r0)  # no known maximum: see _opaque
    zero = cast_like(0.0, x)
    # this block's rows of the per-row arrays, indexed from 0: an index r0 + r (r0 an argument)
    # is not provably >= 0, and Numba's wrap-around test on it would keep the loops scalar
    tg = target[r0:r1]
    n = x.shape[0]
    gb = _gscale_block(gsa, n, r0, r1)
    tw = _tile_w(x)
    # the next block's rows [r1, r1 + nn) of x, prefetched a tile row at a time (see _prefetch;
    # the next block's gradient rows here as well measured no faster: this block's own are
    # prefetched during its exp passes, below)
    nn = min(n, r1 + _block_rows(x)) - r1
    if c >= tw and nr >= tw and x.strides[1] == x.itemsize:
        # tiles of tw x tw: the last row of tiles overlaps the one before (rewriting a few
        # elements with the same values), the last c % tw classes are a partial tile
        # (_tile_part): no scalar remainder.  (Partial rather than overlapping: at C = 10,
        # 262144 x 10 float32 took 0.96x the time, Zen 4.)
        for rr in range(0, nr, tw):
            r = min(rr, nr - tw)
            for k in range(0, c - tw + 1, tw):
                _tile(x, r0 + r, k, xt, k, r)
            _tile_part(x, r0 + r, c - tw, xt, c - tw, r, c % tw, False)  # the last c % tw columns
            if rr < nn:  # this tile row's part of the next block: its rows' bytes, per line
                for off in range(0, min(tw, nn - rr) * x.strides[0], 64):
                    _prefetch(x, r1 + rr, off, False)
                # and its targets (tw int64: a line): their loads were 5 % of the kernel's
                # samples; prefetched, 262144 x 10 float32 ran 0.95x the time, float64 0.97x
                _prefetch(target, r1 + rr, 0, False)
    else:  # too few classes or rows for a tile, or classes not adjacent in memory
        for r in range(nr):
            xr = x[r0 + r]  # a row view: j from range(c) indexes it without wrap-around tests
            for j in range(c):
                _scalar()
                xt[j, r] = xr[j]
    if cap != 0.0:
        capx = cast_like(cap, x)
        inv = cast_like(1.0 / cap, x)
        for j in range(c):
            for r in range(nr):
                v, dv = _softcap(xt[j, r], capx, inv)
                xt[j, r] = v
                dc[j, r] = dv
    # tj: the target class in the dtype of x, -1 for an ignored row
    m1 = cast_like(-1.0, x)
    nig = 0  # ignored rows in the block
    for r in range(nr):
        t = tg[r]
        tj[r] = m1 if t == ignore else cast_like(t, x)
    for r in range(nr):  # a loop of its own: with the count in the loop above, LLVM gave that
        nig += 1 if tj[r] < zero else 0  # loop a masked tail (AVX2 vmaskmov) once inlined
    # Row max (NaN skipped as in _rowmax: a NaN reaches the result through the sum of exp),
    # the target's logit and the target's weight, four columns per pass over the block's rows:
    # the row arrays are loaded and stored once per four columns, not once per column (a
    # one-column pass is bound by its loads and stores).  The max goes between two buffers
    # in turn, not ``sh[r] = max(sh[r], ...)``: LLVM turns that read-modify-write into a
    # masked store (only where the max changes), and AVX2 masked stores are microcoded on AMD
    # cores.  The target's logit and weight are added up over the classes, each term selected
    # by the class (x_t, as 0 + ... + x_t + ... + 0 is exact), not gathered -- a scalar loop;
    # an ignored row (tj = -1) selects nothing: 0.  A weight no target selects, NaN or inf,
    # reaches no row.
    #
    # Without class weights (all ones: ``w`` is ones then) the target's weight is 1, or 0 for
    # an ignored row -- what the sum of selections gives, bitwise -- set after the passes, not
    # selected and added per class (262144 x 10 float32, Zen 4: 0.97x the time).
    ninf = cast_like(-np.inf, x)
    one = cast_like(1.0, x)
    unw = True
    for j in range(c):
        _scalar()  # C compares per block: cold
        unw = unw and w[j] == one
    for r in range(nr):
        sh[r] = ninf
        xtt[r] = zero
        wt[r] = zero
    src = sh
    dst = sh2
    j = 0
    while j + 4 <= c:
        f0, f1, f2, f3 = cast_like(j, x), cast_like(j + 1, x), cast_like(j + 2, x), cast_like(j + 3, x)
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        if unw:
            for r in range(nr):
                v0, v1, v2, v3, tr = xt[j, r], xt[j + 1, r], xt[j + 2, r], xt[j + 3, r], tj[r]
                dst[r] = _mx(_mx(_mx(_mx(src[r], v0), v1), v2), v3)
                xtt[r] += ((v0 if tr == f0 else zero) + (v1 if tr == f1 else zero)) + \
                    ((v2 if tr == f2 else zero) + (v3 if tr == f3 else zero))
        else:
            for r in range(nr):
                v0, v1, v2, v3, tr = xt[j, r], xt[j + 1, r], xt[j + 2, r], xt[j + 3, r], tj[r]
                dst[r] = _mx(_mx(_mx(_mx(src[r], v0), v1), v2), v3)
                xtt[r] += ((v0 if tr == f0 else zero) + (v1 if tr == f1 else zero)) + \
                    ((v2 if tr == f2 else zero) + (v3 if tr == f3 else zero))
                wt[r] += ((w0 if tr == f0 else zero) + (w1 if tr == f1 else zero)) + \
                    ((w2 if tr == f2 else zero) + (w3 if tr == f3 else zero))
        src, dst = dst, src
        j += 4
    if j + 2 <= c:  # two of the last three columns (C = 10: 4 + 4 + 2 columns, three passes)
        f0, f1 = cast_like(j, x), cast_like(j + 1, x)
        w0, w1 = w[j], w[j + 1]
        for r in range(nr):
            v0, v1, tr = xt[j, r], xt[j + 1, r], tj[r]
            dst[r] = _mx(_mx(src[r], v0), v1)
            xtt[r] += (v0 if tr == f0 else zero) + (v1 if tr == f1 else zero)
            wt[r] += (w0 if tr == f0 else zero) + (w1 if tr == f1 else zero)
        src, dst = dst, src
        j += 2
    while j < c:
        jf = cast_like(j, x)
        wj = w[j]
        for r in range(nr):
            v, tr = xt[j, r], tj[r]
            dst[r] = _mx(src[r], v)
            xtt[r] += v if tr == jf else zero
            wt[r] += wj if tr == jf else zero
        src, dst = dst, src
        j += 1
    if unw:
        for r in range(nr):
            wt[r] = one if tj[r] >= zero else zero
    # the shift is 0 for a row whose max is not finite, so inf - inf never happens
    for r in range(nr):
        m = src[r]
        sh[r] = m if _finite(m) else zero
    # e = exp(x - shift) and its row sums, in the dtype of x: a sum of at most _SUMC terms in
    # [0, 1] (the max's is 1), two columns per pass; more columns (a patched
    # fastloss._config.NUMBA_SMALL_C) add such partial sums in float64.  The Cython kernel's
    # sums, term for term.  x - shift <= 0 where the max is finite; the other rows (shift 0)
    # get a row sum that is still right (inf, nan or 0) and are recomputed below.
    #
    # Before each two-column pass, a share of this block's rows of grad is prefetched into L2
    # (read, not write: a write prefetch lands in L1 and evicted the scratch), so that the
    # transpose back at the end finds its lines there: written from memory, a block's worth of
    # lines (10 KB for 256 float32 rows of 10 classes) is a burst of cache misses that waits on
    # memory with no arithmetic left to overlap -- 30 % of the 262144 x 10 float32 kernel on
    # one thread (Zen 4), where in place (grad = x: lines cached) the kernel was within 2 % of
    # Cython's, whose 32-row blocks overlap those misses with the next block's work.  Measured
    # in turns (Zen 4, 2 threads): 262144 x 10 float32 and float64 0.85-0.87x the time,
    # 163840 x 16 0.86x, 87381 x 30 0.85x (float64 0.93x).  Only where rows are contiguous
    # (the block's lines are one range) and tiles transpose them: with C < 8 (element-by-
    # element transposes) it measured up to 1.13x slower.
    pfb = 0  # bytes of this block's rows of grad to prefetch
    if grad is not None and c >= tw and grad.strides[1] == grad.itemsize and grad.strides[0] == c * grad.itemsize:
        pfb = nr * grad.strides[0]
    npair = max(1, c // 2)
    pfs = ((pfb + npair - 1) // npair + 63) // 64 * 64  # bytes per pass, whole lines
    for j0 in range(0, c, _SUMC):
        j1 = min(c, j0 + _SUMC)
        for r in range(nr):
            st[r] = zero
        j = j0
        while j + 2 <= j1:
            if grad is not None:  # (typing: _prefetch takes an array)
                q = j // 2
                for off in range(q * pfs, min(pfb, (q + 1) * pfs), 64):
                    _prefetch(grad, r0, off, False)
            for r in range(nr):
                m = sh[r]
                va = vexpn(xt[j, r] - m)
                vb = vexpn(xt[j + 1, r] - m)
                et[j, r] = va
                et[j + 1, r] = vb
                st[r] = (st[r] + va) + vb
            j += 2
        if j < j1:
            for r in range(nr):
                va = vexpn(xt[j, r] - sh[r])
                et[j, r] = va
                st[r] += va
        if c > _SUMC:
            if j0 == 0:
                for r in range(nr):
                    s[r] = 0.0
            for r in range(nr):
                s[r] += st[r]
    if c > _SUMC:
        for r in range(nr):
            st[r] = cast_like(s[r], x)
    if eps != 0.0:  # sum_j w_j (x_j - shift)
        for r in range(nr):
            dd[r] = 0.0
        for j in range(c):
            wj = np.float64(w[j])
            for r in range(nr):
                # x - shift as an instruction of its own (sub_sub, compiled without reassoc):
                # under reassoc LLVM distributes the sum into sum(w x) - shift sum(w), which
                # for equal huge logits (1e300) is the garbage difference of two huge sums
                v = np.float64(sub_sub(xt[j, r], sh[r], zero))
                dd[r] += wj * v if v != 0.0 else 0.0  # no inf * 0 at the max (see _ce_row)
    u = eps / c
    us = u * sumw if eps != 0.0 else 0.0  # no 0 * nan from a nan weight of an unused class
    # chk counts the rows whose sum is +inf or NaN, by comparisons: ``sr - sr`` (0, or NaN for
    # such a row) is folded to 0 under reassoc where LLVM sees fit -- it did once the plain
    # loop below was split off, and those rows kept e / s = inf / inf instead of the patch
    chk = zero
    pinf = cast_like(np.inf, x)
    # per-row loss and gradient coefficients, vectorized across rows.  log s in the dtype of x
    # (s in [1, C] for a finite max: within an ulp or two), the rest in float64
    if eps == 0.0 and z == 0.0:
        # the common case in three loops without branches (the Cython kernel's order of work):
        # log s in the dtype of x alone -- 16 float32 lanes per AVX-512 vector, where one loop
        # mixing float32 and float64 runs all of it at 8, with the eps and z branches inside
        # (that loop was a fifth of the 262144 x 10 float32 kernel).  bt is free here: the
        # gradient reads it only with label smoothing.  Bitwise the general loop's results:
        # with eps = z = 0 its a = (1 - 0) w_t + 0 + 0 lse is w_t wherever lse is finite, and
        # the rows where it is not are those the patch below recomputes (st not finite), or
        # rows of -inf logits only (s = 0), NaN either way.
        for r in range(nr):
            bt[r] = vlog(st[r])
        for r in range(nr):
            lsr = np.float64(bt[r])
            lse[r] = np.float64(sh[r]) + lsr
            # -log p[t] = log s - (x[t] - shift): huge logits keep their O(1) part (see _ce_row)
            row = np.float64(wt[r]) * neg_log_p(lsr, xtt[r], sh[r])
            lb[r] = row if tj[r] >= zero else 0.0
        if grad is not None:
            for r in range(nr):
                sr = st[r]
                gs = gsc if gsa is None else gsc * gb[r]
                a = cast_like(gs * np.float64(wt[r]), x)
                cg[r] = a / sr
                gt[r] = a
                chk += zero if sr < pinf else one  # rows whose sum is inf or nan
    for r in range(nr if eps != 0.0 or z != 0.0 else 0):
        sr = st[r]
        lsr = np.float64(vlog(sr))
        lser = np.float64(sh[r]) + lsr
        lse[r] = lser
        wtr = np.float64(wt[r])
        row = (1.0 - eps) * wtr * neg_log_p(lsr, xtt[r], sh[r])
        # dd[r] read whatever eps is (unused scratch when 0): read only under the condition,
        # LLVM loads it with a masked load, which AVX2 spells vmaskmovpd (slow on AMD)
        ddr = dd[r]
        if eps != 0.0:
            row += u * (sumw * lsr - ddr)
        if z != 0.0:
            row += z * lser * lser
        lb[r] = row if tg[r] != ignore else 0.0
        if grad is not None:
            # d row / d x_j = a p_j - eps/C w_j - (1-eps) w_t [j = t]
            gs = gsc if gsa is None else gsc * gb[r]
            a = (1.0 - eps) * wtr + us + 2.0 * z * lser
            cg[r] = cast_like(gs * a, x) / sr  # p = e / s
            bt[r] = cast_like(gs * u, x)
            gt[r] = cast_like(gs * (1.0 - eps) * wtr, x)
            chk += zero if sr < pinf else one
    if lse_out.shape[0] != 0:
        lo = lse_out[r0:r1]
        for r in range(nr):
            lo[r] = lse[r]
    if grad is None:
        return
    if chk != zero:  # some row holds +inf or nan
        for r in range(nr):
            if not st[r] < pinf and tg[r] != ignore:  # (not _finite: see chk)
                # p = exp(x - lse) as the reference computes it (0 for finite x, nan at the
                # inf), not e / s = inf / inf
                gs = gsc if gsa is None else gsc * gb[r]
                lsed = cast_like(lse[r], x)
                for j in range(c):
                    _scalar()
                    et[j, r] = vexp(xt[j, r] - lsed)
                cg[r] = cast_like(gs * ((1.0 - eps) * np.float64(wt[r]) + us + 2.0 * z * lse[r]), x)
    # The gradient, in place of et and still across rows: g_j = e_j cg - bt w_j, less gt in the
    # target's column (selected, not gathered), through the cap's derivative.  The operations
    # in the order of the row kernel's.  Ignored rows are zeroed after (below), not selected
    # here: a select on "row not ignored" let LLVM sink the loads of cg and gt under it, which
    # AVX2 spells as masked loads (vmaskmovps: microcoded on AMD).
    j = 0
    if eps == 0.0 and cap == 0.0:  # the common case: four columns per pass
        while j + 4 <= c:
            f0, f1, f2, f3 = cast_like(j, x), cast_like(j + 1, x), cast_like(j + 2, x), cast_like(j + 3, x)
            for r in range(nr):
                cr, gtr, tr = cg[r], gt[r], tj[r]
                et[j, r] = et[j, r] * cr - (gtr if tr == f0 else zero)
                et[j + 1, r] = et[j + 1, r] * cr - (gtr if tr == f1 else zero)
                et[j + 2, r] = et[j + 2, r] * cr - (gtr if tr == f2 else zero)
                et[j + 3, r] = et[j + 3, r] * cr - (gtr if tr == f3 else zero)
            j += 4
        if j + 2 <= c:
            f0, f1 = cast_like(j, x), cast_like(j + 1, x)
            for r in range(nr):
                cr, gtr, tr = cg[r], gt[r], tj[r]
                et[j, r] = et[j, r] * cr - (gtr if tr == f0 else zero)
                et[j + 1, r] = et[j + 1, r] * cr - (gtr if tr == f1 else zero)
            j += 2
    while j < c:
        jf = cast_like(j, x)
        wj = w[j]
        if eps == 0.0 and cap == 0.0:
            for r in range(nr):
                gtr = gt[r]
                et[j, r] = et[j, r] * cg[r] - (gtr if tj[r] == jf else zero)
        elif cap == 0.0:
            for r in range(nr):
                gtr = gt[r]
                et[j, r] = (et[j, r] * cg[r] - bt[r] * wj) - (gtr if tj[r] == jf else zero)
        elif eps == 0.0:  # through the cap
            for r in range(nr):
                gtr = gt[r]
                d = dc[j, r]
                et[j, r] = et[j, r] * cg[r] * d - (gtr if tj[r] == jf else zero) * d
        else:
            for r in range(nr):
                gtr = gt[r]
                d = dc[j, r]
                et[j, r] = (et[j, r] * cg[r] - bt[r] * wj) * d - (gtr if tj[r] == jf else zero) * d
        j += 1
    if nig != 0:  # ignored rows: exact zeros, whatever their e, coefficients or cap derivative
        for r in range(nr):
            if tj[r] < zero:
                for j in range(c):
                    _scalar()
                    et[j, r] = zero
    # back into row layout (every read of this block of x is done: grad may be x)
    if c >= tw and nr >= tw and grad.strides[1] == grad.itemsize:
        for rr in range(0, nr, tw):
            r = min(rr, nr - tw)
            for k in range(0, c - tw + 1, tw):
                _tile(et, k, r, grad, r0 + r, k)
            _tile_part(et, c - tw, r, grad, r0 + r, c - tw, c % tw, True)  # the last c % tw classes
    else:
        for r in range(nr):
            gr = grad[r0 + r]
            for j in range(c):
                _scalar()
                gr[j] = et[j, r]

@_kernel
def _k_cross_entropy_small(x, target, w, sumw, ignore, eps, z, cap, loss, lse_out, grad, gsc, gsa, sums, nb):
    """The few-classes hard-target cross-entropy (see :func:`_ce_cols_block`) over ``nb``
    tasks.  ``loss`` is ``(N,)`` for the row losses, or with ``sums`` ``(ceil(N / rows),)``
    (``rows``: :func:`_block_rows`) for their sums per block (in the order of the compiled
    loop, vectorized): a reduced loss then needs neither the N row losses written nor read
    back (2 MB at 262144 rows), and it is bitwise the same for every thread count (blocks at
    fixed offsets, the same loop for each)."""
    n, c = x.shape
    sb = _block_rows(x)
    for b in prange(nb):
        xt = np.empty((c, sb), x.dtype)
        et = np.empty((c, sb), x.dtype)
        dc = np.empty((c, sb if cap != 0.0 else 0), x.dtype)
        sh = np.empty(sb, x.dtype)
        sh2 = np.empty(sb, x.dtype)
        cg = np.empty(sb, x.dtype)
        xtt = np.empty(sb, x.dtype)
        tj = np.empty(sb, x.dtype)
        bt = np.empty(sb, x.dtype)
        gt = np.empty(sb, x.dtype)
        st = np.empty(sb, x.dtype)
        wt = np.empty(sb, x.dtype)
        s = np.empty(sb, np.float64)
        dd = np.empty(sb, np.float64)
        lse = np.empty(sb, np.float64)
        lrow = np.empty(sb, np.float64)  # the block's row losses
        # blocks of sb rows at fixed offsets (multiples of sb), dealt out to the tasks: a
        # row's lane in the vectorized loops -- and so its rounding -- does not depend on
        # how many threads there are
        nblk = (n + sb - 1) // sb
        for k in range(b * nblk // nb, (b + 1) * nblk // nb):
            r0 = k * sb
            r1 = min(n, r0 + sb)
            _ce_cols_block(x, target, w, sumw, ignore, eps, z, cap, lrow, lse_out, grad, gsc, gsa, r0, r1,
                           xt, et, dc, sh, sh2, cg, xtt, tj, bt, gt, st, wt, s, dd, lse)
            if sums:
                tot = 0.0
                for r in range(r1 - r0):
                    tot += lrow[r]
                loss[k] = tot
            else:
                lb = loss[r0:r1]
                for r in range(r1 - r0):
                    lb[r] = lrow[r]


