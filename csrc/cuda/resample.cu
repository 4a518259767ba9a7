// CT volume resampling on the GPU (orders 0, 1 and 3), fused with an optional HU window and a
// batched crop of fixed-size boxes. Compiled at run time by CuPy (RawModule/NVRTC, cached on
// disk) from lungcore/ops/resample.py; the test suite compiles it with nvcc, and also compiles
// lc_sample (the whole per-voxel computation) for the host to check its numbers on a CPU.
//
// Grid (DESIGN.md "Spatial conventions"), per axis with scale s = new / old spacing:
// output index j samples input continuous index i = s * j + o, o = 0.5 * s - 0.5, evaluated in
// float64 with explicit round-to-nearest (no FMA contraction) so the sample positions, and
// therefore order-0 picks, match the C++ core and scipy.ndimage.affine_transform bit for bit.
// j inside the full output grid [0, m): i is clamped to the voxel-centre hull [0, n - 1] for
// orders 0/1 (scipy's mode="nearest"; the grid covers the input's physical extent so only the
// outer half voxel is clamped); order 3 samples a coefficient volume that the caller padded by 12
// edge voxels and prefiltered (lungcore_spline_prefilter3 below), taps clamped to its bounds;
// j outside [0, m) (a box hanging over the edge) -> fill. A whole resample is one box.
//
// Launch: block (bx, 1, 1) threads along x, grid (ceil(W / bx), H, min(boxes * D, 65535)) with
// a grid-stride loop over box-depth rows; no 64-bit division in the hot path. Memory traffic:
// one coalesced write per output voxel; K^3 reads per voxel (K = 1, 2, 4 taps), served mostly from
// L1/L2 since neighbouring threads share input voxels. Accumulation in float32 (float64 when the
// data or the output is float64, or the input is int32); integer outputs round to nearest and
// saturate. A non-finite result sets *bad (the caller raises).
// Limits: int8/uint8/int16/uint16/int32/float32/float64 input with any element strides,
// C-contiguous (N, D, H, W) output of float32/float64 or the input type; H <= 65535.
// Backward (lungcore_resample_boxes_backward, float32/float64): the forward's transpose, same
// launch shape, each box voxel's gradient atomicAdd-ed onto its K^3 taps of a zeroed C-contiguous
// gradient volume (reads the box gradient once, the sampled volume again only with a window;
// float atomics: reruns agree to rounding, not bit for bit); order 3 then runs
// lungcore_spline_prefilter3_adjoint along the axes in reverse. lc_sample_backward and
// lc_prefilter_line_adjoint are host+device: the tests run them on the CPU against the C++ core.

#if defined(__CUDACC_RTC__) || defined(__CUDA_ARCH__)
#define LC_DMUL(a, b) __dmul_rn(a, b)
#define LC_DADD(a, b) __dadd_rn(a, b)
#else  // host build of lc_sample (tests): plain IEEE double, no contraction on x86-64 without FMA flags
#include <cmath>
using std::floor;
using std::isfinite;
using std::rint;
#define LC_DMUL(a, b) ((a) * (b))
#define LC_DADD(a, b) ((a) + (b))
#endif

#define LC_HD __host__ __device__ __forceinline__

template <typename T> struct lc_limits;
template <> struct lc_limits<signed char> { static LC_HD double lo() { return -128.0; } static LC_HD double hi() { return 127.0; } };
template <> struct lc_limits<unsigned char> { static LC_HD double lo() { return 0.0; } static LC_HD double hi() { return 255.0; } };
template <> struct lc_limits<short> { static LC_HD double lo() { return -32768.0; } static LC_HD double hi() { return 32767.0; } };
template <> struct lc_limits<unsigned short> { static LC_HD double lo() { return 0.0; } static LC_HD double hi() { return 65535.0; } };
template <> struct lc_limits<int> { static LC_HD double lo() { return -2147483648.0; } static LC_HD double hi() { return 2147483647.0; } };

// float32 arithmetic unless the data or the output is float64, or the input is int32
template <typename A, typename B> struct lc_acc { typedef float type; };
template <typename B> struct lc_acc<double, B> { typedef double type; };
template <typename B> struct lc_acc<int, B> { typedef double type; };
template <typename A> struct lc_acc<A, double> { typedef double type; };
template <> struct lc_acc<double, double> { typedef double type; };
template <> struct lc_acc<int, double> { typedef double type; };

