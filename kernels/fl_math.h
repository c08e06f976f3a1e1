/*
 * fl_math.h -- vectorizable elementary functions and contiguous inner loops of the fastloss
 * Cython backend (kernels/_kernels_cy.pyx).
 *
 * Why a C header: the hot loops are reductions (max, sum of exp) and elementwise maps that
 * must vectorize WITHOUT -ffast-math (whose -ffinite-math-only breaks the +-inf/NaN semantics
 * the library promises).  `#pragma omp simd reduction(...)` (enabled by -fopenmp-simd) lets
 * gcc/clang reassociate exactly the reduction and nothing else, and the polynomial exp/log
 * below are plain arithmetic plus integer bit manipulation, so they vectorize where libm calls
 * never would.  Cython cannot emit those pragmas, so the loops live here and the .pyx drives
 * them row by row under OpenMP `prange`.
 *
 * Every loop here takes CONTIGUOUS pointers; the .pyx gathers strided / broadcast operands into
 * thread-local blocks first.  An output may alias an input at the same index (in-place
 * gradients): each loop reads element j before writing element j and never reads j' != j after
 * writing it, so aliasing at equal indices is safe.
 *
 * AVX2 note (no AVX-512): packed double <-> int64 conversion and 64-bit arithmetic right shifts
 * do not exist on AVX2, and gcc scalarizes a loop that needs them.  The exp/log below therefore
 * get integers from floating values with the "round-to-nearest shifter" trick (t = x + 1.5*2^52
 * puts round(x) in the low mantissa bits) and turn small integers back into doubles with the
 * 2^52 magic constant; only 64-bit add, and, or and left/logical-right shifts are needed.
 * These tricks rely on strict IEEE evaluation: never compile this file with -ffast-math or
 * -fassociative-math (the shifter would be folded away).
 */
#ifndef FL_MATH_H
#define FL_MATH_H

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
 * contraction only makes r more accurate), |r| <= ln2/2, exp(r) by its Taylor polynomial
 * (degree 13 for double: truncation < 2e-18; degree 7 for float: < 6e-9), Horner form.
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
FL_INLINE float fl_exp_f(float x)
{
    x = x > 100.0f ? 100.0f : x;
    x = x < -110.0f ? -110.0f : x;
    const float t = x * 1.44269504f + FL_EXP_SHIFT_F;
    const float k = t - FL_EXP_SHIFT_F;
    float r = x - k * 0.693145751953125f;   /* ln2 split: 12 significant bits ... */
    r = r - k * 1.42860682030941723212e-6f; /* ... and the rest */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
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

/* log1p(u) = log(1+u) * u / ((1+u) - 1): the rounding error of 1+u cancels (Goldberg,
 * "What every computer scientist should know", Thm 4); exact u where 1+u rounds to 1. */
FL_INLINE double fl_log1p_d(double u)
{
    const double y = 1.0 + u;
    const double d = y - 1.0;
    double r = fl_log_d(y) * (u / d);
    r = d == 0.0 ? u : r;
    r = u == HUGE_VAL ? u : r;
    r = u == -1.0 ? -HUGE_VAL : r;
    return r;
}

FL_INLINE float fl_log1p_f(float u)
{
    const float y = 1.0f + u;
    const float d = y - 1.0f;
    float r = fl_log_f(y) * (u / d);
    r = d == 0.0f ? u : r;
    r = u == HUGE_VALF ? u : r;
    r = u == -1.0f ? -HUGE_VALF : r;
    return r;
}

/* ------------------------------------------------------------------------------ loops
 * Instantiated for float (suffix _f) and double (suffix _d).  NaN conventions: comparisons
 * are written so that NaN propagates exactly where NumPy's reference propagates it
 * (np.maximum(a, b) -> `a < b ? b : a` keeps a NaN a). */
#define FL_DEFINE(T, S, EXP, LOG, LOG1P, INF)                                                  \
                                                                                                \
/* max ignoring NaN (a NaN row is caught later through the sum of exp) */                     \
static inline T fl_max_##S(const T *x, fl_idx n)                                                \
{                                                                                               \
    T m = -INF;                                                                                 \
    FL_SIMD_MAX(m)                                                                              \
    for (fl_idx j = 0; j < n; j++) m = x[j] > m ? x[j] : m;                                      \
    return m;                                                                                   \
}                                                                                               \
                                                                                                \
/* sum exp(x - sh); if e != NULL also stores e[j] = exp(x[j] - sh) (e may be x) */             \
static inline double fl_sumexp_##S(const T *x, T *e, fl_idx n, T sh)                            \
{                                                                                               \
    double tot = 0.0;                                                                           \
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {                                               \
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;                                \
        T acc = 0;                                                                              \
        if (e) {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) { const T v = EXP(x[j] - sh); e[j] = v; acc += v; } \
        } else {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) acc += EXP(x[j] - sh);                             \
        }                                                                                       \
        tot += (double)acc;                                                                     \
    }                                                                                           \
    return tot;                                                                                 \
}                                                                                               \
                                                                                                \
