"""Vectorizable scalar math for the Numba kernels: ``exp``, ``log``, ``log1p``, ``softplus``.

Why not ``math.exp``?  Numba >= 0.62 ships without SVML, so ``math.exp`` / ``np.exp`` inside a
jitted loop is a call into libm per element (~0.3 G el/s per core) and blocks vectorization of
the whole loop.  The functions here are written only with arithmetic, comparisons (which LLVM
turns into ``select``) and integer bit manipulation, so after inlining LLVM vectorizes the loop
that calls them (AVX2 ``ymm``: 8 float32 / 4 float64 lanes).

Algorithms (float32 and float64 variants; ``vexp`` & co. dispatch on the argument type)
----------------------------------------------------------------------------------------
``exp(x)``
    Range reduction ``x = k ln2 + r``, ``k = rint(x / ln2)``, ``|r| <= ln2/2`` with ln2 split
    into a high part (exact products ``k*ln2_hi``) and a low part (Cody-Waite), then a
    polynomial for ``exp(r)`` (float32: ``1 + r + c2 r**2 + ... + c6 r**6``, a degree-6
    minimax fit of relative error 4.9e-9 on ``|r| <= 1.02 ln2/2`` -- 0.08 ulp, the rest is
    rounding -- in Horner's form, six multiply-adds; float64: the degree-12 Taylor
    polynomial, truncation error < 2e-16), and the scaling by ``2**k`` done by
    writing ``k + bias`` into the exponent field (32-bit integer ops, ``_ldexp_split``).
    ``x`` is first clamped to the range whose
    results are representable (``[-104, 89]`` / ``[-746, 710]``) and ``2**k`` is applied as two
    factors ``2**(k//2) * 2**(k - k//2)``, each a normal number, so that overflow gives ``+inf``,
    results in the subnormal range are rounded once (gradual underflow) and ``exp(-inf) = 0``.
    A NaN argument is passed through by a final select.  Error: about 1 ulp.
``log(x)``
    ``x = 2**k * m`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` from the bits (subnormal inputs are
    first scaled by ``2**54`` / ``2**25``), ``f = m - 1``, and fdlibm's ``log(1+f)`` kernel
    (float64: ``s = f/(2+f)`` and a degree-14 odd series) or Cephes' ``logf`` polynomial
    (float32).  float64: ``k`` is converted to floating point by the "magic number" trick
    (or-ing it into the mantissa of ``2**52`` and subtracting) because AVX2 has no packed
    int64 -> double conversion.  float32: the bit manipulation is written in LLVM IR on int32
    (``_frexp32``), since Numba would promote it to 4-lane int64 vectors.  Specials: ``log(0) = -inf``, ``log(x<0) = nan``, ``log(inf) = inf``, NaN -> NaN.
``log1p(x)``
    ``u = 1 + x``; ``log(u) + (x - (u - 1)) / u`` -- the correction term restores the bits of
    ``x`` lost in rounding ``1 + x``.  This identity relies on exact IEEE evaluation order, which
    is why these helpers are compiled with ``fastmath={'contract'}`` only: fp instructions keep
    their own fast-math flags when LLVM inlines them into a caller compiled with ``reassoc``.
``softplus(x) = log(1 + exp(x))``
    ``max(x, 0) + log1p(exp(-|x|))``: never overflows.

Nothing here is compiled at import; the helpers compile as part of the kernels that call them
and are cached inside those kernels' cached machine code (see ``_JIT`` below).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["order_key", "key_value", "vexp", "vexpn", "vlog", "vlog1p", "vsoftplus", "vsoftcap", "vlog1p_unit_recip", "sub_sub", "neg_log_p", "bce_mix", "cast_like",
           "HELPER_FASTMATH"]

# The helpers must keep IEEE evaluation order (Cody-Waite split, log1p correction); FMA
# contraction only makes them more accurate.
HELPER_FASTMATH = {"contract"}
# No cache=True here on purpose: a function loaded from Numba's on-disk cache is linked into
# its callers as object code, which LLVM cannot inline -- the loop calling it would then stay
# scalar.  These helpers are compiled (in memory) whenever a kernel that uses them is
# compiled, and end up inlined in that kernel, which *is* cached.
_JIT = dict(fastmath=HELPER_FASTMATH, nogil=True, error_model="numpy")


# ----------------------------------------------------------------------------- bit casts
@intrinsic
def _f64_bits(typingctx, x):
    """Reinterpret a float64 as int64 (no conversion)."""
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, i):
    """Reinterpret an int64 as float64."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 64:
            v = builder.sext(v, ir.IntType(64)) if sig.args[0].signed else builder.zext(v, ir.IntType(64))
        return builder.bitcast(v, ir.DoubleType())

    return types.float64(i), codegen


