/*
 * fl_math.hpp -- vectorizable elementary functions and contiguous inner loops of the fastloss
 * Cython backend (kernels/_kernels_cy.pyx, compiled as C++).
 *
 * Why a C++ header: the hot loops are reductions (max, sum of exp) and elementwise maps that
 * must vectorize WITHOUT -ffast-math (whose -ffinite-math-only breaks the +-inf/NaN semantics
 * the library promises).  `#pragma omp simd reduction(...)` (enabled by -fopenmp-simd) lets
 * gcc/clang reassociate exactly the reduction and nothing else, and the polynomial exp/log
 * below are plain arithmetic plus integer bit manipulation, so they vectorize where libm calls
 * never would.  Cython cannot emit those pragmas, so the loops live here and the .pyx drives
 * them row by row under OpenMP `prange`.  Each loop is written once, as a function template
 * over the compute type (float, double); the traits fl_t<T> supply the elementary functions.
 *
 * Every row loop here takes CONTIGUOUS pointers; the .pyx gathers strided / broadcast operands
 * into thread-local blocks first.  An output may alias an input at the same index (in-place
 * gradients): each loop reads element j before writing element j and never reads j' != j after
 * writing it, so aliasing at equal indices is safe.  The few-class kernels at the end
 * (fl_ce_cols, fl_norm_cols) take a block of rows with any strides and transpose it into
 * column layout themselves; they read the whole block before writing any output.
 *
 * AVX2 note (no AVX-512): packed double <-> int64 conversion and 64-bit arithmetic right shifts
 * do not exist on AVX2, and gcc scalarizes a loop that needs them.  The exp/log below therefore
 * get integers from floating values with the "round-to-nearest shifter" trick (t = x + 1.5*2^52
 * puts round(x) in the low mantissa bits) and turn small integers back into doubles with the
 * 2^52 magic constant; only 64-bit add, and, or and left/logical-right shifts are needed.
 * These tricks rely on strict IEEE evaluation: never compile this file with -ffast-math or
 * -fassociative-math (the shifter would be folded away).
 */
#ifndef FL_MATH_HPP
#define FL_MATH_HPP

#include <stdint.h>
#include <string.h>
#include <stddef.h>
#include <math.h>

#if defined(__GNUC__)
#define FL_INLINE static inline __attribute__((always_inline))
#else
#define FL_INLINE static inline
#endif

/* `#pragma omp simd` through _Pragma so the loops below stay macro-friendly (gcc/clang; with
 * -fopenmp-simd or -fopenmp).  Elsewhere (MSVC) the loops are plain loops: correct, and
 * vectorized where that compiler manages without the reduction hint. */
#if defined(__GNUC__) || defined(__clang__)
#define FL_SIMD _Pragma("omp simd")
#define FL_SIMD_SUM(v) _Pragma(FL_STR(omp simd reduction(+:v)))
#define FL_SIMD_MAX(v) _Pragma(FL_STR(omp simd reduction(max:v)))
#else
#define FL_SIMD
#define FL_SIMD_SUM(v)
#define FL_SIMD_MAX(v)
#endif
#define FL_STR(x) #x

/* a prefetch is only a hint (never faults); callers keep its addresses inside the operand */
#if defined(__GNUC__) || defined(__clang__)
#define FL_PREFETCH(addr, rw) __builtin_prefetch((const void *)(addr), rw, 0)
#else
#define FL_PREFETCH(addr, rw) ((void)0)
#endif

/* Reductions over float32 are accumulated in float32 lanes for at most FL_BLOCK elements and
 * then added into a float64 total: vector speed, and a float64-quality sum for 262,144 classes. */
#define FL_BLOCK 1024

typedef ptrdiff_t fl_idx;

FL_INLINE double fl_d_from_bits(uint64_t b) { double d; memcpy(&d, &b, 8); return d; }
FL_INLINE uint64_t fl_bits_d(double d) { uint64_t b; memcpy(&b, &d, 8); return b; }
FL_INLINE float fl_f_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
FL_INLINE uint32_t fl_bits_f(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* ------------------------------------------------------------------------------ exp
 * exp(x) = 2^k * exp(r), k = round(x / ln2), r = x - k ln2 (Cody-Waite, two-part ln2; FMA
 * contraction only makes r more accurate), |r| <= ln2/2, exp(r) by a polynomial in Horner
 * form (double: the degree-13 Taylor polynomial, truncation < 2e-18; float: a degree-6
 * minimax fit, 4.9e-9, FL_E2F..FL_E6F).
 * 2^k is applied as two factors 2^k1 * 2^k2 (k1 = round(k/2)), each a normal number, so the
 * result is rounded only once even when it is subnormal, and overflows to +inf / underflows to
 * 0 correctly.  The input is clamped first (to where the result is surely inf or 0), which
 * also maps +-inf; NaN passes the clamps (comparisons with NaN are false) and propagates
 * through r.  Accuracy: < 1.5 ulp over the whole range (tests/test_cython_build.py). */
#define FL_EXP_SHIFT_D 6755399441055744.0 /* 1.5 * 2^52 */
FL_INLINE double fl_exp_d(double x)
{
    x = x > 1000.0 ? 1000.0 : x;
    x = x < -1000.0 ? -1000.0 : x;
    const double t = x * 1.4426950408889634074 + FL_EXP_SHIFT_D; /* low bits: round(x/ln2) */
    const double k = t - FL_EXP_SHIFT_D;
    double r = x - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* k1 = round(k/2) by the same shifter (k/2 is exact), k2 = k - k1; |k1|,|k2| <= 722 */
    const double t1 = k * 0.5 + FL_EXP_SHIFT_D;
    const double k1 = t1 - FL_EXP_SHIFT_D;
    const double t2 = (k - k1) + FL_EXP_SHIFT_D;
    /* low 12 bits of bits(t) are k mod 4096 (2^51 = 0 mod 4096): (k + 1023) << 52 = 2^k */
    const double s1 = fl_d_from_bits((fl_bits_d(t1) + 1023u) << 52);
    const double s2 = fl_d_from_bits((fl_bits_d(t2) + 1023u) << 52);
    return p * s1 * s2;
}

#define FL_EXP_SHIFT_F 12582912.0f /* 1.5 * 2^23 */
/* exp(r) on |r| <= 1.02 ln2/2 as 1 + r + E2 r^2 + ... + E6 r^6: the minimax fit of the relative
 * error (Remez, the first two coefficients held at 1), 4.9e-9 -- 0.08 ulp; with the roundings
 * of Horner's form 0.90 ulp at most.  The Numba backend's (fastloss/_backends/numba_backend/
 * _math.py: _E2_32 ...), the same values.  Six multiply-adds where the degree-7 Taylor
 * polynomial took seven. */
#define FL_E2F 0.4999999789497312f
#define FL_E3F 0.16666492794123944f
#define FL_E4F 0.041667125145612285f
#define FL_E5F 0.008371760045676213f
#define FL_E6F 0.0013893587849259745f
FL_INLINE float fl_exp_f(float x)
{
    x = x > 100.0f ? 100.0f : x;
    x = x < -110.0f ? -110.0f : x;
    const float t = x * 1.44269504f + FL_EXP_SHIFT_F;
    const float k = t - FL_EXP_SHIFT_F;
    float r = x - k * 0.693145751953125f;   /* ln2 split: 12 significant bits ... */
    r = r - k * 1.42860682030941723212e-6f; /* ... and the rest */
    /* exp(r) ~ 1 + r + E2 r^2 + ... + E6 r^6 (FL_E2F..FL_E6F): six multiply-adds */
    float p = FL_E6F;
    p = p * r + FL_E5F;
    p = p * r + FL_E4F;
    p = p * r + FL_E3F;
    p = p * r + FL_E2F;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float t1 = k * 0.5f + FL_EXP_SHIFT_F;
    const float k1 = t1 - FL_EXP_SHIFT_F;
    const float t2 = (k - k1) + FL_EXP_SHIFT_F;
    /* low 9 bits of bits(t) are k mod 512 (2^22 = 0 mod 512): (k + 127) << 23 = 2^k */
    const float s1 = fl_f_from_bits((fl_bits_f(t1) + 127u) << 23);
    const float s2 = fl_f_from_bits((fl_bits_f(t2) + 127u) << 23);
    return p * s1 * s2;
}

/* ------------------------------------------------------------------------------ expn
 * exp(x) for x <= 0 -- the shifted logits x_j - max of the softmax-type kernels, -|z| of the
 * BCE -- with fewer operations than fl_exp (about 15 instead of 24 per vector):
 * - k = round(x / ln2) lies in [-150, 0] (float; [-1077, 0] for double) after the clamp at lo,
 *   so ONE scale 2^(k + K), K = 64 (512), is a normal number;
 * - the polynomial's coefficients are scaled by 2^-K (exact: powers of two, and the values
 *   stay normal where they matter), so p(r) 2^-K * 2^(k+K) is the only rounding of the result,
 *   also into the subnormal range (gradual underflow, as fl_exp's two-factor scaling gives);
 * - no upper clamp, and max(x, lo) is one vmaxps: `lo` is a parameter that callers pass
 *   through an empty asm (FL_OPAQUE) outside their loop -- with a constant bound gcc evaluates
 *   exp on both sides of the select and blends the results (eight instructions instead of one).
 * lo = -104 (-746): below it the result rounds to 0.
 * Specials: NaN passes max (the comparison is false) and propagates; -inf -> 0; +inf -> +inf
 * through the final max(y, x) (y = exp(x) > x for every x <= 0, so it changes nothing else).
 * For 0 < x < +inf the result is NOT exp(x) (the scale overflows; max(y, x) then returns some
 * number >= x, never NaN): callers use it only where x <= 0 is certain -- x - max with a finite
 * row max (rows whose max is not finite, where x - 0 can be positive, take fl_exp) and -|z|.
 * Accuracy: the polynomial of fl_exp, < 1.5 ulp (tests/test_cython_build.py). */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__aarch64__))
#define FL_OPAQUE(v) __asm__("" : "+x"(v)) /* v is now unknown to the optimizer; no code */
#else
#define FL_OPAQUE(v) ((void)0)
#endif
/* a pointer the compiler may assume 32-byte aligned (the column kernels' scratch arrays) */
#if defined(__GNUC__) || defined(__clang__)
#define FL_ALIGNED(p) __builtin_assume_aligned(p, 32)
#else
#define FL_ALIGNED(p) (p)
#endif
#define FL_EXPN_LO_F (-104.0f)
#define FL_EXPN_LO_D (-746.0)
/* Where fl_expn is still exact above 0: up to k = 63 (float; 511 for double) the one scale
 * 2^(k + K) is a normal number, i.e. x < 63.5 ln2 = 44.0 (354.5).  The sharded cross-entropy
 * uses fl_expn when it can bound x' - L by these (margins for the rounding of x' - L). */
#define FL_EXPN_HI_F 40.0
#define FL_EXPN_HI_D 350.0

#define FL_EXPN_SF 5.42101086242752217e-20f          /* 2^-64 */
#define FL_EXPN_SD 7.45834073120020674329e-155      /* 2^-512 */
FL_INLINE float fl_expn_f(float x, float lo)
{
    const float xc = x < lo ? lo : x;
    const float t = xc * 1.44269504f + FL_EXP_SHIFT_F;
    const float k = t - FL_EXP_SHIFT_F;
    float r = xc - k * 0.693145751953125f;
    r = r - k * 1.42860682030941723212e-6f;
    /* the polynomial of fl_exp_f with every coefficient times 2^-64: the same roundings */
    float p = FL_EXPN_SF * FL_E6F;
    p = p * r + FL_EXPN_SF * FL_E5F;
    p = p * r + FL_EXPN_SF * FL_E4F;
    p = p * r + FL_EXPN_SF * FL_E3F;
    p = p * r + FL_EXPN_SF * FL_E2F;
    p = p * r + FL_EXPN_SF;
    p = p * r + FL_EXPN_SF;
    /* low 9 bits of bits(t) are k mod 512: (k + 64 + 127) << 23 = 2^(k+64), k + 191 in [41, 191] */
    const float y = p * fl_f_from_bits((fl_bits_f(t) + 191u) << 23);
    return y > x ? y : x;
}