/* sum w[j] * (x[j] - sh)  (w == NULL: weights 1), each difference rounded to T as in the     \
 * reference.  With logits near the dtype's max the T lanes can overflow although the float64 \
 * total does not (float32: a few differences of -3e38, or w * (x - sh) itself): a row whose  \
 * sum is not finite is summed again in double (rare; inf/NaN inputs land there too and give  \
 * the same inf/NaN). */                                                                       \
static inline double fl_wsum_shift_##S(const T *x, const T *w, fl_idx n, T sh)                  \
{                                                                                               \
    double tot = 0.0;                                                                           \
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {                                               \
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;                                \
        T acc = 0;                                                                              \
        if (w) {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) acc += w[j] * (x[j] - sh);                         \
        } else {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) acc += x[j] - sh;                                  \
        }                                                                                       \
        tot += (double)acc;                                                                     \
    }                                                                                           \
    if (!isfinite(tot)) { /* outside the hot loop: its code stays as without the fallback */   \
        tot = 0.0;                                                                              \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T d = x[j] - sh;                                                              \
            tot += (w ? (double)w[j] : 1.0) * (double)d;                                        \
        }                                                                                       \
    }                                                                                           \
    return tot;                                                                                 \
}                                                                                               \
                                                                                                \
/* sum a[j] (b == NULL) or sum a[j] * b[j] */                                                  \
static inline double fl_dot_##S(const T *a, const T *b, fl_idx n)                               \
{                                                                                               \
    double tot = 0.0;                                                                           \
    for (fl_idx j0 = 0; j0 < n; j0 += FL_BLOCK) {                                               \
        const fl_idx j1 = j0 + FL_BLOCK < n ? j0 + FL_BLOCK : n;                                \
        T acc = 0;                                                                              \
        if (b) {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) acc += a[j] * b[j];                                \
        } else {                                                                                \
            FL_SIMD_SUM(acc)                                                                    \
            for (fl_idx j = j0; j < j1; j++) acc += a[j];                                       \
        }                                                                                       \
        tot += (double)acc;                                                                     \
    }                                                                                           \
    return tot;                                                                                 \
}                                                                                               \
                                                                                                \
/* out[j] = exp(x[j] - sh) * a - b * (w ? w[j] : 1)   (out may be x) */                         \
static inline void fl_expaxpy_##S(const T *x, T *out, fl_idx n, T sh, T a, const T *w, T b)     \
{                                                                                               \
    if (w) {                                                                                    \
        FL_SIMD                                                                                 \
        for (fl_idx j = 0; j < n; j++) out[j] = EXP(x[j] - sh) * a - b * w[j];                  \
    } else {                                                                                    \
        FL_SIMD                                                                                 \
        for (fl_idx j = 0; j < n; j++) out[j] = EXP(x[j] - sh) * a - b;                         \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* g[j] = g[j] * a - b * (w ? w[j] : 1)  (scales stored exponentials in place) */              \
static inline void fl_scale_axpy_##S(T *g, fl_idx n, T a, const T *w, T b)                      \
{                                                                                               \
    if (w) {                                                                                    \
        FL_SIMD                                                                                 \
        for (fl_idx j = 0; j < n; j++) g[j] = g[j] * a - b * w[j];                              \
    } else {                                                                                    \
        FL_SIMD                                                                                 \
        for (fl_idx j = 0; j < n; j++) g[j] = g[j] * a - b;                                     \
    }                                                                                           \
}                                                                                               \
                                                                                                \
static inline void fl_fill_##S(T *g, fl_idx n, T v)                                             \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) g[j] = v;                                                    \
}                                                                                               \
                                                                                                \
/* log-softmax: out[j] = (x[j] - sh) - L, L = log sum exp(x - sh).  Never x[j] - (sh + L):     \
 * with large logits sh + L rounds to sh (ulp(1e4) = 1e-3 in float32; at 3e38 the whole L is  \
 * lost), whereas x[j] - sh is exact near the max (Sterbenz) and L is O(log C).  The order is  \
 * kept because this file is never compiled with reassociation (see the header). */           \
static inline void fl_sub2_##S(const T *x, T *out, fl_idx n, T sh, T L)                         \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = (x[j] - sh) - L;                                    \
}                                                                                               \
                                                                                                \