@intrinsic
def _ldexp_split(typingctx, y, kf):
    """``y * 2**k1 * 2**(k - k1)`` with ``k1 = k >> 1``, for an integral float ``kf``.

    The scaling of ``exp``: two factors, each a normal number over the whole clamped range
    of ``k``, so that a result in the subnormal range is rounded once (by the last multiply)
    and an overflow gives ``inf``.  The halving is an arithmetic shift of the 32-bit integer
    -- one instruction, against a multiply, a rounding and a subtraction in floating point.
    A NaN ``kf`` gives an unspecified ``k``; the caller's final select discards that lane.
    """
    if kf not in (types.float32, types.float64) or y != kf:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        yv, kv = args
        k = builder.fptosi(kv, i32)
        k1 = builder.ashr(k, ir.Constant(i32, 1))
        k2 = builder.sub(k, k1)
        if sig.return_type == types.float32:
            def p2(e):
                b = builder.shl(builder.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23))
                return builder.bitcast(b, ir.FloatType())
        else:
            i64 = ir.IntType(64)

            def p2(e):
                b = builder.sext(builder.add(e, ir.Constant(i32, 1023)), i64)
                return builder.bitcast(builder.shl(b, ir.Constant(i64, 52)), ir.DoubleType())
        return builder.fmul(builder.fmul(yv, p2(k1)), p2(k2))

    return kf(kf, kf), codegen


@intrinsic
def _pow2_shifted(typingctx, t0, kb):
    """``2**(k + kb)`` from ``t0 = y / ln2 + 1.5 * 2**23`` (float32; ``1.5 * 2**52`` float64),
    whose low mantissa bits hold ``k = rint(y / ln2)``: ``(bits(t0) + bias + kb) << mantissa
    bits`` -- an integer add and a shift, the bits above the exponent field shifted out (the
    "shift trick" of the Cython kernels' fl_exp; against a rounding instruction, a float ->
    int conversion and the same add and shift).  ``kb`` an integer literal; the caller keeps
    ``k + kb`` inside the normal exponent range.  A NaN ``t0`` gives some float, never a
    poison value (integer operations only): the caller's arithmetic carries the NaN on."""
    if t0 not in (types.float32, types.float64) or not isinstance(kb, types.IntegerLiteral):
        return None
    extra = kb.literal_value

    def codegen(context, builder, sig, args):
        if sig.return_type == types.float32:
            it, ft, bias, sh = ir.IntType(32), ir.FloatType(), 127, 23
        else:
            it, ft, bias, sh = ir.IntType(64), ir.DoubleType(), 1023, 52
        b = builder.add(builder.bitcast(args[0], it), ir.Constant(it, bias + extra))
        return builder.bitcast(builder.shl(b, ir.Constant(it, sh)), ft)

    return t0(t0, kb), codegen


@intrinsic
def _kc(typingctx, v):
    """``v`` unchanged, through ``llvm.arithmetic.fence`` (compiles to no instruction): for
    the coefficients of the polynomial helpers, so that in a vectorized loop each one is a
    value broadcast once before the loop and kept in a register.

    Why: a plain constant is, to LLVM's register allocator, a load from the constant pool that
    it may repeat wherever that is cheaper than keeping a register -- and Numba's JIT code
    addresses its constant pool with 64-bit absolute addresses (``movabsq``), one
    general-purpose register per constant.  In a loop that also holds a dozen array pointers
    the allocator re-broadcast every coefficient in every iteration: the cross-entropy's
    two-column exp loop took 59-71 instructions per 32 float32 lanes (AVX-512), 46 through this
    fence (the Cython kernel's: 48), and ran 4.1 -> 5.3-5.5 G el/s on Zen 4 in L1.  The fence
    is ``speculatable`` and reads no memory, so LLVM hoists it out of any loop, a conditional
    arm's included (an empty ``asm`` would do the same for registers but, not speculatable,
    could stay inside a conditional arm and keep that loop from vectorizing)."""
    if v not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.arithmetic.fence", [args[0].type])
        return builder.call(fn, [args[0]])

    return v(v), codegen


_SQRTH_BITS = 0x3F3504F3  # bits of float32 sqrt(1/2)


@intrinsic
def _frexp32(typingctx, x):
    """``(m, k)`` with ``x = 2**k * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``, for a positive
    normal float32 ``x`` (``k`` as float32).

    In LLVM IR because Numba promotes int32 arithmetic to int64: written in Python, the bit
    manipulation would run on 4-lane int64 vectors with conversions in and out, three times
    slower than these 8-lane int32 instructions.  The exponent field is counted from
    ``sqrt(1/2)`` by adding ``0x3F800000 - bits(sqrt(1/2))`` first, so that the mantissa lands
    in ``[sqrt(1/2), sqrt(2))`` and ``k`` is a plain shift.  Garbage for zero, negative,
    subnormal, inf and NaN input: the caller handles those.
    """
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        ix = builder.add(builder.bitcast(args[0], i32), ir.Constant(i32, 0x3F800000 - _SQRTH_BITS))
        mb = builder.add(builder.and_(ix, ir.Constant(i32, 0x007FFFFF)), ir.Constant(i32, _SQRTH_BITS))
        m = builder.bitcast(mb, ir.FloatType())
        k = builder.sub(builder.and_(builder.lshr(ix, ir.Constant(i32, 23)), ir.Constant(i32, 0x1FF)),
                        ir.Constant(i32, 127))
        kf = builder.sitofp(k, ir.FloatType())
        return context.make_tuple(builder, sig.return_type, (m, kf))

    return types.UniTuple(types.float32, 2)(types.float32), codegen