template <typename Out, typename Acc> struct lc_store {
    static LC_HD Out apply(Acc v) {
        if (!(v == v)) return Out(0);
        const double r = rint((double)v);
        if (r <= lc_limits<Out>::lo()) return (Out)lc_limits<Out>::lo();
        if (r >= lc_limits<Out>::hi()) return (Out)lc_limits<Out>::hi();
        return (Out)r;
    }
};
template <typename Acc> struct lc_store<float, Acc> {
    static LC_HD float apply(Acc v) { return (float)v; }
};
template <typename Acc> struct lc_store<double, Acc> {
    static LC_HD double apply(Acc v) { return (double)v; }
};

// One axis: K tap offsets (already multiplied by the stride) and weights.
template <int K, typename Acc>
LC_HD void lc_axis(long long j, long long n, long long stride, double s, double o, long long* idx, Acc* w) {
    const double x = LC_DADD(LC_DMUL(s, (double)j), o);
    if (K == 1) {
        long long i = (long long)floor(x + 0.5);
        i = i < 0 ? 0 : (i > n - 1 ? n - 1 : i);
        idx[0] = i * stride;
        w[0] = Acc(1);
    } else if (K == 2) {
        const double f = floor(x);
        long long i = (long long)f;
        double u = x - f;
        if (i < 0) { i = 0; u = 0.0; }
        if (i >= n - 1) { i = n - 1; u = 0.0; }
        const long long i1 = i + 1 < n ? i + 1 : n - 1;
        idx[0] = i * stride;
        idx[K - 1] = i1 * stride;
        w[0] = (Acc)(1.0 - u);
        w[K - 1] = (Acc)u;
    } else {
        const double f = floor(x);
        const double u = x - f, u2 = u * u, u3 = u2 * u;
        const long long a = (long long)f;
        const double ws[4] = {(1.0 - u) * (1.0 - u) * (1.0 - u) / 6.0, (4.0 - 6.0 * u2 + 3.0 * u3) / 6.0,
                              (1.0 + 3.0 * u + 3.0 * u2 - 3.0 * u3) / 6.0, u3 / 6.0};
#pragma unroll
        for (int q = 0; q < K; ++q) {
            long long i = a - 1 + q;
            i = i < 0 ? 0 : (i > n - 1 ? n - 1 : i);
            idx[q] = i * stride;
            w[q] = (Acc)ws[q];
        }
    }
}

template <int K, typename In, typename Acc>
LC_HD Acc lc_interp(const In* __restrict__ src, long long jz, long long jy, long long jx,
                    long long n0, long long n1, long long n2, long long st0, long long st1, long long st2,
                    double s0, double s1, double s2, double o0, double o1, double o2) {
    long long iz[K], iy[K], ix[K];
    Acc wz[K], wy[K], wx[K];
    lc_axis<K, Acc>(jz, n0, st0, s0, o0, iz, wz);
    lc_axis<K, Acc>(jy, n1, st1, s1, o1, iy, wy);
    lc_axis<K, Acc>(jx, n2, st2, s2, o2, ix, wx);
    Acc v = Acc(0);
#pragma unroll
    for (int a = 0; a < K; ++a) {
        Acc vy = Acc(0);
#pragma unroll
        for (int b = 0; b < K; ++b) {
            Acc vx = Acc(0);
#pragma unroll
            for (int c = 0; c < K; ++c) vx += wx[c] * (Acc)src[iz[a] + iy[b] + ix[c]];
            vy += wy[b] * vx;
        }
        v += wz[a] * vy;
    }
    return v;
}


// The value of box voxel (b, kz, ky, kx): interpolation, fill, window. Host and device.
template <typename In, typename Out>
LC_HD typename lc_acc<In, Out>::type lc_sample(
    const In* __restrict__ src, const long long* __restrict__ starts, long long b, long long kz, long long ky,
    long long kx, long long n0, long long n1, long long n2, long long st0, long long st1, long long st2,
    long long m0, long long m1, long long m2, double s0, double s1, double s2, double o0, double o1, double o2,
    int order, double fill, int window, double lo, double hi) {
    typedef typename lc_acc<In, Out>::type Acc;
    const long long jz = starts[3 * b + 0] + kz;
    const long long jy = starts[3 * b + 1] + ky;
    const long long jx = starts[3 * b + 2] + kx;
    Acc v;
    if (jz < 0 || jz >= m0 || jy < 0 || jy >= m1 || jx < 0 || jx >= m2) {
        v = (Acc)fill;
    } else if (order == 0) {
        v = lc_interp<1, In, Acc>(src, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2);
    } else if (order == 1) {
        v = lc_interp<2, In, Acc>(src, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2);
    } else {
        v = lc_interp<4, In, Acc>(src, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2);
    }
    if (window) {
        const Acc wlo = (Acc)lo, whi = (Acc)hi;
        v = v < wlo ? wlo : (v > whi ? whi : v);
        v = (v - wlo) * (Acc)(1.0 / (hi - lo));
    }
    return v;
}