FL_INLINE double fl_expn_d(double x, double lo)
{
    const double xc = x < lo ? lo : x;
    const double t = xc * 1.4426950408889634074 + FL_EXP_SHIFT_D;
    const double k = t - FL_EXP_SHIFT_D;
    double r = xc - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double p = FL_EXPN_SD * (1.0 / 6227020800.0);
    p = p * r + FL_EXPN_SD * (1.0 / 479001600.0);
    p = p * r + FL_EXPN_SD * (1.0 / 39916800.0);
    p = p * r + FL_EXPN_SD * (1.0 / 3628800.0);
    p = p * r + FL_EXPN_SD * (1.0 / 362880.0);
    p = p * r + FL_EXPN_SD * (1.0 / 40320.0);
    p = p * r + FL_EXPN_SD * (1.0 / 5040.0);
    p = p * r + FL_EXPN_SD * (1.0 / 720.0);
    p = p * r + FL_EXPN_SD * (1.0 / 120.0);
    p = p * r + FL_EXPN_SD * (1.0 / 24.0);
    p = p * r + FL_EXPN_SD * (1.0 / 6.0);
    p = p * r + FL_EXPN_SD * 0.5;
    p = p * r + FL_EXPN_SD;
    p = p * r + FL_EXPN_SD;
    /* low 12 bits of bits(t) are k mod 4096: (k + 512 + 1023) << 52 = 2^(k+512), k + 1535 > 0 */
    const double y = p * fl_d_from_bits((fl_bits_d(t) + 1535u) << 52);
    return y > x ? y : x;
}

/* ------------------------------------------------------------------------------ softcap
 * The logit soft cap x' = cap tanh(x / cap) and its derivative dc = 1 - tanh^2(x / cap), both
 * from y = -2|x|/cap <= 0 (k2 = -2/cap, rounded once by the caller) and ONE range reduction
 * y = k ln2 + r, s = 2^k, as in fl_exp:
 *   e^y - 1 = s (p(r) - 1) + (s - 1),  p(r) - 1 = r h(r)  (fl_exp's polynomial without its
 *             final + 1: no cancellation near y = 0),
 *   t = e^y = s (p(r) - 1) + s,
 *   tanh|u| = (1 - t) / (1 + t) = -(e^y - 1) / (2 + (e^y - 1)),  dc = 4 t / (1 + t)^2,
 * and near the cap (t < 0.2) x' = cap - 2 cap t / (1 + t), whose error is then mostly the last
 * subtraction's (~1 ulp of x' instead of ~2.5: the loss is a difference of capped logits near
 * +-cap, where float32 has no ulp to spare).
 * Why not tanh = (1 - t) / (1 + t) from an exp alone: 1 - t cancels when |x| << cap and x'
 * then carries an absolute error of ~cap ulp(1) (float32, cap 30: ~2e-6, the whole loss
 * tolerance).  Why not the reference's 1 / cosh^2 or 1 - (x'/cap)^2: cosh overflows, and
 * 1 - tanh^2 cancels where tanh is near 1 (float32: 1e-4 relative at |u| = 4).  Both results
 * are within a few ulp for every x, and nothing overflows.  Specials: the clamp at lo keeps
 * s = 2^k a normal number (k >= -126 / -1022; lo = -87 / -708, where t is ~1e-38 / ~1e-308),
 * and below it t is set to 0 -- x = +-inf gives x' = +-cap and a derivative of exactly 0;
 * NaN fails both comparisons and propagates to x' and dc.  lo is passed through FL_OPAQUE by
 * the caller (see fl_expn). */
#define FL_CAP_LO_F (-87.0f)
#define FL_CAP_LO_D (-708.0)
FL_INLINE float fl_softcap_f(float x, float k2, float cap, float lo, float &dc)
{
    const float y = fabsf(x) * k2;
    const float yc = y < lo ? lo : y;
    const float t0 = yc * 1.44269504f + FL_EXP_SHIFT_F;
    const float k = t0 - FL_EXP_SHIFT_F;
    float r = yc - k * 0.693145751953125f;
    r = r - k * 1.42860682030941723212e-6f;
    float h = 1.0f / 5040.0f;
    h = h * r + 1.0f / 720.0f;
    h = h * r + 1.0f / 120.0f;
    h = h * r + 1.0f / 24.0f;
    h = h * r + 1.0f / 6.0f;
    h = h * r + 0.5f;
    h = h * r + 1.0f;
    const float q = h * r;             /* e^r - 1 */
    /* low 9 bits of bits(t0) are k mod 512: (k + 127) << 23 = 2^k, k + 127 in [1, 127] */
    const float s = fl_f_from_bits((fl_bits_f(t0) + 127u) << 23);
    const float em = s * q + (s - 1.0f); /* e^y - 1 in [-1, 0] */
    const float t = y < lo ? 0.0f : s * q + s;
    const float rd = 1.0f / (2.0f + em); /* 1 / (1 + t) */
    dc = 4.0f * t * rd * rd;
    /* near the cap (t < 0.2, |u| > 0.8) as cap - 2 cap t / (1 + t): one rounding at the end */
    const float xm = t < 0.2f ? cap - ((cap + cap) * t) * rd : cap * (-em * rd);
    return copysignf(xm, x);
}

FL_INLINE double fl_softcap_d(double x, double k2, double cap, double lo, double &dc)
{
    const double y = fabs(x) * k2;
    const double yc = y < lo ? lo : y;
    const double t0 = yc * 1.4426950408889634074 + FL_EXP_SHIFT_D;
    const double k = t0 - FL_EXP_SHIFT_D;
    double r = yc - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double h = 1.0 / 6227020800.0;
    h = h * r + 1.0 / 479001600.0;
    h = h * r + 1.0 / 39916800.0;
    h = h * r + 1.0 / 3628800.0;
    h = h * r + 1.0 / 362880.0;
    h = h * r + 1.0 / 40320.0;
    h = h * r + 1.0 / 5040.0;
    h = h * r + 1.0 / 720.0;
    h = h * r + 1.0 / 120.0;
    h = h * r + 1.0 / 24.0;
    h = h * r + 1.0 / 6.0;
    h = h * r + 0.5;
    h = h * r + 1.0;
    const double q = h * r;
    /* low 12 bits of bits(t0) are k mod 4096: (k + 1023) << 52 = 2^k, k + 1023 in [2, 1023] */
    const double s = fl_d_from_bits((fl_bits_d(t0) + 1023u) << 52);
    const double em = s * q + (s - 1.0);
    const double t = y < lo ? 0.0 : s * q + s;
    const double rd = 1.0 / (2.0 + em);
    dc = 4.0 * t * rd * rd;
    const double xm = t < 0.2 ? cap - ((cap + cap) * t) * rd : cap * (-em * rd);
    return copysign(xm, x);
}

/* ------------------------------------------------------------------------------ log
 * fdlibm / musl algorithm: x = 2^k * m with m in [sqrt(2)/2, sqrt(2)), f = m - 1,
 * s = f / (2 + f), log(1+f) = f - f^2/2 + s (f^2/2 + R(s^2)) with a minimax R; then
 * + k ln2 in two parts.  < 1 ulp.  Subnormals are scaled by 2^54 (2^25 for float) first.
 * k is turned into a double through the 2^52 magic constant (no int64 -> double conversion).
 * Specials by selects: log(+inf) = +inf, log(0) = -inf, log(x < 0) = NaN, NaN -> NaN. */
FL_INLINE double fl_log_d(double x)
{
    const int sub = x < 2.2250738585072014e-308; /* subnormal, zero or negative */
    const double xs = sub ? x * 18014398509481984.0 : x; /* 2^54 */
    uint64_t ix = fl_bits_d(xs);
    ix += (uint64_t)(0x3ff00000u - 0x3fe6a09eu) << 32; /* m in [sqrt2/2, sqrt2) */
    const uint64_t e = (ix >> 52) & 0x7ffu;
    const double m = fl_d_from_bits((ix & 0x000fffffffffffffULL) + ((uint64_t)0x3fe6a09eu << 32));
    const double dk = (fl_d_from_bits(0x4330000000000000ULL | e) - 4503599627370496.0)
                      - (sub ? 1023.0 + 54.0 : 1023.0);
    const double f = m - 1.0;
    const double hfsq = 0.5 * f * f;
    const double s = f / (2.0 + f);
    const double z = s * s;
    const double w = z * z;
    const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const double t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const double R = t2 + t1;
    double r = s * (hfsq + R) + dk * 1.90821492927058770002e-10 - hfsq + f + dk * 6.93147180369123816490e-01;
    r = x == HUGE_VAL ? x : r;
    r = x == 0.0 ? -HUGE_VAL : r;
    r = x < 0.0 ? NAN : r;
    r = x != x ? x : r;
    return r;
}

FL_INLINE float fl_log_f(float x)
{
    const int sub = x < 1.17549435e-38f;
    const float xs = sub ? x * 33554432.0f : x; /* 2^25 */
    uint32_t ix = fl_bits_f(xs);
    ix += 0x3f800000u - 0x3f3504f3u;
    const int32_t k = (int32_t)(ix >> 23) - (sub ? 0x7f + 25 : 0x7f);
    const float m = fl_f_from_bits((ix & 0x007fffffu) + 0x3f3504f3u);
    const float dk = (float)k;
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s;
    const float w = z * z;
    const float t1 = w * (0.40000972152f + w * 0.24279078841f);
    const float t2 = z * (0.66666662693f + w * 0.28498786688f);
    const float R = t2 + t1;
    const float hfsq = 0.5f * f * f;
    float r = s * (hfsq + R) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
    r = x == HUGE_VALF ? x : r;
    r = x == 0.0f ? -HUGE_VALF : r;
    r = x < 0.0f ? NAN : r;
    r = x != x ? x : r;
    return r;
}

/* ------------------------------------------------------------------------------ traits
 * The loops below are written once, as templates over the compute type T (float or double);
 * fl_t<T> gives each its elementary functions (their polynomials differ by type) and constants.
 *
 * ew_acc -- where elementwise loss totals are accumulated in float64 (SEMANTICS K5; see
 * fl_dsum below): float loss loops only store l and the block is then summed in float64 by
 * fl_dsum; double loops accumulate in the loop itself (a float64 reduction costs nothing extra
 * there).  Both loops carry `omp simd reduction(+:acc)`; in the float ones acc is untouched.
 * tile -- the width of an AVX transpose tile (fl_tile): 8 floats or 4 doubles. */
template <typename T> struct fl_t;

template <> struct fl_t<float> {
    FL_INLINE float exp(float x) { return fl_exp_f(x); }
    FL_INLINE float expn(float x, float lo) { return fl_expn_f(x, lo); }
    FL_INLINE float log(float x) { return fl_log_f(x); }
    FL_INLINE float softcap(float x, float k2, float cap, float lo, float &dc) { return fl_softcap_f(x, k2, cap, lo, dc); }
    static constexpr float expn_lo = FL_EXPN_LO_F;
    static constexpr double expn_hi = FL_EXPN_HI_F;
    static constexpr float cap_lo = FL_CAP_LO_F;
    static constexpr float inf = HUGE_VALF;
    static constexpr bool ew_acc = false;
    static constexpr fl_idx tile = 8;
};