/* softmax backward: out = y * (g - d) */                                                      \
static inline void fl_smb_##S(const T *g, const T *y, T *out, fl_idx n, T d)                    \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = y[j] * (g[j] - d);                                  \
}                                                                                               \
                                                                                                \
/* log-softmax backward: out = g - exp(y) * s */                                               \
static inline void fl_lsmb_##S(const T *g, const T *y, T *out, fl_idx n, T s)                   \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = g[j] - EXP(y[j]) * s;                               \
}                                                                                               \
                                                                                                \
/* soft-target cross-entropy, pass over a row after its shift sh and L = log(sum exp(x-sh)):   \
 * yw = ((1-eps) y + eps/C) * w (computed in double), returns sum_j yw (lse - x_j) with        \
 * lse - x_j = L - (x_j - sh) (accurate when |lse| >> lse - x_j) and 0 where yw == 0;            \
 * *ysum = sum_j yw.  w is never NULL (ones when unweighted: no conditional load in the loop) */\
static inline double fl_soft_terms_##S(const T *x, const T *y, const T *w, fl_idx n, T sh,      \
                                        double L, double a1, double a0, double *ysum)           \
{                                                                                               \
    double tot = 0.0, ys = 0.0;                                                                 \
    _Pragma("omp simd reduction(+:tot,ys)") /* reassociate only these two sums */              \
    for (fl_idx j = 0; j < n; j++) {                                                            \
        const double yw = (a1 * (double)y[j] + a0) * (double)w[j];                              \
        const double nl = L - ((double)x[j] - (double)sh);                                      \
        tot += yw == 0.0 ? 0.0 : yw * nl;                                                       \
        ys += yw;                                                                               \
    }                                                                                           \
    *ysum = ys;                                                                                 \
    return tot;                                                                                 \
}                                                                                               \
                                                                                                \
/* soft-target gradient: out = gs * (exp(x - sh) * pa - yw) with pa = a / sum exp(x - sh) */  \
static inline void fl_soft_grad_##S(const T *x, const T *y, const T *w, T *out, fl_idx n, T sh, \
                                     T pa, T a1, T a0, T gs)                                     \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) {                                                            \
        const T yw = (a1 * y[j] + a0) * w[j];                                                   \
        out[j] = gs * (EXP(x[j] - sh) * pa - yw);                                               \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* ---- elementwise: all operands contiguous blocks; w / go are never NULL (ones); l is never \
 * NULL (scratch); g may be NULL (no gradient).  Return the float64 sum of l. */               \
                                                                                                \
/* softplus(-z) = max(-z, 0) + log1p(exp(-|z|)) */                                             \
static inline double fl_bce_logits_##S(fl_idx n, const T *z, const T *y, const T *w,            \
                                        const T *pw, int has_pw, T *l, T *g, const T *go, T gs) \
{                                                                                               \
    T acc = 0;                                                                                  \
    if (g) {                                                                                    \
        FL_SIMD_SUM(acc)                                                                        \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T zj = z[j], yj = y[j], mz = -zj;                                             \
            const T e = EXP(-(zj < 0 ? -zj : zj)); /* exp(-|z|), NaN stays NaN */              \
            const T sp = (mz < 0 ? (T)0 : mz) + LOG1P(e);                                       \
            const T c = has_pw ? (T)1 + (pw[j] - (T)1) * yj : (T)1;                             \
            const T lv = ((T)1 - yj) * zj + c * sp;                                             \
            const T inv = (T)1 / ((T)1 + e);                                                    \
            const T sig = zj >= 0 ? inv : e * inv;      /* sigmoid(z) */                        \
            const T sigm = zj >= 0 ? e * inv : inv;     /* sigmoid(-z) */                       \
            const T gv = has_pw ? ((T)1 - yj) - c * sigm : sig - yj;                            \
            l[j] = lv * w[j];                                                                   \
            g[j] = gv * w[j] * gs * go[j];                                                      \
            acc += l[j];                                                                        \
        }                                                                                       \
    } else {                                                                                    \
        FL_SIMD_SUM(acc)                                                                        \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T zj = z[j], yj = y[j], mz = -zj;                                             \
            const T e = EXP(-(zj < 0 ? -zj : zj));                                              \
            const T sp = (mz < 0 ? (T)0 : mz) + LOG1P(e);                                       \
            const T c = has_pw ? (T)1 + (pw[j] - (T)1) * yj : (T)1;                             \
            l[j] = (((T)1 - yj) * zj + c * sp) * w[j];                                          \
            acc += l[j];                                                                        \
        }                                                                                       \
    }                                                                                           \
    return (double)acc;                                                                         \
}                                                                                               \
                                                                                                \