if numba.config.DISABLE_JIT:
    # NUMBA_DISABLE_JIT=1 (used for coverage runs and for debugging) runs every ``@njit``
    # function as plain Python, but an ``@intrinsic`` cannot be called from Python: these
    # NumPy equivalents take their place then (the compiled code never sees them).
    def _f64_bits(x):
        return np.float64(x).view(np.int64)

    def _bits_f64(i):
        return np.uint64(int(i) & 0xFFFFFFFFFFFFFFFF).view(np.float64)

    def _frexp32(x):
        ix = (int(np.float32(x).view(np.int32)) + (0x3F800000 - _SQRTH_BITS)) & 0xFFFFFFFF
        m = np.uint32(((ix & 0x007FFFFF) + _SQRTH_BITS) & 0xFFFFFFFF).view(np.float32)
        return m, np.float32(((ix >> 23) & 0x1FF) - 127)

    def _kc(v):
        return v

    def _pow2_shifted(t0, kb):
        if isinstance(t0, np.float32):
            b = (int(np.float32(t0).view(np.uint32)) + 127 + kb) << 23
            return np.uint32(b & 0xFFFFFFFF).view(np.float32)
        b = (int(np.float64(t0).view(np.uint64)) + 1023 + kb) << 52
        return np.uint64(b & 0xFFFFFFFFFFFFFFFF).view(np.float64)

    def _ldexp_split(y, kf):
        dt = np.float32 if isinstance(y, np.float32) else np.float64
        if not np.isfinite(kf):  # a NaN/inf argument: the compiled code's lane is discarded
            return dt(np.nan)
        k = int(kf)
        k1 = k >> 1
        return dt(dt(y * np.ldexp(dt(1.0), k1)) * np.ldexp(dt(1.0), k - k1))


# ----------------------------------------------------------------------------- exp
_F32 = np.float32
_LOG2E_32 = _F32(1.4426950408889634)
_C1_32 = _F32(0.693359375)  # ln2 high part: few mantissa bits, so k*C1 is exact
_C2_32 = _F32(-2.12194440e-4)  # ln2 - C1
# exp(r) ~ 1 + r + E2 r^2 + ... + E6 r^6 on |r| <= 1.02 ln2/2: the minimax fit of the relative
# error (Remez, c0 = c1 = 1 held exact), 4.9e-9.  Evaluated in Horner's form: six multiply-
# adds, where Cephes' degree-7 polynomial in the form (p r^2 + r) + 1 took eight and an add
# (float32 cross-entropy over 262144 x 10, Zen 4: 0.92x the time)
_E2_32 = _F32(0.4999999789497312)
_E3_32 = _F32(0.16666492794123944)
_E4_32 = _F32(0.041667125145612285)
_E5_32 = _F32(0.008371760045676213)
_E6_32 = _F32(0.0013893587849259745)
_LO_32 = _F32(-104.0)  # exp(-104) < smallest subnormal / 2: rounds to 0
_HI_32 = _F32(89.0)  # exp(89) > FLT_MAX: overflows to inf
_HALF_32 = _F32(0.5)
_ONE_32 = _F32(1.0)
_ZERO_32 = _F32(0.0)


@njit(**_JIT)
def exp32(x):
    """float32 ``exp(x)``, vectorizable, ~1 ulp; see the module docstring."""
    # clamps in the operand order of vmaxps / vminps (one instruction each, not a compare and
    # a blend); a NaN x passes through them, and the final select returns it
    xc = _LO_32 if _LO_32 > x else x
    xc = _HI_32 if _HI_32 < xc else xc
    k = np.rint(xc * _LOG2E_32)
    r = xc - k * _C1_32
    r = r - k * _C2_32
    p = _E6_32 * r + _E5_32
    p = p * r + _E4_32
    p = p * r + _E3_32
    p = p * r + _E2_32
    p = p * r + _ONE_32
    y = p * r + _ONE_32
    y = _ldexp_split(y, k)
    return y if x == x else x


_LOG2E_64 = 1.4426950408889634
_LN2HI_64 = 6.93147180369123816490e-01
_LN2LO_64 = 1.90821492927058770002e-10
_LO_64 = -746.0
_HI_64 = 710.0
_T = [1.0 / np.prod(np.arange(1, n + 1, dtype=np.float64)) for n in range(14)]  # 1 / n!
_T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9, _T10, _T11, _T12, _T13 = _T[2:]


@njit(**_JIT)
def exp64(x):
    """float64 ``exp(x)``, vectorizable, ~1 ulp; see the module docstring."""
    xc = _LO_64 if _LO_64 > x else x  # vmaxpd / vminpd, as in exp32
    xc = _HI_64 if _HI_64 < xc else xc
    k = np.rint(xc * _LOG2E_64)
    r = xc - k * _LN2HI_64
    r = r - k * _LN2LO_64
    p = _T12 * r + _T11
    p = p * r + _T10
    p = p * r + _T9
    p = p * r + _T8
    p = p * r + _T7
    p = p * r + _T6
    p = p * r + _T5
    p = p * r + _T4
    p = p * r + _T3
    p = p * r + _T2
    p = p * r + 1.0
    y = p * r + 1.0
    y = _ldexp_split(y, k)
    return y if x == x else x