template <> struct fl_t<double> {
    FL_INLINE double exp(double x) { return fl_exp_d(x); }
    FL_INLINE double expn(double x, double lo) { return fl_expn_d(x, lo); }
    FL_INLINE double log(double x) { return fl_log_d(x); }
    FL_INLINE double softcap(double x, double k2, double cap, double lo, double &dc) { return fl_softcap_d(x, k2, cap, lo, dc); }
    static constexpr double expn_lo = FL_EXPN_LO_D;
    static constexpr double expn_hi = FL_EXPN_HI_D;
    static constexpr double cap_lo = FL_CAP_LO_D;
    static constexpr double inf = HUGE_VAL;
    static constexpr bool ew_acc = true;
    static constexpr fl_idx tile = 4;
};

/* log1p(u) = log(1+u) * u / ((1+u) - 1): the rounding error of 1+u cancels (Goldberg,
 * "What every computer scientist should know", Thm 4); exact u where 1+u rounds to 1. */
template <typename T>
FL_INLINE T fl_log1p(T u)
{
    const T y = (T)1 + u;
    const T d = y - (T)1;
    T r = fl_t<T>::log(y) * (u / d);
    r = d == (T)0 ? u : r;
    r = u == fl_t<T>::inf ? u : r;
    r = u == (T)-1 ? -fl_t<T>::inf : r;
    return r;
}

/* ------------------------------------------------------------------------------ loops
 * Function templates over T = float, double: the .pyx calls them from its fused-type code and
 * Cython deduces T from the pointer arguments.  NaN conventions: comparisons are written so
 * that NaN propagates exactly where NumPy's reference propagates it
 * (np.maximum(a, b) -> `a < b ? b : a` keeps a NaN a). */

/* max ignoring NaN (a NaN row is caught later through the sum of exp) */
template <typename T>
static inline T fl_max(const T *x, fl_idx n)
{
    T m = -fl_t<T>::inf;
    FL_SIMD_MAX(m)
    for (fl_idx j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* sum exp(x - sh); if e != NULL also stores e[j] = exp(x[j] - sh) (e may be x).  neg: sh is
 * the finite row max, so every x - sh <= 0 (or NaN) and the cheaper EXPN applies */
template <typename T>
static inline double fl_sumexp(const T *x, T *e, fl_idx n, T sh, int neg)
{
    double tot = 0.0;
    T lo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;
        T acc = 0;
        if (neg && e) {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) {
                const T v = fl_t<T>::expn(x[j] - sh, lo);
                e[j] = v;
                acc += v;
            }
        } else if (neg) {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) acc += fl_t<T>::expn(x[j] - sh, lo);
        } else if (e) {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) { const T v = fl_t<T>::exp(x[j] - sh); e[j] = v; acc += v; }
        } else {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) acc += fl_t<T>::exp(x[j] - sh);
        }
        tot += (double)acc;
    }
    return tot;
}

/* The row sum of exp again, for a row whose max dominates it (s < 2: L = log s < log 2, and
 * the loss -- or lse - max -- is then of the size of L, with the error of s as its own).
 * fl_sumexp adds the max's term, exactly 1, into a float32 lane that then takes up to
 * FL_BLOCK/16 more terms, each rounded at ulp(1): ~2e-7 absolute in L at C = 3000, 1e-5
 * relative for a loss of 0.02.  Here the terms equal to 1 are counted apart (exactly, then
 * added in float64) and the lanes add only the others.  e != NULL: from the stored
 * exponentials (the gradient path; no exp); else from x, sh the finite row max.  Kept out of
 * fl_sumexp's loop, where the select and the count cost ~12% on every row; the callers redo
 * only the rows with s < 2. */
template <typename T>
static inline double fl_sumexp_apart(const T *x, const T *e, fl_idx n, T sh)
{
    double tot = 0.0;
    T lo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;
        T acc = 0, ones = 0;
        if (e) {
            _Pragma("omp simd reduction(+:acc,ones)")
            for (fl_idx j = j0; j < j1; j++) {
                const T v = e[j], f = v == (T)1 ? (T)1 : (T)0; /* NaN: kept in acc */
                acc += v - f;          /* v - f: one add on the accumulator's chain */
                ones += f;
            }
        } else {
            _Pragma("omp simd reduction(+:acc,ones)")
            for (fl_idx j = j0; j < j1; j++) {
                const T v = fl_t<T>::expn(x[j] - sh, lo), f = v == (T)1 ? (T)1 : (T)0;
                acc += v - f;
                ones += f;
            }
        }
        tot += (double)acc + (double)ones;
    }
    return tot;
}

/* sum w[j] * (x[j] - sh)  (w == NULL: weights 1), each difference rounded to T as in the
 * reference, and a product taken as 0 where x[j] - sh == 0 (SEMANTICS K2: an infinite weight
 * at the row max must not give inf * 0 = NaN here; the caller's wsum * log s carries it).
 * With logits near the dtype's max the T lanes can overflow although the float64 total does
 * not (float32: a few differences of -3e38, or w * (x - sh) itself): a row whose sum is not
 * finite is summed again in double (rare; inf/NaN inputs land there too and give the same
 * inf/NaN). */
template <typename T>
static inline double fl_wsum_shift(const T *x, const T *w, fl_idx n, T sh)
{
    double tot = 0.0;
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;
        T acc = 0;
        if (w) {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) {
                const T d = x[j] - sh, p = w[j] * d; /* w[j] read in any case: no masked load */
                acc += d == (T)0 ? (T)0 : p;
            }
        } else {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) acc += x[j] - sh;
        }
        tot += (double)acc;
    }
    if (!isfinite(tot)) { /* outside the hot loop: its code stays as without the fallback */
        tot = 0.0;
        for (fl_idx j = 0; j < n; j++) {
            const T d = x[j] - sh;
            tot += d == (T)0 ? 0.0 : (w ? (double)w[j] : 1.0) * (double)d;
        }
    }
    return tot;
}

/* sum a[j] (b == NULL) or sum a[j] * b[j] */
template <typename T>
static inline double fl_dot(const T *a, const T *b, fl_idx n)
{
    double tot = 0.0;
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;
        T acc = 0;
        if (b) {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) acc += a[j] * b[j];
        } else {
            FL_SIMD_SUM(acc)
            for (fl_idx j = j0; j < j1; j++) acc += a[j];
        }
        tot += (double)acc;
    }
    return tot;
}

/* out[j] = exp(x[j] - sh) * a - b * (w ? w[j] : 1)   (out may be x) */
template <typename T>
static inline void fl_expaxpy(const T *x, T *out, fl_idx n, T sh, T a, const T *w, T b)
{
    if (w) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) out[j] = fl_t<T>::exp(x[j] - sh) * a - b * w[j];
    } else {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) out[j] = fl_t<T>::exp(x[j] - sh) * a - b;
    }
}

/* g[j] = g[j] * a - b * (w ? w[j] : 1)  (scales stored exponentials in place) */
template <typename T>
static inline void fl_scale_axpy(T *g, fl_idx n, T a, const T *w, T b)
{
    if (w) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) g[j] = g[j] * a - b * w[j];
    } else {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) g[j] = g[j] * a - b;
    }
}

/* The soft cap's first pass over a row (it replaces fl_max there): xc[j] = cap tanh(x[j]/cap)
 * and, when d != NULL, d[j] = 1 - tanh^2 (see fl_softcap); returns the max of xc, NaN skipped
 * as in fl_max.  The rest of the row's passes then run on xc (a thread's row buffer, in cache)
 * instead of x.  d may be x (an in-place gradient: the derivative is kept in the gradient row
 * until the gradient pass multiplies by it); xc must not alias x or d. */
template <typename T>
static inline T fl_cap_max(const T *x, T *xc, T *d, fl_idx n, T cap)
{
    T m = -fl_t<T>::inf, lo = fl_t<T>::cap_lo;
    const T k2 = (T)-2 / cap;
    FL_OPAQUE(lo);
    if (d) {
        FL_SIMD_MAX(m)
        for (fl_idx j = 0; j < n; j++) {
            T dj;
            const T v = fl_t<T>::softcap(x[j], k2, cap, lo, dj);
            xc[j] = v;
            d[j] = dj;
            m = v > m ? v : m;
        }
    } else {
        FL_SIMD_MAX(m)
        for (fl_idx j = 0; j < n; j++) {
            T dj;
            const T v = fl_t<T>::softcap(x[j], k2, cap, lo, dj);
            xc[j] = v;
            m = v > m ? v : m;
        }
    }
    return m;
}

/* the capped gradient: g[j] = (e[j] * a - b * (w ? w[j] : 1)) * g[j], e the stored exponentials
 * and g the cap's derivative (fl_cap_max): fl_scale_axpy's formula times d x'/d x */
template <typename T>
static inline void fl_cap_grad(const T *e, T *g, fl_idx n, T a, const T *w, T b)
{
    if (w) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) g[j] = (e[j] * a - b * w[j]) * g[j];
    } else {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) g[j] = (e[j] * a - b) * g[j];
    }
}

template <typename T>
static inline void fl_fill(T *g, fl_idx n, T v)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) g[j] = v;
}

/* log-softmax: out[j] = (x[j] - sh) - L, L = log sum exp(x - sh).  Never x[j] - (sh + L):
 * with large logits sh + L rounds to sh (ulp(1e4) = 1e-3 in float32; at 3e38 the whole L is
 * lost), whereas x[j] - sh is exact near the max (Sterbenz) and L is O(log C).  The order is
 * kept because this file is never compiled with reassociation (see the header). */
template <typename T>
static inline void fl_sub2(const T *x, T *out, fl_idx n, T sh, T L)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = (x[j] - sh) - L;
}

/* softmax backward: out = y * (g - d) */
template <typename T>
static inline void fl_smb(const T *g, const T *y, T *out, fl_idx n, T d)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = y[j] * (g[j] - d);
}

/* log-softmax backward: out = g - exp(y) * s */
template <typename T>
static inline void fl_lsmb(const T *g, const T *y, T *out, fl_idx n, T s)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = g[j] - fl_t<T>::exp(y[j]) * s;
}

/* soft-target cross-entropy, pass over a row after its shift sh and L = log(sum exp(x-sh)):
 * yw = ((1-eps) y + eps/C) * w (computed in double), *ysum = sum_j yw, returns the row loss
 *   sum_j yw (lse - x_j) = ysum * L - sum_{j : yw != 0, x_j != sh} yw (x_j - sh)
 * (SEMANTICS K3; x_j - sh rounded to T as in the reference; accurate when |lse| >> lse - x_j).
 * A zero-mass term is left out of the second sum (a masked class, x_j = -inf with yw = 0,
 * contributes 0), and so is a term at the row max, x_j - sh == 0 (K3b: an infinite yw there
 * gives inf through ysum * L, not inf * 0 = NaN); a NaN or +inf logit anywhere in the row
 * makes L NaN/inf and the row NaN through ysum * L even when the whole mass is 0 (0 * inf).
 * w is never NULL (ones when unweighted: no conditional load in the loop) */