// Transpose of lc_interp: add g * weight to each of the K^3 taps through `add(pointer, value)`
// (atomicAdd on the device; a plain += in the host build the tests compile).
template <int K, typename T, typename Add>
LC_HD void lc_scatter(T* __restrict__ dst, T g, long long jz, long long jy, long long jx,
                      long long n0, long long n1, long long n2, long long st0, long long st1, long long st2,
                      double s0, double s1, double s2, double o0, double o1, double o2, Add add) {
    long long iz[K], iy[K], ix[K];
    T wz[K], wy[K], wx[K];
    lc_axis<K, T>(jz, n0, st0, s0, o0, iz, wz);
    lc_axis<K, T>(jy, n1, st1, s1, o1, iy, wy);
    lc_axis<K, T>(jx, n2, st2, s2, o2, ix, wx);
#pragma unroll
    for (int a = 0; a < K; ++a)
#pragma unroll
        for (int b = 0; b < K; ++b) {
            const T gab = g * wz[a] * wy[b];
#pragma unroll
            for (int c = 0; c < K; ++c)
                if (wx[c] != T(0) && gab != T(0)) add(dst + iz[a] + iy[b] + ix[c], gab * wx[c]);
        }
}

// Gradient of box voxel (b, kz, ky, kx) with respect to the sampled volume, scattered onto its
// taps: zero for fill voxels and where the window clamps (torch.clamp's subgradient), the
// window's slope elsewhere. `src` (the sampled volume) is read only when `window` is set.
template <typename T, typename Add>
LC_HD void lc_sample_backward(
    const T* __restrict__ src, T* __restrict__ dst, const long long* __restrict__ starts, T g, long long b,
    long long kz, long long ky, long long kx, long long n0, long long n1, long long n2, long long st0,
    long long st1, long long st2, long long m0, long long m1, long long m2, double s0, double s1, double s2,
    double o0, double o1, double o2, int order, int window, double lo, double hi, Add add) {
    const long long jz = starts[3 * b + 0] + kz;
    const long long jy = starts[3 * b + 1] + ky;
    const long long jx = starts[3 * b + 2] + kx;
    if (jz < 0 || jz >= m0 || jy < 0 || jy >= m1 || jx < 0 || jx >= m2) return;  // fill: no gradient
    if (window) {
        const T v = lc_sample<T, T>(src, starts, b, kz, ky, kx, n0, n1, n2, st0, st1, st2, m0, m1, m2,
                                    s0, s1, s2, o0, o1, o2, order, 0.0, 0, lo, hi);
        if (!(v >= (T)lo && v <= (T)hi)) return;
        g = g * (T)(1.0 / (hi - lo));
    }
    if (order == 0) lc_scatter<1, T>(dst, g, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2, add);
    else if (order == 1) lc_scatter<2, T>(dst, g, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2, add);
    else lc_scatter<4, T>(dst, g, jz, jy, jx, n0, n1, n2, st0, st1, st2, s0, s1, s2, o0, o1, o2, add);
}

// One line of the adjoint (transpose) of lc_prefilter_line, in place: the backward of order 3.
template <typename T>
LC_HD void lc_prefilter_line_adjoint(T* base, long long n, long long step) {
    if (n < 2) return;
    const T z = (T)(-0.26794919243112270);
    const T gain = (T)6;
    const T anti = z / (z * z - (T)1);
    const long long horizon = n < 30 ? n : 30;
    T acc = base[0];
    for (long long k = 0; k < n - 1; ++k) {
        const T next = base[(k + 1) * step] + z * acc;
        base[k * step] = -z * acc;
        acc = next;
    }
    base[(n - 1) * step] = anti * acc;
    base[(n - 2) * step] += anti * z * acc;
    for (long long k = n - 1; k >= 1; --k) {
        const T t = base[k * step];
        base[k * step] = gain * t;
        base[(k - 1) * step] += z * t;
    }
    const T y0 = base[0];
    base[0] = (T)0;
    T zk = 1;
    for (long long k = 0; k < horizon; ++k) { base[k * step] += gain * zk * y0; zk *= z; }
}