# ----------------------------------------------------------------------------- exp of x <= 0
# Scaling the polynomial's coefficients by 2**-K (exact: a power of two) lets ``2**k`` be ONE
# normal factor ``2**(k + K)`` for every k in [-150, 0] (float32, K = 64) / [-1077, 0]
# (float64, K = 512): the product is the only rounding of the result, also into the subnormal
# range -- what the two-factor scaling of ``exp`` achieves with five more instructions.
_SN_32 = _F32(2.0**-64)
# 1.5 * 2**23 (2**52): x / ln2 + SHIFT holds rint(x / ln2) in its low mantissa bits
_SHIFT_32 = _F32(1.5 * 2.0**23)
_SHIFT_64 = 1.5 * 2.0**52
_Q2_32, _Q3_32, _Q4_32, _Q5_32, _Q6_32 = (_F32(float(c) * 2.0**-64) for c in (
    _E2_32, _E3_32, _E4_32, _E5_32, _E6_32))
_SN_64 = 2.0**-512
_TN = [t * 2.0**-512 for t in _T[:13]]
_N2, _N3, _N4, _N5, _N6, _N7, _N8, _N9, _N10, _N11, _N12 = _TN[2:]


@njit(**_JIT)
def expn32(x):
    """float32 ``exp(x)`` for ``x <= 0`` (or NaN / -inf), ~1 ulp, five instructions fewer
    than :func:`exp32`.

    For the shifted logits ``x - max`` of the normalizers and cross-entropies, and for
    ``exp(-|z|)``.  No upper clamp; ``max(y, x)`` at the end returns a NaN ``x`` (and would
    return ``+inf`` for ``x = +inf``: ``y = exp(x) > x`` otherwise).  For ``0 < x < inf`` the
    result is wrong (the scale overflows): callers never pass such ``x``.

    ``k = rint(x / ln2)`` and ``2**(k + 64)`` by the shift trick (:func:`_pow2_shifted`), as
    the Cython kernels' ``fl_expn``: a multiply-add and a subtraction give ``k``, an integer
    add and shift the scale -- no rounding instruction, no float -> int conversion (in L1,
    Zen 4: 4.36 -> 4.45 G el/s float32, 1.57 -> 1.65 float64).
    """
    xc = _kc(_LO_32) if _kc(_LO_32) > x else x
    t0 = xc * _kc(_LOG2E_32) + _kc(_SHIFT_32)  # k = rint(xc / ln2) in the low mantissa bits
    k = t0 - _kc(_SHIFT_32)
    r = xc - k * _kc(_C1_32)
    r = r - k * _kc(_C2_32)
    # 2**-64 * exp(r): exp32's polynomial, every coefficient times 2**-64, so that the
    # roundings are the same
    p = _kc(_Q6_32) * r + _kc(_Q5_32)
    p = p * r + _kc(_Q4_32)
    p = p * r + _kc(_Q3_32)
    p = p * r + _kc(_Q2_32)
    p = p * r + _kc(_SN_32)
    y = p * r + _kc(_SN_32)
    y = y * _pow2_shifted(t0, 64)
    return y if y > x else x


@njit(**_JIT)
def expn64(x):
    """float64 ``exp(x)`` for ``x <= 0`` (or NaN / -inf); see :func:`expn32`."""
    xc = _kc(_LO_64) if _kc(_LO_64) > x else x
    t0 = xc * _kc(_LOG2E_64) + _kc(_SHIFT_64)
    k = t0 - _kc(_SHIFT_64)
    r = xc - k * _kc(_LN2HI_64)
    r = r - k * _kc(_LN2LO_64)
    p = _kc(_N12) * r + _kc(_N11)
    p = p * r + _kc(_N10)
    p = p * r + _kc(_N9)
    p = p * r + _kc(_N8)
    p = p * r + _kc(_N7)
    p = p * r + _kc(_N6)
    p = p * r + _kc(_N5)
    p = p * r + _kc(_N4)
    p = p * r + _kc(_N3)
    p = p * r + _kc(_N2)
    p = p * r + _kc(_SN_64)
    y = p * r + _kc(_SN_64)
    y = y * _pow2_shifted(t0, 512)
    return y if y > x else x


# ----------------------------------------------------------------------------- log
_L_32 = [_F32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                           1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                           3.3333331174e-1)]
_L0_32, _L1_32, _L2_32, _L3_32, _L4_32, _L5_32, _L6_32, _L7_32, _L8_32 = _L_32
_MINNORM_32 = _F32(np.finfo(np.float32).tiny)
_TWO25_32 = _F32(2.0**25)
_M25_32 = _F32(-25.0)
_INF_32 = _F32(np.inf)
_NAN_32 = _F32(np.nan)