template <typename T>
static inline double fl_soft_terms(const T *x, const T *y, const T *w, fl_idx n, T sh,
                                        double L, double a1, double a0, double *ysum)
{
    double tot = 0.0, ys = 0.0;
    _Pragma("omp simd reduction(+:tot,ys)") /* reassociate only these two sums */
    for (fl_idx j = 0; j < n; j++) {
        const double yw = (a1 * (double)y[j] + a0) * (double)w[j];
        const double d = (double)(x[j] - sh);
        tot += yw == 0.0 || d == 0.0 ? 0.0 : yw * d;
        ys += yw;
    }
    *ysum = ys;
    return ys * L - tot;
}

/* soft-target gradient: out = gs * (exp(x - sh) * pa - yw) with pa = a / sum exp(x - sh);
 * neg: sh is the finite row max (EXPN applies, as in fl_sumexp).  dc != NULL (soft cap): x
 * holds the capped logits and the result is multiplied by the cap's derivative dc[j] (dc may
 * be out: element j is read before it is written) -- separate loops, so the uncapped ones
 * stay as they were */
template <typename T>
static inline void fl_soft_grad(const T *x, const T *y, const T *w, T *out, fl_idx n, T sh,
                                     T pa, T a1, T a0, T gs, int neg, const T *dc)
{
    T lo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    if (neg && dc) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) {
            const T yw = (a1 * y[j] + a0) * w[j];
            out[j] = gs * (fl_t<T>::expn(x[j] - sh, lo) * pa - yw) * dc[j];
        }
    } else if (neg) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) {
            const T yw = (a1 * y[j] + a0) * w[j];
            out[j] = gs * (fl_t<T>::expn(x[j] - sh, lo) * pa - yw);
        }
    } else if (dc) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) {
            const T yw = (a1 * y[j] + a0) * w[j];
            out[j] = gs * (fl_t<T>::exp(x[j] - sh) * pa - yw) * dc[j];
        }
    } else {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) {
            const T yw = (a1 * y[j] + a0) * w[j];
            out[j] = gs * (fl_t<T>::exp(x[j] - sh) * pa - yw);
        }
    }
}

/* ------------------------------------------------------------------------------ sharded CE
 * Class-sharded hard-target cross-entropy (protocol `cross_entropy_shard`): a row holds the
 * classes [off, off + n) of K, and the global float64 row log-sum-exp L of the capped logits
 * is given.  ONE pass over the shard -- no max, no sum of exps -- computes
 *   p_j = exp(x'_j - L),   g_j = gs (p_j A - eps/K w_j - [j = t] (1-eps) w_t) dx'/dx,
 *   A = (1-eps) w_t + eps/K sum_k w_k + 2 z L,
 * (x' = cap tanh(x / cap) and its derivative in the same pass, fl_softcap) and, with
 * smoothing, the float64 sum_j w_j x'_j of the shard's share of the loss
 *   [off == 0] (((1-eps) w_t + eps/K sum_k w_k) L + z L^2)
 *   - [t in shard] (1-eps) w_t x'_t - eps/K sum_{j in shard} w_j x'_j.
 *
 * x'_j - L in the compute dtype: float32 cannot hold L to the digits that matter once |L| is
 * large (ulp(1e4) = 1e-3 would be a 1e-3 relative error of p), so L = Lh + Ll is split into
 * two floats (Lh = fl(L), Ll = fl(L - Lh)) and d = (x' - Lh) - Ll: x' - Lh is exact wherever
 * p is not negligible (Sterbenz, or |d| small beside ulp), and Ll restores L's low digits.
 * An L beyond float's range (finite, only a caller's bogus value) cannot be split: those rows
 * form d in double (the DD loops), as the reference does.  Non-finite L: Lh = L, Ll = 0 gives
 * IEEE's x' - L exactly (x' - inf = -inf -> p = 0, inf - inf = NaN).  exp is the general
 * fl_exp: L is the caller's, so x' - L <= 0 is not certain (an lse from another backend may
 * sit an ulp below a capped logit of this one, a caller may pass anything).  Only with the
 * cap, where x' - L <= cap - L is known per row, the cheaper fl_expn is used when that bound
 * is within FL_EXPN_HI (where fl_expn is still exact).
 * The smoothing sum is accumulated in double from exact products (float32: w x' widened), so
 * float32 logits near FLT_MAX cannot overflow it.  The weights are the SHARD's (w + off) and
 * enter only with eps != 0 (SEMANTICS K1: a NaN weight of a class no target uses must not
 * leak through 0 * w). */

/* L = Lh + Ll in T (see above); returns 0 when L is finite but outside T's range */
FL_INLINE int fl_split_lse(double L, float *Lh, float *Ll)
{
    if (fabs(L) <= 3.4028234663852886e38) {
        const float h = (float)L;
        *Lh = h;
        *Ll = (float)(L - (double)h);
        return 1;
    }
    *Lh = (float)L;
    *Ll = 0.0f;
    return !isfinite(L);
}
FL_INLINE int fl_split_lse(double L, double *Lh, double *Ll)
{
    *Lh = L;
    *Ll = 0.0;
    return 1;
}

/* x' - L: split (DD false) or formed in double and rounded once (DD true) */
template <typename T, bool DD>
FL_INLINE T fl_shard_diff(T v, T Lh, T Ll, double L)
{
    return DD ? (T)((double)v - L) : (v - Lh) - Ll;
}

/* The gradient pass over a shard's row: g[j] = (exp(x'_j - L) ca - cb w_j) * dc_j (g may be
 * x: element j is read before it is written).  WM: 0 no smoothing (no cb term, no sum),
 * 1 smoothing without weights, 2 with weights w (the shard's).  Returns sum_j w_j x'_j in
 * double (0 for WM == 0), accumulated in the same loop.
 * With the cap, each block of FL_BLOCK elements takes two loops in L1 -- the cap into a stack
 * buffer (and its derivative into g), then the exponentials -- rather than one loop doing
 * both: the fused loop (two polynomials, a division and their selects per vector) ran ~1.45x
 * slower in cache on AVX-512 (0.84 vs 0.58 ns per float32 element, one thread); the data
 * still leaves and enters memory once.
 * en (cap only): the caller has checked that x' - L <= cap - L stays within fl_t<T>::expn_hi,
 * so the cheaper fl_expn is exact here (see FL_EXPN_HI_F); another 11% in cache. */
template <typename T, bool CAP, int WM, bool DD>
static inline double fl_shard_grad_loop(const T *x, T *g, fl_idx n, T Lh, T Ll, double L, T ca,
                                        const T *w, T cb, T cap, int en)
{
    double tot = 0.0;
    if (!CAP) {
        FL_SIMD_SUM(tot)
        for (fl_idx j = 0; j < n; j++) {
            const T v = x[j];
            T gj = fl_t<T>::exp(fl_shard_diff<T, DD>(v, Lh, Ll, L)) * ca;
            if (WM == 1) {
                gj = gj - cb;
                tot += (double)v;
            } else if (WM == 2) {
                gj = gj - cb * w[j];
                tot += (double)w[j] * (double)v;
            }
            g[j] = gj;
        }
        return tot;
    }
    T lo = fl_t<T>::cap_lo, elo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    FL_OPAQUE(elo);
    const T k2 = (T)-2 / cap;
    T buf[FL_BLOCK]; /* this block's capped logits */
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {
        const fl_idx m = j0 + FL_BLOCK < n ? FL_BLOCK : n - j0;
        const T *xb = x + j0;
        T *gb = g + j0;
        FL_SIMD
        for (fl_idx j = 0; j < m; j++) {
            T dc;
            buf[j] = fl_t<T>::softcap(xb[j], k2, cap, lo, dc);
            gb[j] = dc; /* after x[j] was read: g may be x */
        }
        const T *wb = WM == 2 ? w + j0 : w;
        if (en) {
            FL_SIMD_SUM(tot)
            for (fl_idx j = 0; j < m; j++) {
                const T v = buf[j];
                T gj = fl_t<T>::expn(fl_shard_diff<T, DD>(v, Lh, Ll, L), elo) * ca;
                if (WM == 1) {
                    gj = gj - cb;
                    tot += (double)v;
                } else if (WM == 2) {
                    gj = gj - cb * wb[j];
                    tot += (double)wb[j] * (double)v;
                }
                gb[j] = gj * gb[j];
            }
        } else {
            FL_SIMD_SUM(tot)
            for (fl_idx j = 0; j < m; j++) {
                const T v = buf[j];
                T gj = fl_t<T>::exp(fl_shard_diff<T, DD>(v, Lh, Ll, L)) * ca;
                if (WM == 1) {
                    gj = gj - cb;
                    tot += (double)v;
                } else if (WM == 2) {
                    gj = gj - cb * wb[j];
                    tot += (double)wb[j] * (double)v;
                }
                gb[j] = gj * gb[j];
            }
        }
    }
    return tot;
}

/* The loss-only pass (smoothing): sum_j w_j x'_j in double (w NULL: weights 1) */
template <typename T, bool CAP>
static inline double fl_shard_dot(const T *x, const T *w, fl_idx n, T cap)
{
    T lo = fl_t<T>::cap_lo;
    FL_OPAQUE(lo);
    const T k2 = CAP ? (T)-2 / cap : (T)0;
    double tot = 0.0;
    if (w) {
        FL_SIMD_SUM(tot)
        for (fl_idx j = 0; j < n; j++) {
            T v = x[j], dc;
            if (CAP) v = fl_t<T>::softcap(v, k2, cap, lo, dc);
            tot += (double)w[j] * (double)v;
        }
    } else {
        FL_SIMD_SUM(tot)
        for (fl_idx j = 0; j < n; j++) {
            T v = x[j], dc;
            if (CAP) v = fl_t<T>::softcap(v, k2, cap, lo, dc);
            tot += (double)v;
        }
    }
    return tot;
}

template <typename T, bool CAP, bool DD>
static inline double fl_shard_grad_wm(const T *x, T *g, fl_idx n, T Lh, T Ll, double L, T ca,
                                      const T *w, T cb, T cap, int wm, int en)
{
    if (wm == 0) return fl_shard_grad_loop<T, CAP, 0, DD>(x, g, n, Lh, Ll, L, ca, w, cb, cap, en);
    if (wm == 1) return fl_shard_grad_loop<T, CAP, 1, DD>(x, g, n, Lh, Ll, L, ca, w, cb, cap, en);
    return fl_shard_grad_loop<T, CAP, 2, DD>(x, g, n, Lh, Ll, L, ca, w, cb, cap, en);
}

/* One row of a shard (contiguous x of n classes; g NULL: loss only, else the gradient row,
 * which may be x).  tl: the target's index in the shard, or -1 when it lies in another shard;
 * ws: the shard's class weights (w + off) or NULL; wt: the target's weight w_t; wsum:
 * sum_k w_k over all K classes; ec = eps / K; first: off == 0 (the shard that counts the lse
 * terms and the z-loss); gs: the row's gradient scale.  Returns the row's float64 share of
 * the loss, in the reference's order of operations. */