// One line of the cubic B-spline prefilter (see lungcore_spline_prefilter3), elements `step` apart.
template <typename T>
LC_HD void lc_prefilter_line(T* base, long long n, long long step) {
    if (n < 2) return;
    const T z = (T)(-0.26794919243112270);  // sqrt(3) - 2
    const T gain = (T)6;
    const T anti = z / (z * z - (T)1);
    const long long horizon = n < 30 ? n : 30;
    T sum = 0, zk = 1;
    for (long long k = 0; k < horizon; ++k) { sum += zk * base[k * step]; zk *= z; }
    T prev = gain * sum;
    base[0] = prev;
    for (long long k = 1; k < n; ++k) {
        prev = gain * base[k * step] + z * prev;
        base[k * step] = prev;
    }
    T next = anti * (base[(n - 1) * step] + z * base[(n - 2) * step]);
    base[(n - 1) * step] = next;
    for (long long k = n - 2; k >= 0; --k) {
        next = z * (next - base[k * step]);
        base[k * step] = next;
    }
}

#ifndef LC_HOST_ONLY
template <typename In, typename Out>
__global__ void lungcore_resample_boxes(
    const In* __restrict__ src, Out* __restrict__ dst, const long long* __restrict__ starts,
    long long nbox, long long D, long long H, long long W,
    long long n0, long long n1, long long n2,
    long long st0, long long st1, long long st2,
    long long m0, long long m1, long long m2,
    double s0, double s1, double s2, double o0, double o1, double o2,
    int order, double fill, int window, double lo, double hi, int* __restrict__ bad) {
    const long long kx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long ky = blockIdx.y;
    if (kx >= W) return;
    for (long long bz = blockIdx.z; bz < nbox * D; bz += gridDim.z) {
        const long long b = bz / D;
        const long long kz = bz - b * D;
        const typename lc_acc<In, Out>::type v = lc_sample<In, Out>(
            src, starts, b, kz, ky, kx, n0, n1, n2, st0, st1, st2, m0, m1, m2, s0, s1, s2, o0, o1, o2,
            order, fill, window, lo, hi);
        if (!isfinite((double)v)) atomicOr(bad, 1);
        dst[(bz * H + ky) * W + kx] = lc_store<Out, typename lc_acc<In, Out>::type>::apply(v);
    }
}

// Cubic B-spline prefilter along one axis of a C-contiguous array viewed as (outer, n, inner), in
// place: one thread per line (adjacent threads take adjacent `inner` positions, so every step of
// the recursion is a coalesced access except along the last axis); gain 6, causal then
// anti-causal recursion with pole z = sqrt(3) - 2, mirror ends, causal start truncated at
// |z|^k < 1e-17 -- the same arithmetic as csrc/cpu/resample.cpp.
template <typename T>
__global__ void lungcore_spline_prefilter3(T* __restrict__ c, long long outer, long long n, long long inner) {
    const long long line = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= outer * inner) return;
    const long long o = line / inner, i = line - o * inner;
    lc_prefilter_line<T>(c + o * n * inner + i, n, inner);
}
struct lc_atomic_add {
    template <typename T> __device__ void operator()(T* p, T v) const { atomicAdd(p, v); }
};

// Backward of lungcore_resample_boxes: same launch shape, one thread per box voxel, its gradient
// scattered with atomicAdd onto a zeroed, C-contiguous gradient volume (float32: order of the
// additions varies between runs, reruns agree to rounding; float64 likewise).
template <typename T>
__global__ void lungcore_resample_boxes_backward(
    const T* __restrict__ grad, const T* __restrict__ src, T* __restrict__ dst,
    const long long* __restrict__ starts, long long nbox, long long D, long long H, long long W,
    long long n0, long long n1, long long n2, long long m0, long long m1, long long m2,
    double s0, double s1, double s2, double o0, double o1, double o2, int order, int window, double lo, double hi) {
    const long long kx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long ky = blockIdx.y;
    if (kx >= W) return;
    for (long long bz = blockIdx.z; bz < nbox * D; bz += gridDim.z) {
        const long long b = bz / D;
        const long long kz = bz - b * D;
        const T g = grad[(bz * H + ky) * W + kx];
        if (g == T(0)) continue;
        lc_sample_backward<T>(src, dst, starts, g, b, kz, ky, kx, n0, n1, n2, n1 * n2, n2, 1, m0, m1, m2,
                              s0, s1, s2, o0, o1, o2, order, window, lo, hi, lc_atomic_add());
    }
}

// Adjoint of lungcore_spline_prefilter3 along one axis, one thread per line.
template <typename T>
__global__ void lungcore_spline_prefilter3_adjoint(T* __restrict__ c, long long outer, long long n, long long inner) {
    const long long line = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= outer * inner) return;
    const long long o = line / inner, i = line - o * inner;
    lc_prefilter_line_adjoint<T>(c + o * n * inner + i, n, inner);
}
#endif