@njit(**_JIT)
def log32(x):
    """float32 ``log(x)`` (Cephes ``logf`` kernel), vectorizable; see the module docstring."""
    sub = x < _MINNORM_32
    xs = x * _TWO25_32 if sub else x
    m, kf = _frexp32(xs)  # xs = 2**kf * m, m in [sqrt(1/2), sqrt(2))
    kf = kf + _M25_32 if sub else kf
    f = m - _ONE_32
    z = f * f
    p = _L0_32 * f + _L1_32
    p = p * f + _L2_32
    p = p * f + _L3_32
    p = p * f + _L4_32
    p = p * f + _L5_32
    p = p * f + _L6_32
    p = p * f + _L7_32
    p = p * f + _L8_32
    y = f * z * p
    y = y + kf * _C2_32
    y = y - _HALF_32 * z
    y = f + y
    y = y + kf * _C1_32
    # specials: 0 -> -inf, <0 -> nan, +inf -> +inf, nan -> nan
    y = -_INF_32 if x == _ZERO_32 else y
    y = _NAN_32 if x < _ZERO_32 else y
    y = x if not (x < _INF_32) else y  # +inf and nan pass through
    return y


_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_MINNORM_64 = float(np.finfo(np.float64).tiny)
_TWO54 = 2.0**54
_MAGICB_64 = 2.0**52 + 1023.0


@njit(**_JIT)
def log64(x):
    """float64 ``log(x)`` (fdlibm kernel), vectorizable; see the module docstring."""
    sub = x < _MINNORM_64
    xs = x * _TWO54 if sub else x
    ix = _f64_bits(xs) + (0x3FF0000000000000 - 0x3FE6A09E00000000)
    m = _bits_f64((ix & 0x000FFFFFFFFFFFFF) + 0x3FE6A09E00000000)
    # biased exponent (11 bits) or-ed into the mantissa of 2**52, minus (2**52 + bias)
    kf = _bits_f64(((ix >> 52) & 0x7FF) | 0x4330000000000000) - _MAGICB_64
    kf = kf - 54.0 if sub else kf
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    y = kf * _LN2HI_64 - ((hfsq - (s * (hfsq + r) + kf * _LN2LO_64)) - f)
    y = -np.inf if x == 0.0 else y
    y = np.nan if x < 0.0 else y
    y = x if not (x < np.inf) else y
    return y


@njit(**_JIT)
def log1p32(x):
    """float32 ``log(1 + x)``, accurate for tiny ``x``; see the module docstring."""
    u = x + _ONE_32
    c = (x - (u - _ONE_32)) / u  # rounding error of 1 + x, divided by u
    lu = log32(u)
    # u == 0 (x = -1): log gives -inf, the correction 0/0; u == inf: correction is nan
    return lu + c if (u > _ZERO_32 and u < _INF_32) else lu


@njit(**_JIT)
def log1p64(x):
    """float64 ``log(1 + x)``, accurate for tiny ``x``; see the module docstring."""
    u = x + 1.0
    c = (x - (u - 1.0)) / u
    lu = log64(u)
    return lu + c if (u > 0.0 and u < np.inf) else lu


@njit(**_JIT)
def log1p_recip64(x):
    """float64 ``(log(1 + x), 1 / (1 + x))``: :func:`log1p64` sharing its one division (the
    float64 side of ``vlog1p_unit_recip``)."""
    u = x + 1.0
    r = 1.0 / u
    lu = log64(u)
    c = (x - (u - 1.0)) * r
    return (lu + c if (u > 0.0 and u < np.inf) else lu), r


# log1p(x) / x on [0, 1]: a degree-9 polynomial fitted for the least relative error of
# x P(x) (Chebyshev least squares, iteratively reweighted towards the minimax), rounded to
# float32: within 2 ulp of log1p in float32 Horner arithmetic (tests/test_numba_math.py)
_L1P_32 = tuple(_F32(v) for v in (
    1.0, -0.4999990165233612, 0.3332996070384979, -0.2495412677526474, 0.19675907492637634,
    -0.15305501222610474, 0.10603499412536621, -0.05695800483226776, 0.01985064707696438,
    -0.0032438444904983044))
(_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8, _P9) = _L1P_32


@njit(**_JIT)
def log1p_unit_recip32(x):
    """float32 ``(log(1 + x), 1 / (1 + x))`` for ``x`` in [0, 1] (NaN gives NaN): the softplus
    of binary cross-entropy with logits, where ``x = exp(-|z|)``.

    On [0, 1] ``log1p(x) = x P(x)`` with one polynomial (``_L1P_32``): no range reduction, no
    rounding of ``1 + x`` to correct, no special cases (0 gives exactly 0) -- ten
    multiply-adds instead of the general float32 log1p's ~25 operations (:func:`log32` of
    ``1 + x`` and its correction).  float64 keeps :func:`log1p_recip64`."""
    p = _P9 * x + _P8
    p = p * x + _P7
    p = p * x + _P6
    p = p * x + _P5
    p = p * x + _P4
    p = p * x + _P3
    p = p * x + _P2
    p = p * x + _P1
    p = p * x + _P0
    return x * p, _ONE_32 / (x + _ONE_32)