/* PyTorch: log terms clamped at -100; gradient (p - y) / max(p (1 - p), 1e-12) */             \
static inline double fl_bce_##S(fl_idx n, const T *p, const T *y, const T *w, T *l, T *g,       \
                                 const T *go, T gs)                                             \
{                                                                                               \
    T acc = 0;                                                                                  \
    FL_SIMD_SUM(acc)                                                                            \
    for (fl_idx j = 0; j < n; j++) {                                                            \
        const T pj = p[j], yj = y[j];                                                           \
        T lp = LOG(pj), l1 = LOG1P(-pj);                                                        \
        lp = lp < (T)-100 ? (T)-100 : lp;                                                       \
        l1 = l1 < (T)-100 ? (T)-100 : l1;                                                       \
        l[j] = -(yj * lp + ((T)1 - yj) * l1) * w[j];                                            \
        acc += l[j];                                                                            \
    }                                                                                           \
    if (g) {                                                                                    \
        FL_SIMD                                                                                 \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T pj = p[j];                                                                  \
            T den = pj * ((T)1 - pj);                                                           \
            den = den < (T)1e-12 ? (T)1e-12 : den;                                              \
            g[j] = (pj - y[j]) / den * w[j] * gs * go[j];                                       \
        }                                                                                       \
    }                                                                                           \
    return (double)acc;                                                                         \
}                                                                                               \
                                                                                                \
/* pointwise t (log t - x), 0 where t == 0; log_target: exp(t) (t - x), 0 where t == -inf */  \
static inline double fl_kl_##S(fl_idx n, const T *x, const T *t, int log_target, T *l, T *g,    \
                                const T *go, T gs)                                              \
{                                                                                               \
    T acc = 0;                                                                                  \
    if (log_target) {                                                                           \
        FL_SIMD_SUM(acc)                                                                        \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T tj = t[j], et = EXP(tj);                                                    \
            const int zero = tj == -INF;                                                        \
            l[j] = zero ? (T)0 : et * (tj - x[j]);                                              \
            if (g) g[j] = (zero ? (T)0 : -et) * gs * go[j];                                     \
            acc += l[j];                                                                        \
        }                                                                                       \
    } else {                                                                                    \
        FL_SIMD_SUM(acc)                                                                        \
        for (fl_idx j = 0; j < n; j++) {                                                        \
            const T tj = t[j];                                                                  \
            l[j] = tj == 0 ? (T)0 : tj * (LOG(tj) - x[j]);                                      \
            if (g) g[j] = -tj * gs * go[j];                                                     \
            acc += l[j];                                                                        \
        }                                                                                       \
    }                                                                                           \
    return (double)acc;                                                                         \
}                                                                                               \
                                                                                                \
static inline double fl_mse_##S(fl_idx n, const T *x, const T *t, T *l, T *g, const T *go, T gs) \
{                                                                                               \
    T acc = 0;                                                                                  \
    FL_SIMD_SUM(acc)                                                                            \
    for (fl_idx j = 0; j < n; j++) {                                                            \
        const T d = x[j] - t[j];                                                                \
        l[j] = d * d;                                                                           \
        if (g) g[j] = (T)2 * d * gs * go[j];                                                    \
        acc += l[j];                                                                            \
    }                                                                                           \
    return (double)acc;                                                                         \
}                                                                                               \
                                                                                                \
/* v = max(var, eps) (NaN stays NaN); l = (log v + d^2 / v) / 2 (+ log(2 pi)/2);               \
 * d/dx = d / v, d/dvar = (1/v - d^2/v^2) / 2 at the clamped v (PyTorch's no-grad clamp) */    \
static inline double fl_gnll_##S(fl_idx n, const T *x, const T *t, const T *var, T eps, T cst,  \
                                  T *l, T *g, T *gv, const T *go, T gs)                          \
{                                                                                               \
    T acc = 0;                                                                                  \
    FL_SIMD_SUM(acc)                                                                            \
    for (fl_idx j = 0; j < n; j++) {                                                            \
        const T v = var[j] < eps ? eps : var[j];                                                \
        const T d = x[j] - t[j];                                                                \
        const T s = gs * go[j];                                                                 \
        l[j] = (T)0.5 * (LOG(v) + d * d / v) + cst;                                             \
        if (g) g[j] = s * (d / v);                                                              \
        if (gv) gv[j] = s * ((T)0.5 * ((T)1 / v - d * d / (v * v)));                            \
        acc += l[j];                                                                            \
    }                                                                                           \
    return (double)acc;                                                                         \
}                                                                                               \
                                                                                                \