template <typename T>
static inline double fl_ce_shard_row(const T *x, T *g, fl_idx n, fl_idx tl, const T *ws,
                                     double wt, double wsum, double eps, double ec, double z,
                                     T cap, double L, int first, double gs)
{
    T xt = (T)0, dct = (T)1;
    if (tl >= 0) { /* read before the gradient row (maybe x) is written */
        xt = x[tl];
        if (cap != (T)0) {
            T lo = fl_t<T>::cap_lo;
            xt = fl_t<T>::softcap(xt, (T)-2 / cap, cap, lo, dct);
        }
    }
    const T *wv = eps != 0.0 ? ws : (const T *)NULL; /* the weights enter only with smoothing */
    const int wm = eps == 0.0 ? 0 : (wv ? 2 : 1);
    double dot = 0.0;
    if (g) {
        /* no eps/K sum(w) term at all with eps == 0 (K1); 2 z L even with z == 0, as the
         * reference: an infinite L then gives NaN there too */
        double a = (1.0 - eps) * wt + 2.0 * z * L;
        if (eps != 0.0) a += ec * wsum;
        const T ca = (T)(gs * a), cb = (T)(gs * ec);
        T Lh, Ll;
        const int split = fl_split_lse(L, &Lh, &Ll);
        /* |x'| <= cap: every x' - L <= cap - L, known before the pass (NaN L: no) */
        const int en = (double)cap - L <= fl_t<T>::expn_hi;
        if (cap != (T)0)
            dot = split ? fl_shard_grad_wm<T, true, false>(x, g, n, Lh, Ll, L, ca, wv, cb, cap, wm, en)
                        : fl_shard_grad_wm<T, true, true>(x, g, n, Lh, Ll, L, ca, wv, cb, cap, wm, en);
        else
            dot = split ? fl_shard_grad_wm<T, false, false>(x, g, n, Lh, Ll, L, ca, wv, cb, cap, wm, 0)
                        : fl_shard_grad_wm<T, false, true>(x, g, n, Lh, Ll, L, ca, wv, cb, cap, wm, 0);
        if (tl >= 0) { /* the target's element again, from x'_t read before the pass */
            const T d = split ? fl_shard_diff<T, false>(xt, Lh, Ll, L) : fl_shard_diff<T, true>(xt, Lh, Ll, L);
            T gt = fl_t<T>::exp(d) * ca;
            if (wm == 1) gt = gt - cb;
            else if (wm == 2) gt = gt - cb * wv[tl];
            gt = gt - (T)(gs * (1.0 - eps) * wt);
            g[tl] = cap != (T)0 ? gt * dct : gt;
        }
    } else if (eps != 0.0) {
        dot = cap != (T)0 ? fl_shard_dot<T, true>(x, wv, n, cap) : fl_shard_dot<T, false>(x, wv, n, cap);
    }
    double row = 0.0;
    if (tl >= 0) row = -(1.0 - eps) * wt * (double)xt;
    if (eps != 0.0) row = row - ec * dot;
    if (first) {
        double coef = (1.0 - eps) * wt;
        if (eps != 0.0) coef = coef + ec * wsum;
        row = row + coef * L;
        if (z != 0.0) row = row + z * L * L;
    }
    return row;
}

/* ---- elementwise: all operands contiguous blocks; w / go are never NULL (ones); l is never
 * NULL (scratch); g may be NULL (no gradient).  Return the float64 sum of l.
 *
 * The sum is accumulated in float64 (SEMANTICS K5): every T term is widened (exactly) before
 * it is added, so the total carries no rounding of the compute dtype -- float32 terms near
 * FLT_MAX cannot overflow it, and a float32 / float16 mean is the float64 mean of the terms
 * (float32 lanes of FL_BLOCK / W ~ 128 terms each had a worst-case relative error of
 * ~128 u ~ 8e-6, and reached 2e-6 on random float16 data).  Where it happens (FL_EW_*): the
 * float32 loss loops of bce-with-logits, bce, kl and gnll only store l, and fl_dsum sums the
 * block (4 KB, still in L1) afterwards -- a float64 reduction inside those long,
 * register-hungry loops made gcc spill more (~10% slower in cache), the separate pass costs
 * ~1-3%; float64 loops reduce in the loop, as they always did; mse, a short loop, widens and
 * adds in the loop itself for both (a separate pass would double its work in cache). */

template <typename T>
static inline double fl_dsum(const T *l, fl_idx n)
{
    double acc = 0.0;
    FL_SIMD_SUM(acc)
    for (fl_idx j = 0; j < n; j++) acc += (double)l[j];
    return acc;
}

/* softplus(-z) = max(-z, 0) + log1p(exp(-|z|)); -|z| <= 0, so EXPN applies */
template <typename T>
static inline double fl_bce_logits(fl_idx n, const T *z, const T *y, const T *w,
                                        const T *pw, int has_pw, T *l, T *g, const T *go, T gs)
{
    double acc = 0.0;
    T lo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    if (g) {
        FL_SIMD_SUM(acc)
        for (fl_idx j = 0; j < n; j++) {
            const T zj = z[j], yj = y[j], mz = -zj;
            const T e = fl_t<T>::expn(-(zj < 0 ? -zj : zj), lo); /* exp(-|z|), NaN stays NaN */
            const T sp = (mz < 0 ? (T)0 : mz) + fl_log1p<T>(e);
            const T c = has_pw ? (T)1 + (pw[j] - (T)1) * yj : (T)1;
            const T lv = ((T)1 - yj) * zj + c * sp;
            const T inv = (T)1 / ((T)1 + e);
            const T sig = zj >= 0 ? inv : e * inv;      /* sigmoid(z) */
            const T sigm = zj >= 0 ? e * inv : inv;     /* sigmoid(-z) */
            const T gv = has_pw ? ((T)1 - yj) - c * sigm : sig - yj;
            l[j] = lv * w[j];
            g[j] = gv * w[j] * gs * go[j];
            if (fl_t<T>::ew_acc) acc += l[j];
        }
    } else {
        FL_SIMD_SUM(acc)
        for (fl_idx j = 0; j < n; j++) {
            const T zj = z[j], yj = y[j], mz = -zj;
            const T e = fl_t<T>::expn(-(zj < 0 ? -zj : zj), lo);
            const T sp = (mz < 0 ? (T)0 : mz) + fl_log1p<T>(e);
            const T c = has_pw ? (T)1 + (pw[j] - (T)1) * yj : (T)1;
            l[j] = (((T)1 - yj) * zj + c * sp) * w[j];
            if (fl_t<T>::ew_acc) acc += l[j];
        }
    }
    return (fl_t<T>::ew_acc ? acc : acc + fl_dsum<T>(l, n));
}

/* PyTorch: log terms clamped at -100; gradient (p - y) / max(p (1 - p), 1e-12f) */
template <typename T>
static inline double fl_bce(fl_idx n, const T *p, const T *y, const T *w, T *l, T *g,
                                 const T *go, T gs)
{
    double acc = 0.0;
    FL_SIMD_SUM(acc)
    for (fl_idx j = 0; j < n; j++) {
        const T pj = p[j], yj = y[j];
        T lp = fl_t<T>::log(pj), l1 = fl_log1p<T>(-pj);
        lp = lp < (T)-100 ? (T)-100 : lp;
        l1 = l1 < (T)-100 ? (T)-100 : l1;
        l[j] = -(yj * lp + ((T)1 - yj) * l1) * w[j];
        if (fl_t<T>::ew_acc) acc += l[j];
    }
    if (g) {
        FL_SIMD
        for (fl_idx j = 0; j < n; j++) {
            const T pj = p[j];
            T den = pj * ((T)1 - pj);
            den = den < (T)1e-12f ? (T)1e-12f : den; /* ATen's float 1e-12, any dtype */
            g[j] = (pj - y[j]) / den * w[j] * gs * go[j];
        }
    }
    return (fl_t<T>::ew_acc ? acc : acc + fl_dsum<T>(l, n));
}

/* pointwise t (log t - x), 0 where t == 0; log_target: exp(t) (t - x), 0 where t == -inf */
template <typename T>
static inline double fl_kl(fl_idx n, const T *x, const T *t, int log_target, T *l, T *g,
                                const T *go, T gs)
{
    double acc = 0.0;
    if (log_target) {
        FL_SIMD_SUM(acc)
        for (fl_idx j = 0; j < n; j++) {
            const T tj = t[j], et = fl_t<T>::exp(tj);
            const int zero = tj == -fl_t<T>::inf;
            l[j] = zero ? (T)0 : et * (tj - x[j]);
            if (g) g[j] = (zero ? (T)0 : -et) * gs * go[j];
            if (fl_t<T>::ew_acc) acc += l[j];
        }
    } else {
        FL_SIMD_SUM(acc)
        for (fl_idx j = 0; j < n; j++) {
            const T tj = t[j];
            l[j] = tj == 0 ? (T)0 : tj * (fl_t<T>::log(tj) - x[j]);
            if (g) g[j] = -tj * gs * go[j];
            if (fl_t<T>::ew_acc) acc += l[j];
        }
    }
    return (fl_t<T>::ew_acc ? acc : acc + fl_dsum<T>(l, n));
}

template <typename T>
static inline double fl_mse(fl_idx n, const T *x, const T *t, T *l, T *g, const T *go, T gs)
{
    double acc = 0.0;
    FL_SIMD_SUM(acc)
    for (fl_idx j = 0; j < n; j++) {
        const T d = x[j] - t[j];
        const T lj = d * d;
        l[j] = lj;
        if (g) g[j] = (T)2 * d * gs * go[j];
        acc += (double)lj;
    }
    return acc;
}

/* v = max(var, eps) (NaN stays NaN); l = (log v + d^2 / v) / 2 (+ log(2 pi)/2);
 * d/dx = d / v, d/dvar = (1/v - d^2/v^2) / 2 at the clamped v (PyTorch's no-grad clamp) */
template <typename T>
static inline double fl_gnll(fl_idx n, const T *x, const T *t, const T *var, T eps, T cst,
                                  T *l, T *g, T *gv, const T *go, T gs)
{
    double acc = 0.0;
    FL_SIMD_SUM(acc)
    for (fl_idx j = 0; j < n; j++) {
        const T v = var[j] < eps ? eps : var[j];
        const T d = x[j] - t[j];
        const T s = gs * go[j];
        l[j] = (T)0.5 * (fl_t<T>::log(v) + d * d / v) + cst;
        if (g) g[j] = s * (d / v);
        if (gv) gv[j] = s * ((T)0.5 * ((T)1 / v - d * d / (v * v)));
        if (fl_t<T>::ew_acc) acc += l[j];
    }
    return (fl_t<T>::ew_acc ? acc : acc + fl_dsum<T>(l, n));
}

/* elementwise maps exposed for testing the elementary functions */
template <typename T>
static inline void fl_vexp(const T *x, T *out, fl_idx n)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = fl_t<T>::exp(x[j]);
}
template <typename T>
static inline void fl_vexpn(const T *x, T *out, fl_idx n)
{
    T lo = fl_t<T>::expn_lo;
    FL_OPAQUE(lo);
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = fl_t<T>::expn(x[j], lo);
}
template <typename T>
static inline void fl_vsoftcap(const T *x, T *out, T *d, fl_idx n, T cap)
{
    fl_cap_max<T>(x, out, d, n, cap);
}
template <typename T>
static inline void fl_vlog(const T *x, T *out, fl_idx n)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = fl_t<T>::log(x[j]);
}
template <typename T>
static inline void fl_vlog1p(const T *x, T *out, fl_idx n)
{
    FL_SIMD
    for (fl_idx j = 0; j < n; j++) out[j] = fl_log1p<T>(x[j]);
}

/* panel of P rows -> P contiguous rows of n: buf[r n + j] = p[r rs + j cs].  For Fortran-like
 * layouts (|rs| < |cs|) one cache line holds the element of several rows: it is read once for
 * the whole panel.  Columns go in tiles of 8 (8 independent lines in flight, 8 consecutive
 * stores per buffer row) with a software prefetch 4 tiles ahead: hardware prefetchers do not
 * follow such large strides, and without it the gather is memory-latency bound. */