# inline="always" (at the Numba IR level) so that LLVM sees the calls to exp and log1p
# directly in the caller's loop: nested, each inlinable, but together above LLVM's inlining
# threshold they would stay an out-of-line call and block vectorization.  The few ops of
# softplus itself are insensitive to the caller's fast-math flags.
@njit(inline="always", **_JIT)
def softplus32(x):
    """float32 ``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``."""
    a = -x if x > _ZERO_32 else x  # -|x| (nan stays nan)
    mx = x if x > _ZERO_32 else _ZERO_32
    return mx + log1p32(expn32(a))


@njit(inline="always", **_JIT)
def softplus64(x):
    """float64 ``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``."""
    a = -x if x > 0.0 else x
    mx = x if x > 0.0 else 0.0
    return mx + log1p64(expn64(a))


# ----------------------------------------------------------------------------- softcap
# The logit soft cap ``x' = cap tanh(x / cap)`` and its derivative ``1 - tanh^2(x / cap)``, as
# the Cython kernels' ``fl_softcap_f`` / ``fl_softcap_d`` (kernels/fl_math.hpp) compute them:
# from ``y = -2|x| / cap <= 0`` and ONE range reduction ``y = k ln2 + r``, ``s = 2**k``,
#   e^y - 1 = s (e^r - 1) + (s - 1)   (e^r - 1 = r h(r): the exp polynomial without its + 1),
#   t = e^y,  tanh|u| = -(e^y - 1) / (2 + (e^y - 1)),  1 - tanh^2 = 4 t / (1 + t)^2,
# and near the cap (t < 0.2) x' = cap - 2 cap t / (1 + t).
# Why not ``(1 - t) / (1 + t)`` from an exp alone: ``1 - t`` cancels for |x| << cap, leaving
# an absolute error of ~cap ulp(1) in x' (float32, cap 30: ~2e-6, millions of ulp of a small
# x').  Why not ``1 - tanh^2`` from the rounded tanh: it cancels where tanh is near 1.  Both
# results are within a few ulp for every x; nothing overflows.  The clamp at ``lo`` keeps
# ``s = 2**k`` a normal number (k >= -126 / -1022); below it t is 0: x = +-inf gives +-cap and
# a derivative of exactly 0.  A NaN x gives NaN for both through the arithmetic alone: ``2**k``
# is taken from the bits of ``t0`` by integer operations (``_pow2_shifted``, no float -> int
# conversion, whose result for NaN is unspecified), so it is some float and ``q`` is NaN.  No
# final ``x if x != x`` select: in a loop that writes the result over ``x`` (the few-classes
# kernel's tile), LLVM turns "store select(c, v, load p) to p" into a masked store
# (AVX2 vmaskmovps, microcoded on AMD).
_CAP_LO_32 = _F32(-87.0)
_CAP_LO_64 = -708.0
_CAP_C1_32 = _F32(0.693145751953125)  # ln2 split as Cython's: k * C1 exact for |k| < 2**8
_CAP_C2_32 = _F32(1.42860682030941723212e-6)
_H7_32, _H6_32, _H5_32, _H4_32, _H3_32, _H2_32 = (_F32(_T[n]) for n in range(7, 1, -1))  # 1 / n!
_FIFTH_32 = _F32(0.2)
_TWO_32 = _F32(2.0)
_FOUR_32 = _F32(4.0)
_M2_32 = _F32(-2.0)


@njit(**_JIT)
def softcap32(x, cap, inv):
    """float32 ``(cap tanh(x / cap), 1 - tanh^2(x / cap))`` for ``inv = 1 / cap`` (rounded);
    see the comment above."""
    k2 = _M2_32 * inv  # -2 / cap: exact scaling of the rounded 1 / cap
    y = np.abs(x) * k2
    yc = _CAP_LO_32 if _CAP_LO_32 > y else y
    t0 = yc * _LOG2E_32 + _SHIFT_32  # k = rint(yc / ln2) in the low bits, as Cython's
    k = t0 - _SHIFT_32
    r = yc - k * _CAP_C1_32
    r = r - k * _CAP_C2_32
    h = _H7_32 * r + _H6_32
    h = h * r + _H5_32
    h = h * r + _H4_32
    h = h * r + _H3_32
    h = h * r + _H2_32
    h = h * r + _ONE_32
    q = h * r  # e^r - 1
    s = _pow2_shifted(t0, 0)
    em = s * q + (s - _ONE_32)  # e^y - 1 in [-1, 0]
    t = _ZERO_32 if y < _CAP_LO_32 else s * q + s
    rd = _ONE_32 / (_TWO_32 + em)  # 1 / (1 + t)
    dc = _FOUR_32 * t * rd * rd
    xm = cap - ((cap + cap) * t) * rd if t < _FIFTH_32 else cap * (-em * rd)
    return np.copysign(xm, x), dc