/* elementwise maps exposed for testing the elementary functions */                          \
static inline void fl_vexp_##S(const T *x, T *out, fl_idx n)                                    \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = EXP(x[j]);                                          \
}                                                                                               \
static inline void fl_vlog_##S(const T *x, T *out, fl_idx n)                                    \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = LOG(x[j]);                                          \
}                                                                                               \
static inline void fl_vlog1p_##S(const T *x, T *out, fl_idx n)                                  \
{                                                                                               \
    FL_SIMD                                                                                     \
    for (fl_idx j = 0; j < n; j++) out[j] = LOG1P(x[j]);                                        \
}                                                                                               \
                                                                                                \
/* panel of P rows -> P contiguous rows of n: buf[r n + j] = p[r rs + j cs].  For Fortran-like \
 * layouts (|rs| < |cs|) one cache line holds the element of several rows: it is read once for \
 * the whole panel.  Columns go in tiles of 8 (8 independent lines in flight, 8 consecutive   \
 * stores per buffer row) with a software prefetch 4 tiles ahead: hardware prefetchers do not  \
 * follow such large strides, and without it the gather is memory-latency bound. */           \
static inline void fl_gather_panel_##S(const T *p, fl_idx rs, fl_idx cs, fl_idx P, fl_idx n,    \
                                        T *buf)                                                 \
{                                                                                               \
    fl_idx j0 = 0;                                                                              \
    for (; j0 + 8 <= n; j0 += 8) {                                                              \
        if (j0 + 40 <= n)                                                                       \
            for (int q = 0; q < 8; q++) {                                                       \
                FL_PREFETCH(p + (j0 + 32 + q) * cs, 0);                                         \
                FL_PREFETCH(p + (j0 + 32 + q) * cs + (P - 1) * rs, 0);                          \
            }                                                                                   \
        for (fl_idx r = 0; r < P; r++)                                                          \
            for (int q = 0; q < 8; q++) buf[r * n + j0 + q] = p[r * rs + (j0 + q) * cs];        \
    }                                                                                           \
    for (fl_idx r = 0; r < P; r++)                                                              \
        for (fl_idx j = j0; j < n; j++) buf[r * n + j] = p[r * rs + j * cs];                    \
}                                                                                               \
static inline void fl_scatter_panel_##S(const T *buf, T *p, fl_idx rs, fl_idx cs, fl_idx P,     \
                                         fl_idx n)                                              \
{                                                                                               \
    fl_idx j0 = 0;                                                                              \
    for (; j0 + 8 <= n; j0 += 8) {                                                              \
        if (j0 + 40 <= n)                                                                       \
            for (int q = 0; q < 8; q++) {                                                       \
                FL_PREFETCH(p + (j0 + 32 + q) * cs, 1);                                         \
                FL_PREFETCH(p + (j0 + 32 + q) * cs + (P - 1) * rs, 1);                          \
            }                                                                                   \
        for (fl_idx r = 0; r < P; r++)                                                          \
            for (int q = 0; q < 8; q++) p[r * rs + (j0 + q) * cs] = buf[r * n + j0 + q];        \
    }                                                                                           \
    for (fl_idx r = 0; r < P; r++)                                                              \
        for (fl_idx j = j0; j < n; j++) p[r * rs + j * cs] = buf[r * n + j];                    \
}                                                                                               \
                                                                                                \
static inline void fl_gather_##S(const T *p, fl_idx s, T *buf, fl_idx n)                        \
{                                                                                               \
    for (fl_idx j = 0; j < n; j++) buf[j] = p[j * s];                                           \
}                                                                                               \
static inline void fl_scatter_##S(const T *buf, T *p, fl_idx s, fl_idx n)                       \
{                                                                                               \
    for (fl_idx j = 0; j < n; j++) p[j * s] = buf[j];                                           \
}

FL_DEFINE(float, f, fl_exp_f, fl_log_f, fl_log1p_f, HUGE_VALF)
FL_DEFINE(double, d, fl_exp_d, fl_log_d, fl_log1p_d, HUGE_VAL)

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

#endif /* FL_MATH_H */