template <typename T>
static inline void fl_gather_panel(const T *p, fl_idx rs, fl_idx cs, fl_idx P, fl_idx n,
                                        T *buf)
{
    fl_idx j0 = 0;
    for (; j0 + 8 <= n; j0 += 8) {
        if (j0 + 40 <= n)
            for (int q = 0; q < 8; q++) {
                FL_PREFETCH(p + (j0 + 32 + q) * cs, 0);
                FL_PREFETCH(p + (j0 + 32 + q) * cs + (P - 1) * rs, 0);
            }
        for (fl_idx r = 0; r < P; r++)
            for (int q = 0; q < 8; q++) buf[r * n + j0 + q] = p[r * rs + (j0 + q) * cs];
    }
    for (fl_idx r = 0; r < P; r++)
        for (fl_idx j = j0; j < n; j++) buf[r * n + j] = p[r * rs + j * cs];
}
template <typename T>
static inline void fl_scatter_panel(const T *buf, T *p, fl_idx rs, fl_idx cs, fl_idx P,
                                         fl_idx n)
{
    fl_idx j0 = 0;
    for (; j0 + 8 <= n; j0 += 8) {
        if (j0 + 40 <= n)
            for (int q = 0; q < 8; q++) {
                FL_PREFETCH(p + (j0 + 32 + q) * cs, 1);
                FL_PREFETCH(p + (j0 + 32 + q) * cs + (P - 1) * rs, 1);
            }
        for (fl_idx r = 0; r < P; r++)
            for (int q = 0; q < 8; q++) p[r * rs + (j0 + q) * cs] = buf[r * n + j0 + q];
    }
    for (fl_idx r = 0; r < P; r++)
        for (fl_idx j = j0; j < n; j++) p[r * rs + j * cs] = buf[r * n + j];
}

template <typename T>
static inline void fl_gather(const T *p, fl_idx s, T *buf, fl_idx n)
{
    for (fl_idx j = 0; j < n; j++) buf[j] = p[j * s];
}
template <typename T>
static inline void fl_scatter(const T *buf, T *p, fl_idx s, fl_idx n)
{
    for (fl_idx j = 0; j < n; j++) p[j * s] = buf[j];
}


/* ------------------------------------------------------------------------------ few classes
 * The column-layout kernels below work on blocks of SB rows chosen by the caller (a multiple of
 * 8; measured best: a few KB of logits per block -- the scratch then stays in L1 and the row
 * streams are read and written in short, regular bursts), and sum at most FL_CB_SUMC
 * exponentials per row in T lanes before adding them in float64. */
#define FL_CB_SUMC 32

/* Block transposes between row layout and column layout: dst[k*ds + r] = src[r*ss + k] for
 * r < R, k < K.  A scalar transpose moves one element per load and per store (~1 cycle each);
 * with AVX a W x W tile (8 floats / 4 doubles) takes W vector loads, W vector stores and a few
 * shuffles per tile.  Tiles cover both dimensions in steps of W, the last tile of each
 * overlapping the previous one (it rewrites a few elements with the same values), so any
 * R, K >= W needs no scalar remainder; smaller blocks take the scalar loop.  src and dst must
 * not overlap. */
#if defined(__AVX__)
#include <immintrin.h>
FL_INLINE void fl_tile(const float *src, fl_idx ss, float *dst, fl_idx ds)
{
    const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss);
    const __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
    const __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
    const __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
FL_INLINE void fl_tile(const double *src, fl_idx ss, double *dst, fl_idx ds)
{
    const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + ss);
    const __m256d r2 = _mm256_loadu_pd(src + 2 * ss), r3 = _mm256_loadu_pd(src + 3 * ss);
    const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
}
template <typename T>
static inline void fl_transpose(const T *src, fl_idx ss, fl_idx R, fl_idx K, T *dst,
                                    fl_idx ds)
{
    const fl_idx W = fl_t<T>::tile;
    fl_idx r0, k0, r, k;
    if (R < W || K < W) {
        for (r = 0; r < R; r++)
            for (k = 0; k < K; k++) dst[k * ds + r] = src[r * ss + k];
        return;
    }
    for (r0 = 0; r0 < R; r0 += W) {
        if (r0 > R - W) r0 = R - W;    /* the last tile overlaps the previous one */
        const T *s0 = src + r0 * ss;
        T *d0 = dst + r0;
        for (k0 = 0; k0 + W <= K; k0 += W) fl_tile(s0 + k0, ss, d0 + k0 * ds, ds);
        if (k0 < K) fl_tile(s0 + K - W, ss, d0 + (K - W) * ds, ds);
    }
}
#else
template <typename T>
static inline void fl_transpose(const T *src, fl_idx ss, fl_idx R, fl_idx K, T *dst,
                                    fl_idx ds)
{
    for (fl_idx r = 0; r < R; r++)
        for (fl_idx k = 0; k < K; k++) dst[k * ds + r] = src[r * ss + k];
}
#endif

/* bytes of scratch fl_ce_cols_* and fl_norm_cols_* need for c classes of itemsize isz in blocks
 * of sb rows; capgrad: fl_ce_cols with a soft cap and a gradient (the cap's derivative block) */
static inline size_t fl_cols_scratch(fl_idx c, fl_idx sb, size_t isz, int capgrad)
{
    /* c columns (2 c with capgrad), 3 float64 row arrays and 12 T row arrays (fl_ce_cols;
     * fl_norm_cols uses less) */
    size_t b = ((size_t)c * (capgrad ? 2 : 1) + 12) * (size_t)sb * isz + 3 * (size_t)sb * sizeof(double);
    return (b + 63) / 64 * 64;
}

/* Cross-entropy of a block of nr <= SB rows with few classes, in column layout.
 *
 * Why: with C ~ 10 classes the per-row loops of fl_max / fl_sumexp are 10 iterations long:
 * they never fill a vector and their select-max and add chains are latency bound, so per-row
 * overhead dominates (the row kernel runs ~5x slower at C = 10).  Here the block is first laid
 * out by columns, X[j*xs + r] (for each class j, the nr rows of the block consecutively), and
 * every step is a loop over the rows r of one column -- contiguous, independent lanes,
 * vectorized -- while j only picks the column:
 *   m_r = max_j x_rj (NaN skipped, as fl_max),  sh_r = m_r if finite else 0,
 *   lin_r = sum_j w_j (x_rj - sh_r) (label smoothing only, float64; a term with
 *           x_rj - sh_r == 0 is 0, even for w_j = inf: SEMANTICS K2),
 *   e_rj = exp(x_rj - sh_r) (fl_expn),  s_r = sum_j e_rj,  L_r = log s_r,  lse_r = sh_r + L_r,
 *   loss_r = (1-eps) w_t (L_r - (x_rt - sh_r)) + eps/C (wsum L_r - lin_r) + z lse_r^2,
 *   g_rj = e_rj gs_r a_r / s_r - gs_r eps/C w_j,  g_rt -= gs_r (1-eps) w_t,
 *   a_r = (1-eps) w_t + eps/C wsum + 2 z lse_r  (eps/C wsum left out when eps == 0: K1),
 * the formulas of the row kernel (_ce_row in _kernels_cy.pyx): -log p_t is formed as
 * L - (x_t - sh), exact for huge logits.  The target's logit, weight and gradient column are
 * picked by per-column selects (no gathers).  Rows that need care are patched by a scalar
 * pass at the end: ignored rows (loss 0, gradient exactly 0 even with inf/NaN logits), rows
 * whose target is outside [0, C) (NaN, for a direct caller that skipped validation), and rows
 * whose max is not finite or that hold a NaN: their gradient is recomputed from the original
 * logits as exp(x - lse) gs a, what the reference's p = exp(x - sh) / s gives there.
 *
 * Soft cap (cap != 0): right after the layout step the block's logits are replaced by
 * x' = cap tanh(x / cap) in the scratch (in place of the transposed block, or copied there from
 * Fortran-order columns read in place), together with the cap's derivative in a second block D
 * (gradient only), and everything above runs on x'; the gradient is multiplied by D before it
 * is written out (ignored rows excepted: exact zeros even where D is NaN).  The patch pass caps
 * the original logits it reads again.  lse != NULL: lse[r*lss] = the row's log-sum-exp of x'
 * (every row, ignored ones included).
 *
 * Layout: x[r*xrs + j*xcs].  When the rows are adjacent in memory (xrs == 1: Fortran order,
 * e.g. the transpose of a C-contiguous (C, N) array) the columns are read in place; otherwise
 * they are transposed into the scratch (fl_transpose).  The gradient is built in the scratch
 * and written to g[r*grs + j*gcs] at the end: g may be x (in place), as every read of the
 * block's logits -- the patch pass included -- happens before the first write.
 * gsa == NULL: no gradient (g unused).  loss[r*ls]: the float64 row losses.
 * scratch: fl_cols_scratch(c, SB, sizeof(T)) bytes, 64-byte aligned; SB a multiple of 8. */