@njit(**_JIT)
def softcap64(x, cap, inv):
    """float64 :func:`softcap32` (degree-13 Taylor ``e^r - 1``)."""
    k2 = -2.0 * inv
    y = np.abs(x) * k2
    yc = _CAP_LO_64 if _CAP_LO_64 > y else y
    t0 = yc * _LOG2E_64 + _SHIFT_64
    k = t0 - _SHIFT_64
    r = yc - k * _LN2HI_64
    r = r - k * _LN2LO_64
    h = _T13 * r + _T12
    h = h * r + _T11
    h = h * r + _T10
    h = h * r + _T9
    h = h * r + _T8
    h = h * r + _T7
    h = h * r + _T6
    h = h * r + _T5
    h = h * r + _T4
    h = h * r + _T3
    h = h * r + _T2
    h = h * r + 1.0
    q = h * r
    s = _pow2_shifted(t0, 0)
    em = s * q + (s - 1.0)
    t = 0.0 if y < _CAP_LO_64 else s * q + s
    rd = 1.0 / (2.0 + em)
    dc = 4.0 * t * rd * rd
    xm = cap - ((cap + cap) * t) * rd if t < 0.2 else cap * (-em * rd)
    return np.copysign(xm, x), dc


# ----------------------------------------------------------------------------- order keys
# A row's maximum, NaN skipped, as an INTEGER max reduction.  The float form (``b if b > a
# else a``) vectorizes only under ``nnan``, which the library cannot allow; an integer
# ``smax`` reduction vectorizes with no fast-math flag at all (vpmaxsd / vpmaxsq).  The key of
# a float is its bit pattern with the magnitude bits of negative numbers flipped --
# ``b ^ ((b >> 31) & 0x7fffffff)`` -- which orders all non-NaN floats as the floats are
# ordered (-0.0 just below +0.0); a NaN gets the key of -inf, so it never wins.
_KEY_MASK = {32: 0x7FFFFFFF, 64: 0x7FFFFFFFFFFFFFFF}


def _flip(builder, b, width):
    """``b ^ ((b >> (width - 1)) & mask)``: float bits <-> order key (an involution)."""
    it = ir.IntType(width)
    return builder.xor(b, builder.and_(builder.ashr(b, ir.Constant(it, width - 1)), ir.Constant(it, _KEY_MASK[width])))


def _key_codegen(builder, v, width):
    return _flip(builder, builder.bitcast(v, ir.IntType(width)), width)


@intrinsic
def _order_key(typingctx, x):
    if x not in (types.float32, types.float64):
        return None
    width = 32 if x == types.float32 else 64
    rt = types.int32 if width == 32 else types.int64

    def codegen(context, builder, sig, args):
        v = args[0]
        k = _key_codegen(builder, v, width)
        ninf = _key_codegen(builder, ir.Constant(v.type, float("-inf")), width)
        return builder.select(builder.fcmp_ordered("ord", v, v), k, ninf)

    return rt(x), codegen


@intrinsic
def _key_value(typingctx, k, like):
    """The float (of ``like``'s type) whose order key is ``k`` (the key is an involution)."""
    ft = like.dtype if isinstance(like, types.Array) else like
    if ft not in (types.float32, types.float64):
        return None
    width = 32 if ft == types.float32 else 64

    def codegen(context, builder, sig, args):
        it = ir.IntType(width)
        kv = args[0]
        if kv.type.width != width:
            kv = builder.trunc(kv, it) if kv.type.width > width else builder.sext(kv, it)
        return builder.bitcast(_flip(builder, kv, width), ir.FloatType() if width == 32 else ir.DoubleType())

    return ft(k, like), codegen


def _flip_py(b):
    """Plain-Python twin of :func:`_flip` on a NumPy int32/int64 scalar."""
    return type(b)(b ^ ((b >> (8 * b.itemsize - 1)) & _KEY_MASK[8 * b.itemsize]))


def _order_key_py(x):
    """Plain-Python twin of :func:`_order_key` (NUMBA_DISABLE_JIT=1)."""
    x = x if isinstance(x, (np.float32, np.float64)) else np.float64(x)
    it = np.int32 if isinstance(x, np.float32) else np.int64
    if x != x:
        x = type(x)(-np.inf)
    return _flip_py(np.array(x).view(it)[()])


def _key_value_py(k, like):
    """Plain-Python twin of :func:`_key_value`."""
    dt = like.dtype if isinstance(like, np.ndarray) else np.asarray(like).dtype
    it = np.int32 if dt == np.float32 else np.int64
    return np.array(_flip_py(it(k))).view(dt)[()]


order_key = _order_key_py if numba.config.DISABLE_JIT else _order_key
key_value = _key_value_py if numba.config.DISABLE_JIT else _key_value


# No inline="always" here: Numba-level inlining would lower these ops with the caller's flags.
@njit(**_JIT)
def sub_sub(a, b, c):
    """``(a - b) - c`` in this order, even inside a caller compiled with ``reassoc``.

    Under ``reassoc`` LLVM may rewrite ``(x - m) - log s`` as ``x - (m + log s)``, which loses
    the O(1) part of a log-probability when ``m`` is huge (``3e38``); an instruction keeps the
    fast-math flags of the function it was written in when it is inlined elsewhere.
    """
    return (a - b) - c


