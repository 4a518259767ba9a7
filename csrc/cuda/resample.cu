// CT volume resampling on the GPU (orders 0 and 1), fused with an optional HU window and a
// batched crop of fixed-size boxes. Compiled at run time by CuPy (RawModule/NVRTC, cached on
// disk) from lungcore/ops/resample.py; the test suite also compiles it with nvcc.
//
// Grid (DESIGN.md "Spatial conventions"), per axis with scale s = new / old spacing:
// output index j samples input continuous index i = s * j + o, o = 0.5 * s - 0.5, evaluated in
// float64 with explicit round-to-nearest (no FMA contraction) so the sample positions, and
// therefore order-0 picks, match the C++ core and scipy.ndimage.affine_transform bit for bit.
// j inside the full output grid [0, m): i is clamped to the voxel-centre hull [0, n - 1]
// (scipy's mode="nearest"; the grid covers the input's physical extent so only the outer half
// voxel is clamped); j outside [0, m) (a box hanging over the edge) -> fill.
// A whole resample is one box with start (0, 0, 0) and size m.
//
// Launch: block (bx, 1, 1) threads along x, grid (ceil(W / bx), H, min(boxes * D, 65535)) with
// a grid-stride loop over box-depth rows; no 64-bit division in the hot path. Memory traffic:
// one coalesced write per output voxel; 2 (order 0: 1) row-contiguous reads per corner pair,
// served mostly from L1/L2 since neighbouring threads share input voxels. Accumulation in
// float32 (float64 when the input or the output is float64); integer outputs round to nearest
// and saturate. A non-finite result sets *bad (the caller raises).
// Limits: int8/uint8/int16/uint16/int32/float32/float64 input with any element strides,
// C-contiguous (N, D, H, W) output of float32/float64 or the input type; H <= 65535.

template <typename T> struct lc_limits;
template <> struct lc_limits<signed char> { static __device__ float lo() { return -128.f; } static __device__ float hi() { return 127.f; } };
template <> struct lc_limits<unsigned char> { static __device__ float lo() { return 0.f; } static __device__ float hi() { return 255.f; } };
template <> struct lc_limits<short> { static __device__ float lo() { return -32768.f; } static __device__ float hi() { return 32767.f; } };
template <> struct lc_limits<unsigned short> { static __device__ float lo() { return 0.f; } static __device__ float hi() { return 65535.f; } };
template <> struct lc_limits<int> { static __device__ double lo() { return -2147483648.0; } static __device__ double hi() { return 2147483647.0; } };

template <typename A, typename B> struct lc_acc { typedef float type; };
template <typename B> struct lc_acc<double, B> { typedef double type; };
template <typename A> struct lc_acc<A, double> { typedef double type; };
template <> struct lc_acc<double, double> { typedef double type; };

template <typename Out, typename Acc> struct lc_store {
    static __device__ __forceinline__ Out apply(Acc v) {
        if (!(v == v)) return Out(0);
        double r = rint((double)v);
        if (r <= (double)lc_limits<Out>::lo()) return (Out)lc_limits<Out>::lo();
        if (r >= (double)lc_limits<Out>::hi()) return (Out)lc_limits<Out>::hi();
        return (Out)r;
    }
};
template <typename Acc> struct lc_store<float, Acc> {
    static __device__ __forceinline__ float apply(Acc v) { return (float)v; }
};
template <typename Acc> struct lc_store<double, Acc> {
    static __device__ __forceinline__ double apply(Acc v) { return (double)v; }
};

// One axis: lower index a, upper index b (pre-multiplied by the stride), weight of b.
template <typename Acc>
__device__ __forceinline__ void lc_axis(long long j, long long n, long long stride, double s, double o,
                                        int order, long long& a, long long& b, Acc& w) {
    const double x = __dadd_rn(__dmul_rn(s, (double)j), o);
    if (order == 0) {
        long long i = (long long)floor(x + 0.5);
        i = i < 0 ? 0 : (i > n - 1 ? n - 1 : i);
        a = i * stride;
        b = a;
        w = Acc(0);
        return;
    }
    const double f = floor(x);
    long long i = (long long)f;
    double frac = x - f;
    if (i < 0) { i = 0; frac = 0.0; }
    if (i >= n - 1) { i = n - 1; frac = 0.0; }
    const long long i1 = i + 1 < n ? i + 1 : n - 1;
    a = i * stride;
    b = i1 * stride;
    w = (Acc)frac;
}

template <typename In, typename Out>
__global__ void lungcore_resample_boxes(
    const In* __restrict__ src, Out* __restrict__ dst, const long long* __restrict__ starts,
    long long nbox, long long D, long long H, long long W,
    long long n0, long long n1, long long n2,
    long long st0, long long st1, long long st2,
    long long m0, long long m1, long long m2,
    double s0, double s1, double s2, double o0, double o1, double o2,
    int order, double fill, int window, double lo, double hi, int* __restrict__ bad) {
    typedef typename lc_acc<In, Out>::type Acc;
    const long long kx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long ky = blockIdx.y;
    if (kx >= W) return;
    const Acc wlo = (Acc)lo, whi = (Acc)hi, winv = (Acc)(window ? 1.0 / (hi - lo) : 1.0);
    for (long long bz = blockIdx.z; bz < nbox * D; bz += gridDim.z) {
        const long long b = bz / D;
        const long long kz = bz - b * D;
        const long long jz = starts[3 * b + 0] + kz;
        const long long jy = starts[3 * b + 1] + ky;
        const long long jx = starts[3 * b + 2] + kx;
        Acc v;
        if (jz < 0 || jz >= m0 || jy < 0 || jy >= m1 || jx < 0 || jx >= m2) {
            v = (Acc)fill;
        } else {
            long long za, zb, ya, yb, xa, xb;
            Acc wz, wy, wx;
            lc_axis<Acc>(jz, n0, st0, s0, o0, order, za, zb, wz);
            lc_axis<Acc>(jy, n1, st1, s1, o1, order, ya, yb, wy);
            lc_axis<Acc>(jx, n2, st2, s2, o2, order, xa, xb, wx);
            if (order == 0) {
                v = (Acc)src[za + ya + xa];
            } else {
                const Acc v000 = (Acc)src[za + ya + xa], v001 = (Acc)src[za + ya + xb];
                const Acc v010 = (Acc)src[za + yb + xa], v011 = (Acc)src[za + yb + xb];
                const Acc v100 = (Acc)src[zb + ya + xa], v101 = (Acc)src[zb + ya + xb];
                const Acc v110 = (Acc)src[zb + yb + xa], v111 = (Acc)src[zb + yb + xb];
                const Acc v00 = v000 + wx * (v001 - v000), v01 = v010 + wx * (v011 - v010);
                const Acc v10 = v100 + wx * (v101 - v100), v11 = v110 + wx * (v111 - v110);
                const Acc v0 = v00 + wy * (v01 - v00), v1 = v10 + wy * (v11 - v10);
                v = v0 + wz * (v1 - v0);
            }
        }
        if (window) {
            v = v < wlo ? wlo : (v > whi ? whi : v);
            v = (v - wlo) * winv;
        }
        if (!isfinite((double)v)) atomicOr(bad, 1);
        dst[(bz * H + ky) * W + kx] = lc_store<Out, Acc>::apply(v);
    }
}