template <typename T>
static inline void fl_ce_cols(fl_idx nr, fl_idx c, const T *x, fl_idx xrs, fl_idx xcs,
                                  const int64_t *tg, fl_idx ts, const T *w, double wsum,
                                  int64_t ign, double eps, double z, T cap, double *loss,
                                  fl_idx ls, double *lse, fl_idx lss, const double *gsa,
                                  fl_idx gss, T *g, fl_idx grs, fl_idx gcs, fl_idx SB,
                                  void *scratch)
{
    /* Vector loops run over n8 >= nr rows, a multiple of 8: with aligned row arrays they need
     * no peeling or remainder code (a block's loops are short).  Padding rows hold zeros and
     * count as ignored; nothing of them is written out. */
    const fl_idx n8 = (nr + 7) & ~(fl_idx)7;
    T *E = (T *)FL_ALIGNED(scratch);   /* c columns of SB: x (copied), then exp, then grad */
    double *s = (double *)FL_ALIGNED(E + c * SB); /* row sums of exp (FL_CB_SUMC < C) */
    double *lin = (double *)FL_ALIGNED(s + SB); /* sum_j w_j (x_j - sh), then the row loss */
    double *gsd = (double *)FL_ALIGNED(lin + SB); /* gradient scale */
    T *m = (T *)FL_ALIGNED(gsd + SB);  /* row max, then the shift */
    T *st = (T *)FL_ALIGNED(m + SB);   /* sum of exp */
    T *Lt = (T *)FL_ALIGNED(st + SB);  /* log s */
    T *nl = (T *)FL_ALIGNED(Lt + SB);  /* -log p_t */
    T *xt = (T *)FL_ALIGNED(nl + SB);  /* target logit */
    T *wt = (T *)FL_ALIGNED(xt + SB);  /* target weight */
    T *tj = (T *)FL_ALIGNED(wt + SB);  /* target class as T (-1: none) */
    T *kind = (T *)FL_ALIGNED(tj + SB); /* 0 normal, 1 ignored (or padding), 2 bad target */
    T *sp = (T *)FL_ALIGNED(kind + SB); /* partial sums of exp; then 1 for rows to patch */
    T *cg = (T *)FL_ALIGNED(sp + SB);  /* gs a / s */
    T *bb = (T *)FL_ALIGNED(cg + SB);  /* gs eps / C */
    T *gt = (T *)FL_ALIGNED(bb + SB);  /* gs (1-eps) w_t */
    T *D = (T *)FL_ALIGNED(gt + SB);   /* soft cap with a gradient: c columns of d x'/d x */
    const T *X = E;
    fl_idx xs = SB;
    const int grad = gsa != NULL;
    const double ec = eps / (double)c;
    const T k2 = cap != (T)0 ? (T)-2 / cap : (T)0;
    T lo = fl_t<T>::expn_lo, clo = fl_t<T>::cap_lo;
    fl_idx r, j;

    FL_OPAQUE(lo);
    FL_OPAQUE(clo);
    if (xrs == 1 && nr == n8) {        /* columns already contiguous: read in place */
        X = x;
        xs = xcs;
    } else if (xrs == 1) {             /* the same, last block: copied (padding) */
        for (j = 0; j < c; j++)
            for (r = 0; r < nr; r++) E[j * SB + r] = x[j * xcs + r];
    } else if (xcs == 1) {             /* C order: transpose */
        fl_transpose<T>(x, xrs, nr, c, E, SB);
    } else {
        for (r = 0; r < nr; r++)
            for (j = 0; j < c; j++) E[j * SB + r] = x[r * xrs + j * xcs];
    }
    if (nr < n8)
        for (j = 0; j < c; j++)
            for (r = nr; r < n8; r++) E[j * SB + r] = 0;
    if (cap != (T)0) {                 /* x' = cap tanh(x / cap) into the scratch (padding: 0) */
        for (j = 0; j < c; j++) {
            const T *Xj = X + j * xs;
            T *Ej = E + j * SB, *Dj = D + j * SB; /* Ej may be Xj: read before written */
            if (grad) {
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    T dj;
                    Ej[r] = fl_t<T>::softcap(Xj[r], k2, cap, clo, dj);
                    Dj[r] = dj;
                }
            } else {
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    T dj;
                    Ej[r] = fl_t<T>::softcap(Xj[r], k2, cap, clo, dj);
                }
            }
        }
        X = E;
        xs = SB;
    }
    FL_SIMD
    for (r = 0; r < nr; r++) {
        const int64_t t = tg[r * ts];
        const int ok = t >= 0 && t < c;
        tj[r] = ok ? (T)(int32_t)t : (T)-1;
        kind[r] = t == ign ? (T)1 : (ok ? (T)0 : (T)2);
    }
    if (grad) {
        FL_SIMD
        for (r = 0; r < nr; r++) gsd[r] = gsa[r * gss];
    }
    for (r = nr; r < n8; r++) {
        tj[r] = -1;
        kind[r] = 1;
        gsd[r] = 0.0;
    }
    /* The max, and the target's logit picked by a select per column (no gathers): columns
     * four at a time, the row arrays are loaded and stored once per four columns.  Every read
     * of X happens before the exponentials overwrite it (it may be the scratch). */
    FL_SIMD
    for (r = 0; r < n8; r++) {
        m[r] = -fl_t<T>::inf;
        xt[r] = 0;
        wt[r] = 1;
    }
    for (j = 0; j + 4 <= c; j += 4) {
        const T *X0 = X + j * xs, *X1 = X0 + xs, *X2 = X1 + xs, *X3 = X2 + xs;
        const T j0 = (T)j, j1 = (T)(j + 1), j2 = (T)(j + 2), j3 = (T)(j + 3);
        FL_SIMD
        for (r = 0; r < n8; r++) {
            const T v0 = X0[r], v1 = X1[r], v2 = X2[r], v3 = X3[r], tr = tj[r];
            T mm = m[r], tt = xt[r];
            mm = v0 > mm ? v0 : mm;
            mm = v1 > mm ? v1 : mm;
            mm = v2 > mm ? v2 : mm;
            mm = v3 > mm ? v3 : mm;
            tt = tr == j0 ? v0 : tt;
            tt = tr == j1 ? v1 : tt;
            tt = tr == j2 ? v2 : tt;
            tt = tr == j3 ? v3 : tt;
            m[r] = mm;
            xt[r] = tt;
        }
    }
    for (; j < c; j++) {
        const T *Xj = X + j * xs;
        const T jf = (T)j;
        FL_SIMD
        for (r = 0; r < n8; r++) {
            const T v = Xj[r];
            m[r] = v > m[r] ? v : m[r];
            xt[r] = tj[r] == jf ? v : xt[r];
        }
    }
    if (w)
        for (j = 0; j < c; j++) {
            const T wj = w[j], jf = (T)j;
            FL_SIMD
            for (r = 0; r < n8; r++) wt[r] = tj[r] == jf ? wj : wt[r];
        }
    FL_SIMD /* the shift: the max if finite, else 0 (+inf, or only -inf / NaN) */
    for (r = 0; r < n8; r++) m[r] = m[r] > -fl_t<T>::inf && m[r] < fl_t<T>::inf ? m[r] : (T)0;
    if (eps != 0.0) {
        FL_SIMD
        for (r = 0; r < n8; r++) lin[r] = 0.0;
        for (j = 0; j < c; j++) {
            const T *Xj = X + j * xs;
            const double wj = w ? (double)w[j] : 1.0;
            FL_SIMD
            for (r = 0; r < n8; r++) {
                const T d = Xj[r] - m[r];  /* w_j d taken as 0 where d == 0 (K2) */
                lin[r] += d == (T)0 ? 0.0 : wj * (double)d;
            }
        }
    }
    /* s = sum exp(x - sh): T lanes over at most FL_CB_SUMC columns (a float32 sum of <= 32
     * terms in [0, 1], as the row kernel sums up to FL_BLOCK in float32 lanes); more columns
     * add such partial sums in float64 */
    {
        T *acc = c <= FL_CB_SUMC ? st : sp;
        if (acc == sp) {
            FL_SIMD
            for (r = 0; r < n8; r++) s[r] = 0.0;
        }
        for (fl_idx j0 = 0; j0 < c; j0 += FL_CB_SUMC) {
            const fl_idx j1 = j0 + FL_CB_SUMC < c ? j0 + FL_CB_SUMC : c;
            FL_SIMD
            for (r = 0; r < n8; r++) acc[r] = 0;
            j = j0;
            if (grad)                  /* two columns at a time (register pressure of EXPN) */
                for (; j + 2 <= j1; j += 2) {
                    const T *Xa = X + j * xs, *Xb = Xa + xs;
                    T *Ea = E + j * SB, *Eb = Ea + SB; /* may be Xa, Xb: read before written */
                    FL_SIMD
                    for (r = 0; r < n8; r++) {
                        const T mr = m[r], ea = fl_t<T>::expn(Xa[r] - mr, lo), eb = fl_t<T>::expn(Xb[r] - mr, lo);
                        Ea[r] = ea;
                        Eb[r] = eb;
                        acc[r] = (acc[r] + ea) + eb;
                    }
                }
            for (; j < j1; j++) {
                const T *Xj = X + j * xs;
                T *Ej = E + j * SB;
                if (grad) {
                    FL_SIMD
                    for (r = 0; r < n8; r++) {
                        const T e = fl_t<T>::expn(Xj[r] - m[r], lo);
                        Ej[r] = e;
                        acc[r] += e;
                    }
                } else {
                    FL_SIMD
                    for (r = 0; r < n8; r++) acc[r] += fl_t<T>::expn(Xj[r] - m[r], lo);
                }
            }
            if (acc == sp) {
                FL_SIMD
                for (r = 0; r < n8; r++) s[r] += (double)sp[r];
            }
        }
        if (acc == sp) {
            FL_SIMD
            for (r = 0; r < n8; r++) st[r] = (T)s[r];
        }
    }
    /* Row terms in T lanes (float32: 8 per vector): L = log s and -log p_t = L - (x_t - sh),
     * each within an ulp or two -- far inside the 2e-6 of the loss.  (x_t - sh is rounded to T
     * as in the reference.)  The label smoothing and z-loss terms are added in float64. */
    FL_SIMD
    for (r = 0; r < n8; r++) {
        const T L = fl_t<T>::log(st[r]);
        Lt[r] = L;
        nl[r] = L - (xt[r] - m[r]);
    }
    {
        /* eps == 0: the smoothing terms are not evaluated at all (K1: a NaN/inf weight of a
         * class no target uses must not leak into a through 0 * wsum) */
        const double a0 = 1.0 - eps, a1 = eps != 0.0 ? ec * wsum : 0.0, zz = 2.0 * z;
        const int plain = eps == 0.0 && z == 0.0;
        double *row = lin;             /* lin is read before row[r] is written */
        T nsp = 0;
        if (plain) {
            FL_SIMD
            for (r = 0; r < n8; r++) {
                /* in double: w * l of a finite float32 loss can pass FLT_MAX while the mean
                 * (divided by the summed weights) fits */
                const double v = (double)wt[r] * (double)nl[r];
                row[r] = kind[r] == 0 ? v : (kind[r] == 1 ? 0.0 : (double)NAN);
            }
        } else {
            FL_SIMD
            for (r = 0; r < n8; r++) {
                const double L = (double)Lt[r], l = L + (double)m[r];
                double v = a0 * (double)wt[r] * (double)nl[r];
                v = eps != 0.0 ? v + ec * (wsum * L - lin[r]) : v;
                v = z != 0.0 ? v + z * l * l : v;
                row[r] = kind[r] == 0 ? v : (kind[r] == 1 ? 0.0 : (double)NAN);
            }
        }
        if (ls == 1) {
            FL_SIMD
            for (r = 0; r < nr; r++) loss[r] = row[r];
        } else {
            for (r = 0; r < nr; r++) loss[r * ls] = row[r];
        }
        if (lse)                       /* every row's, ignored ones included (as the z-loss' lse) */
            for (r = 0; r < nr; r++) lse[r * lss] = (double)Lt[r] + (double)m[r];
        if (!grad) return;
        /* Gradient coefficients.  s lies in [1, C] exactly when the row max is finite and the
         * row holds no NaN (the max contributes exp(0) = 1, every other term is <= 1): other
         * rows, and ignored / bad / padding rows, are flagged (sp = 1) for the patch pass. */
        if (plain) {                   /* a = gs w_t */
            FL_SIMD_SUM(nsp)
            for (r = 0; r < n8; r++) {
                const T a = (T)gsd[r] * wt[r];
                const int bad = kind[r] != 0 || !(st[r] >= (T)1 && st[r] <= (T)c);
                cg[r] = a / st[r];
                gt[r] = a;
                sp[r] = bad ? (T)1 : (T)0;
                nsp += sp[r];
            }
        } else {
            FL_SIMD_SUM(nsp)
            for (r = 0; r < n8; r++) {
                const double gs = gsd[r], l = (double)Lt[r] + (double)m[r];
                const double a = gs * (a0 * (double)wt[r] + a1 + zz * l);
                const int bad = kind[r] != 0 || !(st[r] >= (T)1 && st[r] <= (T)c);
                cg[r] = (T)a / st[r];
                bb[r] = (T)(gs * ec);
                gt[r] = (T)(gs * a0 * (double)wt[r]);
                sp[r] = bad ? (T)1 : (T)0;
                nsp += sp[r];
            }
        }
        /* g = e gs a / s - gs eps/C w_j, minus gs (1-eps) w_t in the target's column */
        if (eps == 0.0) {              /* four columns at a time */
            for (j = 0; j + 4 <= c; j += 4) {
                T *E0 = E + j * SB, *E1 = E0 + SB, *E2 = E1 + SB, *E3 = E2 + SB;
                const T j0 = (T)j, j1 = (T)(j + 1), j2 = (T)(j + 2), j3 = (T)(j + 3);
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    const T cr = cg[r], gr = gt[r], tr = tj[r];
                    E0[r] = E0[r] * cr - (tr == j0 ? gr : (T)0);
                    E1[r] = E1[r] * cr - (tr == j1 ? gr : (T)0);
                    E2[r] = E2[r] * cr - (tr == j2 ? gr : (T)0);
                    E3[r] = E3[r] * cr - (tr == j3 ? gr : (T)0);
                }
            }
            for (; j < c; j++) {
                T *Ej = E + j * SB;
                const T jf = (T)j;
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    const T gr = gt[r];    /* read in any case: no masked load (AVX2) */
                    Ej[r] = Ej[r] * cg[r] - (tj[r] == jf ? gr : (T)0);
                }
            }
        } else {
            for (j = 0; j < c; j++) {
                T *Ej = E + j * SB;
                const T wj = w ? w[j] : (T)1, jf = (T)j;
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    const T gr = gt[r];    /* read in any case: no masked load (AVX2) */
                    Ej[r] = Ej[r] * cg[r] - bb[r] * wj - (tj[r] == jf ? gr : (T)0);
                }
            }
        }
        if (nsp != 0)
            for (r = 0; r < nr; r++) {
                if (sp[r] == 0) continue;
                if (kind[r] == 0) {    /* the reference's p = exp(x - lse), from the logits */
                    const double gs = gsd[r], lse = (double)Lt[r] + (double)m[r];
                    /* a as the row kernel forms it (2 z lse is NaN for z = 0, lse = +-inf) */
                    const T a = (T)(gs * (a0 * (double)wt[r] + a1 + zz * lse)), l = (T)lse;
                    const T b = (T)(gs * ec);
                    for (j = 0; j < c; j++) {
                        const T wj = (eps != 0.0 && w) ? w[j] : (T)1;
                        T xv = x[r * xrs + j * xcs], dj;
                        xv = cap != (T)0 ? fl_t<T>::softcap(xv, k2, cap, clo, dj) : xv;
                        E[j * SB + r] = fl_t<T>::exp(xv - l) * a - b * wj;
                    }
                    E[(fl_idx)tj[r] * SB + r] -= gt[r];
                } else {               /* ignored: exact zeros; bad target: NaN */
                    const T v = kind[r] == 1 ? (T)0 : (T)NAN;
                    for (j = 0; j < c; j++) E[j * SB + r] = v;
                }
            }
        if (cap != (T)0)               /* through the cap: times d x'/d x; an ignored row keeps its
                                        * exact zeros (its D may be NaN) */
            for (j = 0; j < c; j++) {
                T *Ej = E + j * SB;
                const T *Dj = D + j * SB;
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    const T e = Ej[r], dr = Dj[r]; /* both read: no masked load of D */
                    Ej[r] = kind[r] == 0 ? e * dr : e;
                }
            }
    }
    if (grs == 1) {                    /* Fortran order: column copies */
        for (j = 0; j < c; j++) {
            T *gj = g + j * gcs;
            const T *Ej = E + j * SB;
            FL_SIMD
            for (r = 0; r < nr; r++) gj[r] = Ej[r];
        }
    } else if (gcs == 1) {             /* C order: transpose back */
        fl_transpose<T>(E, SB, c, nr, g, grs);
    } else {
        for (r = 0; r < nr; r++)
            for (j = 0; j < c; j++) g[r * grs + j * gcs] = E[j * SB + r];
    }
}