@njit(**_JIT)
def bce_mix(y, a, b):
    """``-(y a + (1 - y) b)``, the binary cross-entropy of the clamped logs ``a = log p`` and
    ``b = log(1 - p)``, in this order, even inside a caller compiled with ``reassoc``.

    Both products are <= 0, so the sum as written never cancels.  Under ``reassoc`` LLVM
    rewrites it as ``b + y (a - b)``, which cancels when ``y`` is near 1 and ``b`` is large:
    float32 ``p = 1 - 2**-24``, ``y = 1`` gave ``-0.0`` instead of ``5.96e-8``.
    """
    return -(y * a + (cast_like(1.0, y) - y) * b)


@njit(**_JIT)
def neg_log_p(log_s, x, shift):
    """``-log p = log s - (x - shift)`` (float64), the difference ``x - shift`` taken in the
    dtype of ``x``, as the reference does.

    The whole expression lives here, under IEEE order: written in a ``reassoc`` caller, LLVM
    rewrites it (via ``log s + (shift - x)``) into ``lse - x`` with the already computed
    ``lse = shift + log s`` -- which is 0 instead of ``log 3`` for a row ``[1e300] * 3``.  A
    protected subexpression alone is not enough: the rewrite creates new instructions with the
    caller's flags.
    """
    return log_s - np.float64(x - shift)


# ----------------------------------------------------------------------------- dispatch
def _make_dispatch(name, f32, f64, doc, nargs=1):
    """A function of ``nargs`` scalars that calls ``f32`` or ``f64`` by the type of its first."""
    if numba.config.DISABLE_JIT:
        # plain-Python mode: dispatch on the NumPy scalar type as the overload below does
        # on the Numba type (anything not float32 -- float64, Python float, int -- is float64)
        def stub(x, *rest):
            return f32(x, *rest) if isinstance(x, np.float32) else f64(np.float64(x), *rest)
    else:
        def stub(x, *rest):  # pragma: no cover - only ever called from jitted code
            raise NotImplementedError(f"{name} is callable from Numba-compiled code only")

    stub.__name__ = name
    stub.__doc__ = doc

    def impl(f, integer=False):
        # Numba's overload wants the implementation's signature spelled out: one per arity
        if nargs == 1:
            return (lambda x: f(np.float64(x))) if integer else (lambda x: f(x))
        assert nargs == 3
        return None if integer else (lambda x, a, b: f(x, a, b))

    def pick(x):
        if x == types.float32:
            return impl(f32)
        if x == types.float64:
            return impl(f64)
        if isinstance(x, types.Integer):
            return impl(f64, integer=True)
        return None

    # inline="always": the dispatch layer itself disappears, leaving the call to the typed
    # helper in the caller, which LLVM inlines (one level of nesting less to fit its budget).
    # The typing function's signature must be the implementation's too (no *args).
    overload(stub, inline="always")((lambda x: pick(x)) if nargs == 1 else (lambda x, a, b: pick(x)))
    return stub


vexp = _make_dispatch("vexp", exp32, exp64, "Vectorizable ``exp`` of a float32/float64 scalar.")
vexpn = _make_dispatch("vexpn", expn32, expn64,
                       "Vectorizable ``exp(x)`` for ``x <= 0`` (NaN and -inf too): fewer instructions.")
vlog = _make_dispatch("vlog", log32, log64, "Vectorizable ``log`` of a float32/float64 scalar.")
vlog1p = _make_dispatch("vlog1p", log1p32, log1p64, "Vectorizable ``log1p`` of a float32/float64 scalar.")
vlog1p_unit_recip = _make_dispatch("vlog1p_unit_recip", log1p_unit_recip32, log1p_recip64,
                                   "``(log1p(x), 1 / (1 + x))`` for ``x`` in [0, 1] (float32: one "
                                   "polynomial; float64: :func:`log1p_recip64`).")
vsoftplus = _make_dispatch("vsoftplus", softplus32, softplus64,
                           "Vectorizable ``softplus(x) = log(1 + exp(x))`` (float32/float64).")
vsoftcap = _make_dispatch("vsoftcap", softcap32, softcap64,
                          "Vectorizable ``(cap tanh(x / cap), 1 - tanh(x / cap)**2)`` of ``(x, cap, "
                          "1 / cap)``, both in the type of ``x``.", nargs=3)


def cast_like(v, like):
    """``v`` converted to the (floating) type of ``like``, inside jitted code."""
    if numba.config.DISABLE_JIT:  # plain-Python mode: the overload's rule on NumPy types
        dt = like.dtype if isinstance(like, np.ndarray) else np.asarray(like).dtype
        return np.float32(v) if dt == np.float32 else np.float64(v)
    raise NotImplementedError("cast_like is callable from Numba-compiled code only")  # pragma: no cover


@overload(cast_like)
def _ov_cast_like(v, like):
    if like == types.float32:
        return lambda v, like: np.float32(v)
    if like == types.float64:
        return lambda v, like: np.float64(v)
    if isinstance(like, types.Array) and like.dtype == types.float32:
        return lambda v, like: np.float32(v)
    if isinstance(like, types.Array) and like.dtype == types.float64:
        return lambda v, like: np.float64(v)
    return None