/* Log-sum-exp, softmax or log-softmax (mode FL_NORM_*) of a block of nr <= SB rows in column
 * layout, for the same reason and with the same layout handling as fl_ce_cols: m = max (NaN
 * skipped), sh = m if finite else 0, s = sum exp(x - sh) (fl_expn, T lanes over FL_CB_SUMC
 * columns, then float64), L = log s in float64, and
 *   logsumexp: out[r*ors] = L + sh;  softmax: exp(x - sh) * (1/s);  log-softmax: (x - sh) - L
 * (never x - lse: with large logits lse rounds to sh and the O(1) part would be lost).  Rows
 * whose max is not finite or that hold a NaN (s outside [1, C]) are summed again with fl_exp
 * from the original logits, as the row kernels do; the softmax and log-softmax of a row
 * holding +inf are NaN throughout (SEMANTICS K4, as PyTorch).  out may be x (in place): the output is
 * written at the end.  scratch: fl_cols_scratch(c, SB, sizeof(T)) bytes, 64-byte aligned. */
#define FL_NORM_LSE 0
#define FL_NORM_SOFTMAX 1
#define FL_NORM_LOGSOFTMAX 2
template <typename T>
static inline void fl_norm_cols(fl_idx nr, fl_idx c, const T *x, fl_idx xrs, fl_idx xcs,
                                    int mode, T *out, fl_idx ors, fl_idx ocs, fl_idx SB,
                                    void *scratch)
{
    const fl_idx n8 = (nr + 7) & ~(fl_idx)7;
    T *E = (T *)FL_ALIGNED(scratch);   /* c columns of SB: x (copied), exp, then the output */
    double *s = (double *)FL_ALIGNED(E + c * SB); /* row sums of exp */
    double *L = (double *)FL_ALIGNED(s + SB); /* log s */
    T *m = (T *)FL_ALIGNED(L + SB);    /* row max, then the shift */
    T *sp = (T *)FL_ALIGNED(m + SB);   /* partial sums of exp, then 1 for rows to patch */
    T *f = (T *)FL_ALIGNED(sp + SB);   /* 1/s (softmax) or log s (log-softmax), in T */
    const T *X = E;
    fl_idx xs = SB;
    const int store = mode == FL_NORM_SOFTMAX; /* exp(x - sh) kept for the output */
    T lo = fl_t<T>::expn_lo;
    T nbad = 0;
    fl_idx r, j;

    FL_OPAQUE(lo);
    if (xrs == 1 && nr == n8) {        /* columns already contiguous: read in place */
        X = x;
        xs = xcs;
    } else if (xrs == 1) {
        for (j = 0; j < c; j++)
            for (r = 0; r < nr; r++) E[j * SB + r] = x[j * xcs + r];
    } else if (xcs == 1) {
        fl_transpose<T>(x, xrs, nr, c, E, SB);
    } else {
        for (r = 0; r < nr; r++)
            for (j = 0; j < c; j++) E[j * SB + r] = x[r * xrs + j * xcs];
    }
    if (nr < n8)
        for (j = 0; j < c; j++)
            for (r = nr; r < n8; r++) E[j * SB + r] = 0;
    FL_SIMD
    for (r = 0; r < n8; r++) m[r] = -fl_t<T>::inf;
    for (j = 0; j + 4 <= c; j += 4) {
        const T *X0 = X + j * xs, *X1 = X0 + xs, *X2 = X1 + xs, *X3 = X2 + xs;
        FL_SIMD
        for (r = 0; r < n8; r++) {
            T mm = m[r];
            mm = X0[r] > mm ? X0[r] : mm;
            mm = X1[r] > mm ? X1[r] : mm;
            mm = X2[r] > mm ? X2[r] : mm;
            mm = X3[r] > mm ? X3[r] : mm;
            m[r] = mm;
        }
    }
    for (; j < c; j++) {
        const T *Xj = X + j * xs;
        FL_SIMD
        for (r = 0; r < n8; r++) m[r] = Xj[r] > m[r] ? Xj[r] : m[r];
    }
    FL_SIMD
    for (r = 0; r < n8; r++) m[r] = m[r] > -fl_t<T>::inf && m[r] < fl_t<T>::inf ? m[r] : (T)0;
    FL_SIMD
    for (r = 0; r < n8; r++) s[r] = 0.0;
    for (fl_idx j0 = 0; j0 < c; j0 += FL_CB_SUMC) {
        const fl_idx j1 = j0 + FL_CB_SUMC < c ? j0 + FL_CB_SUMC : c;
        FL_SIMD
        for (r = 0; r < n8; r++) sp[r] = 0;
        for (j = j0; j < j1; j++) {
            const T *Xj = X + j * xs;
            T *Ej = E + j * SB;        /* may be Xj: element r is read before it is written */
            if (store) {
                FL_SIMD
                for (r = 0; r < n8; r++) {
                    const T e = fl_t<T>::expn(Xj[r] - m[r], lo);
                    Ej[r] = e;
                    sp[r] += e;
                }
            } else {
                FL_SIMD
                for (r = 0; r < n8; r++) sp[r] += fl_t<T>::expn(Xj[r] - m[r], lo);
            }
        }
        FL_SIMD
        for (r = 0; r < n8; r++) s[r] += (double)sp[r];
    }
    /* rows whose max is not finite or that hold a NaN (s outside [1, C], see fl_ce_cols): the
     * sum again with fl_exp, from the original logits (x - 0 may be positive there) */
    FL_SIMD_SUM(nbad)
    for (r = 0; r < n8; r++) {
        sp[r] = s[r] >= 1.0 && s[r] <= (double)c ? (T)0 : (T)1;
        nbad += sp[r];
    }
    if (nbad != 0)
        for (r = 0; r < nr; r++) {
            if (sp[r] == 0) continue;
            T acc = 0;
            for (j = 0; j < c; j++) acc += fl_t<T>::exp(x[r * xrs + j * xcs] - m[r]);
            s[r] = (double)acc;
        }
    FL_SIMD
    for (r = 0; r < n8; r++) L[r] = fl_log_d(s[r]);
    if (mode == FL_NORM_LSE) {         /* out[r] = log s + sh */
        for (r = 0; r < nr; r++) out[r * ors] = (T)(L[r] + (double)m[r]);
        return;
    }
    if (store) {                       /* softmax: e / s */
        FL_SIMD
        for (r = 0; r < n8; r++) f[r] = (T)(1.0 / s[r]);
        for (j = 0; j < c; j++) {
            T *Ej = E + j * SB;
            FL_SIMD
            for (r = 0; r < n8; r++) Ej[r] = Ej[r] * f[r];
        }
    } else {                           /* log-softmax: (x - sh) - log s, never x - lse */
        FL_SIMD
        for (r = 0; r < n8; r++) f[r] = (T)L[r];
        for (j = 0; j < c; j++) {
            const T *Xj = X + j * xs;
            T *Ej = E + j * SB;
            FL_SIMD
            for (r = 0; r < n8; r++) Ej[r] = (Xj[r] - m[r]) - f[r];
        }
    }
    if (nbad != 0)                     /* the patched rows */
        for (r = 0; r < nr; r++) {
            if (sp[r] == 0) continue;
            if (!(s[r] < (double)fl_t<T>::inf)) { /* +inf in the row (s = inf), or a NaN: no softmax /
                                          * log-softmax, NaN throughout (SEMANTICS K4) */
                for (j = 0; j < c; j++) E[j * SB + r] = (T)NAN;
                continue;
            }
            if (store)                 /* softmax: fl_exp, as summed */
                for (j = 0; j < c; j++) E[j * SB + r] = fl_t<T>::exp(x[r * xrs + j * xcs] - m[r]) * f[r];
        }
    if (ors == 1) {
        for (j = 0; j < c; j++) {
            T *oj = out + j * ocs;
            const T *Ej = E + j * SB;
            FL_SIMD
            for (r = 0; r < nr; r++) oj[r] = Ej[r];
        }
    } else if (ocs == 1) {
        fl_transpose<T>(E, SB, c, nr, out, ors);
    } else {
        for (r = 0; r < nr; r++)
            for (j = 0; j < c; j++) out[r * ors + j * ocs] = E[j * SB + r];
    }
}


/* ------------------------------------------------------------------------------ OpenMP */
#ifdef _OPENMP
#include <omp.h>
static inline int fl_openmp_enabled(void) { return 1; }
static inline int fl_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int fl_openmp_enabled(void) { return 0; }
static inline int fl_max_threads(void) { return 1; }
#endif

/* how the extension was compiled (setup.py defines it), for `fastloss info` */
#ifndef FL_BUILD_INFO
#define FL_BUILD_INFO "unknown"
#endif
static inline const char *fl_build_info(void) { return FL_BUILD_INFO; }

#endif /* FL_MATH_HPP */
