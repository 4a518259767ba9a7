// CT volume resampling (orders 0, 1 and 3) fused with an optional HU window and box crops.
//
// Grid (DESIGN.md "Spatial conventions"), per axis a with scale s = new_spacing / old_spacing:
// output index j samples input continuous index i = s * j + o, o = 0.5 * s - 0.5 (computed in
// float64 exactly as scipy.ndimage.affine_transform does with matrix = diag(s), offset = o).
// Inside the input (j in [0, m), m = the full output size) the coordinates are clamped to the
// voxel-centre hull [0, n - 1] (scipy's mode="nearest": the output grid covers the same physical
// extent, so only the outer half voxel is clamped); a box voxel whose j lies outside [0, m)
// gets `fill`. A whole resample is one box with start 0 and size m. Order 3 (cubic B-spline) runs
// on a coefficient volume that the caller padded by 12 edge voxels and prefiltered
// (spline_prefilter3 below: scipy's recipe for mode="nearest"); taps are not clamped to the hull.
//
// Work: every output row (box, z, y) first blends the K*K (K = order + 1 taps) input rows it needs over the
// x-range its box touches (contiguous, vectorised), then interpolates along x from that row in
// L1. Traffic: each output voxel is written once; input rows are read once per output row that
// touches them (z/y up-sampling re-reads, from cache). Accumulation is float32 (float64 when the
// input or the output is float64); integer outputs are rounded to nearest and saturated.
// Limits: 3-D volumes of int8/uint8/int16/uint16/int32/float32/float64 with any strides;
// output C-contiguous (N, D, H, W) of float32/float64 or the input dtype. Non-finite output
// values (NaN/inf in the sampled input) are reported to the caller, which raises.
// Backward (resample_boxes_backward, spline_prefilter3_adjoint): the transpose, without atomics
// (threads own input z-planes), float32/float64; it writes a dense gradient of the whole volume.
#include "bindings.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace lungcore {
namespace {

template <typename Acc>
struct AxisTable {
    int K = 1;                     // taps per output position: 1 (order 0), 2 (order 1), 4 (order 3)
    std::vector<int64_t> idx;      // size * K input indices
    std::vector<Acc> w;            // size * K weights
    std::vector<uint8_t> valid;    // 0 -> fill
    int64_t lo = 0, hi = -1;       // range of input indices touched, for the row blend
};

inline int taps_of(int order) { return order == 0 ? 1 : (order == 1 ? 2 : 4); }

template <typename Acc>
AxisTable<Acc> axis_table(int64_t start, int64_t size, int64_t grid, int64_t n, double scale,
                          double offset, int order) {
    AxisTable<Acc> t;
    const int K = taps_of(order);
    t.K = K;
    t.idx.assign(size * K, 0);
    t.w.assign(size * K, Acc(0));
    t.valid.resize(size);
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
    auto clamp = [n](int64_t i) { return std::min<int64_t>(std::max<int64_t>(i, 0), n - 1); };
    for (int64_t k = 0; k < size; ++k) {
        const int64_t j = start + k;
        const bool ok = j >= 0 && j < grid;
        t.valid[k] = ok;
        if (!ok) continue;
        volatile double prod = scale * static_cast<double>(j);  // no FMA: match scipy bit for bit
        const double x = prod + offset;
        int64_t* id = &t.idx[k * K];
        Acc* w = &t.w[k * K];
        if (order == 0) {
            id[0] = clamp(static_cast<int64_t>(std::floor(x + 0.5)));
            w[0] = Acc(1);
        } else if (order == 1) {
            const double f = std::floor(x);
            int64_t a = static_cast<int64_t>(f);
            double frac = x - f;
            if (a < 0) { a = 0; frac = 0.0; }
            if (a >= n - 1) { a = n - 1; frac = 0.0; }
            id[0] = a;
            id[1] = std::min<int64_t>(a + 1, n - 1);
            w[0] = static_cast<Acc>(1.0 - frac);
            w[1] = static_cast<Acc>(frac);
        } else {  // cubic B-spline weights, taps floor(x) - 1 .. floor(x) + 2
            const double f = std::floor(x);
            const double u = x - f, u2 = u * u, u3 = u2 * u;
            const int64_t a = static_cast<int64_t>(f);
            const double ws[4] = {(1.0 - u) * (1.0 - u) * (1.0 - u) / 6.0, (4.0 - 6.0 * u2 + 3.0 * u3) / 6.0,
                                  (1.0 + 3.0 * u + 3.0 * u2 - 3.0 * u3) / 6.0, u3 / 6.0};
            for (int q = 0; q < 4; ++q) {
                id[q] = clamp(a - 1 + q);
                w[q] = static_cast<Acc>(ws[q]);
            }
        }
        for (int q = 0; q < K; ++q) {
            lo = std::min(lo, id[q]);
            hi = std::max(hi, id[q]);
        }
    }
    t.lo = hi >= 0 ? lo : 0;
    t.hi = hi;
    for (int64_t k = 0; k < size; ++k)  // fill positions read a sampled voxel (never stale row data)
        if (!t.valid[k])
            for (int q = 0; q < K; ++q) t.idx[k * K + q] = t.lo;
    return t;
}

template <typename Out, typename Acc>
inline Out store(Acc v) {
    if constexpr (std::is_floating_point_v<Out>) {
        return static_cast<Out>(v);
    } else {
        if (!(v == v)) return Out(0);
        const Acc r = std::nearbyint(v);
        if (r <= static_cast<Acc>(std::numeric_limits<Out>::lowest())) return std::numeric_limits<Out>::lowest();
        if (r >= static_cast<Acc>(std::numeric_limits<Out>::max())) return std::numeric_limits<Out>::max();
        return static_cast<Out>(r);
    }
}

struct Params {
    std::array<int64_t, 3> n{};       // input shape
    std::array<int64_t, 3> stride{};  // input strides in elements
    std::array<int64_t, 3> size{};    // box size (output voxels)
    std::array<int64_t, 3> grid{};    // full output grid m
    std::array<double, 3> scale{}, offset{};
    int order = 1;
    double fill = -1024.0;
    bool window = false;
    double lo = 0.0, hi = 1.0;
    int threads = 0;                  // 0: OpenMP's default; the Python side passes torch.get_num_threads()
};

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// The interpolated values v[0..W) of output row (kz, ky) of one box (before fill and window):
// the K*K input rows it needs are first blended over the x-range the box touches (contiguous,
// vectorised), then interpolated along x from that row buffer `rw` (length n[2] + 1) in L1.
// Shared by the forward and by the backward (which needs v where a window may clamp).
template <typename In, typename Acc>
inline void sample_row(const In* src, const std::array<AxisTable<Acc>, 3>& t, int64_t kz, int64_t ky, int64_t W,
                       int64_t sz, int64_t sy, int64_t sx, Acc* rw, Acc* v) {
    const auto& tz = t[0];
    const auto& ty = t[1];
    const auto& tx = t[2];
    const int K = tx.K;
    const int64_t* ix = tx.idx.data();
    const Acc* wx = tx.w.data();
    const int64_t* iz = &tz.idx[kz * K];
    const int64_t* iy = &ty.idx[ky * K];
    const Acc* wz = &tz.w[kz * K];
    const Acc* wy = &ty.w[ky * K];
    const int64_t x0 = tx.lo, x1 = tx.hi;
    if (K == 1) {
        const In* r0 = src + iz[0] * sz + iy[0] * sy;
        for (int64_t x = x0; x <= x1; ++x) rw[x] = static_cast<Acc>(r0[x * sx]);
        for (int64_t kx = 0; kx < W; ++kx) v[kx] = rw[ix[kx]];
    } else if (K == 2) {
        const Acc c00 = wz[0] * wy[0], c01 = wz[0] * wy[1], c10 = wz[1] * wy[0], c11 = wz[1] * wy[1];
        const In* r00 = src + iz[0] * sz + iy[0] * sy;
        const In* r01 = src + iz[0] * sz + iy[1] * sy;
        const In* r10 = src + iz[1] * sz + iy[0] * sy;
        const In* r11 = src + iz[1] * sz + iy[1] * sy;
        if (sx == 1) {
            for (int64_t x = x0; x <= x1; ++x)
                rw[x] = c00 * static_cast<Acc>(r00[x]) + c01 * static_cast<Acc>(r01[x]) +
                        c10 * static_cast<Acc>(r10[x]) + c11 * static_cast<Acc>(r11[x]);
        } else {
            for (int64_t x = x0; x <= x1; ++x)
                rw[x] = c00 * static_cast<Acc>(r00[x * sx]) + c01 * static_cast<Acc>(r01[x * sx]) +
                        c10 * static_cast<Acc>(r10[x * sx]) + c11 * static_cast<Acc>(r11[x * sx]);
        }
        for (int64_t kx = 0; kx < W; ++kx) v[kx] = wx[2 * kx] * rw[ix[2 * kx]] + wx[2 * kx + 1] * rw[ix[2 * kx + 1]];
    } else {
        for (int64_t x = x0; x <= x1; ++x) rw[x] = Acc(0);
        for (int qz = 0; qz < 4; ++qz) {
            const In* r0 = src + iz[qz] * sz + iy[0] * sy;
            const In* r1 = src + iz[qz] * sz + iy[1] * sy;
            const In* r2 = src + iz[qz] * sz + iy[2] * sy;
            const In* r3 = src + iz[qz] * sz + iy[3] * sy;
            const Acc c0 = wz[qz] * wy[0], c1 = wz[qz] * wy[1], c2 = wz[qz] * wy[2], c3 = wz[qz] * wy[3];
            for (int64_t x = x0; x <= x1; ++x)
                rw[x] += c0 * static_cast<Acc>(r0[x * sx]) + c1 * static_cast<Acc>(r1[x * sx]) +
                         c2 * static_cast<Acc>(r2[x * sx]) + c3 * static_cast<Acc>(r3[x * sx]);
        }
        for (int64_t kx = 0; kx < W; ++kx) {
            const int64_t* i = ix + 4 * kx;
            const Acc* w = wx + 4 * kx;
            v[kx] = w[0] * rw[i[0]] + w[1] * rw[i[1]] + w[2] * rw[i[2]] + w[3] * rw[i[3]];
        }
    }
}

// Returns true when every written value is finite. Window and the finiteness check (float input
// only: integers cannot make NaN) are template flags so the inner loops carry no dead branches.
template <typename In, typename Out, typename Acc, bool Window, bool Check>
bool resample_boxes_impl(const In* src, Out* dst, const int64_t* starts, int64_t nbox, const Params& p) {
    std::vector<std::array<AxisTable<Acc>, 3>> tables(nbox);
    std::vector<uint8_t> all_x(nbox);
    for (int64_t b = 0; b < nbox; ++b) {
        for (int a = 0; a < 3; ++a)
            tables[b][a] = axis_table<Acc>(starts[3 * b + a], p.size[a], p.grid[a], p.n[a], p.scale[a],
                                           p.offset[a], p.order);
        const auto& v = tables[b][2].valid;
        all_x[b] = std::all_of(v.begin(), v.end(), [](uint8_t x) { return x != 0; });
    }
    const Acc wlo = static_cast<Acc>(p.lo), whi = static_cast<Acc>(p.hi);
    const Acc winv = static_cast<Acc>(Window ? 1.0 / (p.hi - p.lo) : 1.0);
    auto post = [=](Acc v) -> Acc {
        if constexpr (Window) {
            v = v < wlo ? wlo : (v > whi ? whi : v);
            return (v - wlo) * winv;
        } else {
            return v;
        }
    };
    const Acc fill_acc = post(static_cast<Acc>(p.fill));
    const Out fill_out = store<Out, Acc>(fill_acc);
    const int64_t D = p.size[0], H = p.size[1], W = p.size[2];
    const int64_t rows = nbox * D * H;
    const int64_t sx = p.stride[2], sy = p.stride[1], sz = p.stride[0];
    int bad = 0;

    // Dynamic chunks of rows: a thread that the OS deschedules (data-loader workers share the cores)
    // does not hold back the others; below ~256k output voxels one thread beats waking the team.
    const bool parallel = p.threads != 1 && rows * W >= (int64_t(1) << 18);
    const int team = p.threads > 0 ? p.threads : max_threads();
#pragma omp parallel reduction(| : bad) if (parallel) num_threads(team)
    {
        std::vector<Acc> row(static_cast<size_t>(p.n[2]) + 1);
        std::vector<Acc> vals(static_cast<size_t>(W));
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t b = r / (D * H);
            const int64_t kz = (r / H) % D;
            const int64_t ky = r % H;
            const auto& tz = tables[b][0];
            const auto& ty = tables[b][1];
            const auto& tx = tables[b][2];
            Out* out = dst + r * W;
            if (!tz.valid[kz] || !ty.valid[ky] || tx.hi < 0) {
                for (int64_t kx = 0; kx < W; ++kx) out[kx] = fill_out;
                continue;
            }
            sample_row<In, Acc>(src, tables[b], kz, ky, W, sz, sy, sx, row.data(), vals.data());
            const Acc* v = vals.data();
            if constexpr (Check) {  // OR of (x - x != 0): true for NaN and +-inf; vectorises, no FP chain
                int flag = 0;
                for (int64_t kx = 0; kx < W; ++kx) flag |= (v[kx] - v[kx]) != Acc(0);
                bad |= flag;
            }
            if (all_x[b]) {
                for (int64_t kx = 0; kx < W; ++kx) out[kx] = store<Out, Acc>(post(v[kx]));
            } else {
                const uint8_t* ok = tx.valid.data();
                for (int64_t kx = 0; kx < W; ++kx) out[kx] = ok[kx] ? store<Out, Acc>(post(v[kx])) : fill_out;
            }
        }
    }
    return bad == 0;
}

// Cubic B-spline prefilter along one axis of a C-contiguous array viewed as (outer, n, inner), in
// place: gain 6, causal then anti-causal recursion with pole z = sqrt(3) - 2 and mirror
// boundaries (Unser; Thevenaz et al.), the causal start truncated at |z|^k < 1e-17. Lines are
// processed 256 at a time along `inner` so every step of the recursion reads contiguous memory.
template <typename T>
void prefilter_lines(T* c, int64_t outer, int64_t n, int64_t inner, int threads) {
    if (n < 2) return;
    const T z = static_cast<T>(std::sqrt(3.0) - 2.0);
    const T gain = T(6);
    const T anti = z / (z * z - T(1));
    const int64_t horizon = std::min<int64_t>(n, 30);
    const int64_t chunk = inner > 1 ? 256 : 1;
    const int64_t chunks = (inner + chunk - 1) / chunk;
    const int team = threads > 0 ? threads : max_threads();
#pragma omp parallel for collapse(2) schedule(dynamic, 4) num_threads(team) if (threads != 1)
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
            T* base = c + o * n * inner;
            const int64_t i0 = ch * chunk, i1 = std::min(inner, i0 + chunk);
            T start[256];
            for (int64_t i = i0; i < i1; ++i) {
                T sum = 0, zk = 1;
                for (int64_t k = 0; k < horizon; ++k) { sum += zk * base[k * inner + i]; zk *= z; }
                start[i - i0] = gain * sum;
            }
            for (int64_t i = i0; i < i1; ++i) base[i] = start[i - i0];
            for (int64_t k = 1; k < n; ++k) {
                T* cur = base + k * inner;
                const T* prev = cur - inner;
                for (int64_t i = i0; i < i1; ++i) cur[i] = gain * cur[i] + z * prev[i];
            }
            T* last = base + (n - 1) * inner;
            for (int64_t i = i0; i < i1; ++i) last[i] = anti * (last[i] + z * last[i - inner]);
            for (int64_t k = n - 2; k >= 0; --k) {
                T* cur = base + k * inner;
                const T* next = cur + inner;
                for (int64_t i = i0; i < i1; ++i) cur[i] = z * (next[i] - cur[i]);
            }
        }
    }
}

void spline_prefilter3(py::array c, int threads) {
    if (c.ndim() != 3) throw std::invalid_argument("coefficients must be 3-D");
    if (!(c.flags() & py::array::c_style) || !c.writeable()) throw std::invalid_argument("coefficients must be C-contiguous and writeable");
    const int64_t n0 = c.shape(0), n1 = c.shape(1), n2 = c.shape(2);
    auto run = [&](auto* data) {
        py::gil_scoped_release release;
        prefilter_lines(data, 1, n0, n1 * n2, threads);
        prefilter_lines(data, n0, n1, n2, threads);
        prefilter_lines(data, n0 * n1, n2, 1, threads);
    };
    if (py::dtype::of<float>().equal(c.dtype())) run(static_cast<float*>(c.mutable_data()));
    else if (py::dtype::of<double>().equal(c.dtype())) run(static_cast<double*>(c.mutable_data()));
    else throw std::invalid_argument("coefficients must be float32 or float64");
}

template <typename T>
// dtype equality, not identity: an equal dtype object that is not numpy's singleton (nibabel hands such
// int16 views over) must be accepted; a byte-swapped one is not equal and is refused
bool is(const py::array& a) { return py::dtype::of<T>().equal(a.dtype()); }

template <typename In, typename Out>
bool run_typed(const py::array& vol, py::array& out, const int64_t* starts, int64_t nbox, const Params& p) {
    const In* src = static_cast<const In*>(vol.data());
    Out* dst = static_cast<Out*>(out.mutable_data());
    // float32 arithmetic, except float64 data and int32 (beyond 2^24 float32 is not exact)
    using Acc = std::conditional_t<std::is_same_v<In, double> || std::is_same_v<Out, double> ||
                                       std::is_same_v<In, int32_t>, double, float>;
    constexpr bool check = std::is_floating_point_v<In>;
    py::gil_scoped_release release;
    if (p.window) return resample_boxes_impl<In, Out, Acc, true, check>(src, dst, starts, nbox, p);
    return resample_boxes_impl<In, Out, Acc, false, check>(src, dst, starts, nbox, p);
}

template <typename In>
bool run_in(const py::array& vol, py::array& out, const int64_t* starts, int64_t nbox, const Params& p) {
    if (is<float>(out)) return run_typed<In, float>(vol, out, starts, nbox, p);
    if (is<double>(out)) return run_typed<In, double>(vol, out, starts, nbox, p);
    if (is<In>(out)) return run_typed<In, In>(vol, out, starts, nbox, p);
    if constexpr (std::is_floating_point_v<In>) {  // order 3 samples float coefficients of an integer volume
        if (is<int16_t>(out)) return run_typed<In, int16_t>(vol, out, starts, nbox, p);
        if (is<uint8_t>(out)) return run_typed<In, uint8_t>(vol, out, starts, nbox, p);
        if (is<int8_t>(out)) return run_typed<In, int8_t>(vol, out, starts, nbox, p);
        if (is<uint16_t>(out)) return run_typed<In, uint16_t>(vol, out, starts, nbox, p);
        if (is<int32_t>(out)) return run_typed<In, int32_t>(vol, out, starts, nbox, p);
    }
    throw std::invalid_argument("out dtype must be float32, float64 or the volume's dtype");
}

// ---------------------------------------------------------------------------------------------
// Backward: the transpose of resample_boxes with respect to the sampled volume. Each box voxel's
// gradient (zero where it is fill; times the window's slope, or zero where the window clamps) is
// scattered onto its K^3 taps with the forward's weights, in two passes:
// 1. per output row (parallel over rows): the gradient row is scattered along x into its own
//    buffer over the x-range the box touches (the forward's x-interpolation, transposed); with a
//    window the row's values are resampled first (sample_row, the forward's own arithmetic) to
//    find where the window clamps;
// 2. per input z-plane (parallel over planes, each owned by one thread that also zeroes it: no
//    atomics, bit-identical reruns, `grad_volume` is overwritten): every (box, row) whose z-tap hits the plane adds its x-buffer times wz * wy to the
//    K input rows of its y-taps (the forward's row blend, transposed), in a fixed order.
template <typename T, bool Window>
void boxes_backward_impl(const T* grad, const T* src, T* dst, const int64_t* starts, int64_t nbox, const Params& p) {
    std::vector<std::array<AxisTable<T>, 3>> tables(nbox);
    std::vector<int64_t> offset(nbox + 1, 0);  // start of each box's x-buffers in `xs`
    const int64_t D = p.size[0], H = p.size[1], W = p.size[2];
    for (int64_t b = 0; b < nbox; ++b) {
        for (int a = 0; a < 3; ++a)
            tables[b][a] = axis_table<T>(starts[3 * b + a], p.size[a], p.grid[a], p.n[a], p.scale[a],
                                         p.offset[a], p.order);
        const auto& tx = tables[b][2];
        offset[b + 1] = offset[b] + (tx.hi >= 0 ? D * H * (tx.hi - tx.lo + 1) : 0);
    }
    const int64_t rows = nbox * D * H;
    const int K = taps_of(p.order);
    const int team = p.threads > 0 ? p.threads : max_threads();
    const bool parallel = p.threads != 1 && rows * W >= (int64_t(1) << 16);
    std::vector<T> xs(static_cast<size_t>(offset[nbox]));
    const T wlo = static_cast<T>(p.lo), whi = static_cast<T>(p.hi);
    const T winv = static_cast<T>(Window ? 1.0 / (p.hi - p.lo) : 1.0);
#pragma omp parallel if (parallel) num_threads(team)
    {
        std::vector<T> rw(static_cast<size_t>(p.n[2]) + 1), v(static_cast<size_t>(W));
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t b = r / (D * H), kz = (r / H) % D, ky = r % H;
            const auto& tx = tables[b][2];
            if (tx.hi < 0 || !tables[b][0].valid[kz] || !tables[b][1].valid[ky]) continue;  // fill row
            T* out = &xs[offset[b] + (kz * H + ky) * (tx.hi - tx.lo + 1)] - tx.lo;  // indexed by input x
            for (int64_t x = tx.lo; x <= tx.hi; ++x) out[x] = T(0);
            const T* g = grad + r * W;
            if constexpr (Window)
                sample_row<T, T>(src, tables[b], kz, ky, W, p.stride[0], p.stride[1], p.stride[2], rw.data(), v.data());
            for (int64_t kx = 0; kx < W; ++kx) {
                if (!tx.valid[kx]) continue;
                T gk = g[kx];
                if constexpr (Window) gk = (v[kx] >= wlo && v[kx] <= whi) ? gk * winv : T(0);  // torch.clamp's subgradient
                for (int q = 0; q < K; ++q) out[tx.idx[kx * K + q]] += tx.w[kx * K + q] * gk;
            }
        }
    }
    const int64_t n1 = p.n[1], n2 = p.n[2];
#pragma omp parallel for schedule(dynamic, 1) if (parallel) num_threads(team)
    for (int64_t z = 0; z < p.n[0]; ++z) {
        T* plane = dst + z * n1 * n2;
        std::fill(plane, plane + n1 * n2, T(0));  // the owner zeroes its plane: no separate memset pass
        for (int64_t b = 0; b < nbox; ++b) {
            const auto& tz = tables[b][0];
            const auto& ty = tables[b][1];
            const auto& tx = tables[b][2];
            if (tx.hi < 0) continue;
            const int64_t len = tx.hi - tx.lo + 1;
            for (int64_t kz = 0; kz < D; ++kz) {
                if (!tz.valid[kz]) continue;
                for (int qz = 0; qz < K; ++qz) {
                    const T wz = tz.w[kz * K + qz];
                    if (tz.idx[kz * K + qz] != z || wz == T(0)) continue;
                    for (int64_t ky = 0; ky < H; ++ky) {
                        if (!ty.valid[ky]) continue;
                        const T* xr = &xs[offset[b] + (kz * H + ky) * len];
                        for (int qy = 0; qy < K; ++qy) {
                            const T c = wz * ty.w[ky * K + qy];
                            T* row = plane + ty.idx[ky * K + qy] * n2 + tx.lo;
                            for (int64_t x = 0; x < len; ++x) row[x] += c * xr[x];
                        }
                    }
                }
            }
        }
    }
}

// The geometry the forward and the backward share, checked: the volume's shape and element
// strides, the boxes' size, the output grid and the index map (scale, offset).
Params box_params(const py::array& vol, const py::array& boxes, const std::array<int64_t, 3>& grid,
                  const std::array<double, 3>& scale, const std::array<double, 3>& offset, int order, int threads) {
    Params p;
    for (int a = 0; a < 3; ++a) {
        p.n[a] = vol.shape(a);
        if (p.n[a] < 1) throw std::invalid_argument("volume has an empty axis");
        if (vol.strides(a) % static_cast<py::ssize_t>(vol.itemsize()) != 0) throw std::invalid_argument("volume strides must be multiples of its item size");
        p.stride[a] = vol.strides(a) / static_cast<py::ssize_t>(vol.itemsize());
        p.size[a] = boxes.shape(a + 1);
        p.grid[a] = grid[a];
        p.scale[a] = scale[a];
        p.offset[a] = offset[a];
        if (!(std::isfinite(scale[a]) && scale[a] > 0) || !std::isfinite(offset[a]))
            throw std::invalid_argument("scale must be finite and > 0, offset finite");
    }
    p.order = order;
    p.threads = threads;
    return p;
}

void resample_boxes_backward(py::array grad, py::object volume, py::array grad_volume,
                             py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
                             std::array<int64_t, 3> grid, std::array<double, 3> scale, std::array<double, 3> offset,
                             int order, py::object window, int threads) {
    if (grad.ndim() != 4 || !(grad.flags() & py::array::c_style)) throw std::invalid_argument("grad must be a C-contiguous (boxes, D, H, W) array");
    if (grad_volume.ndim() != 3 || !(grad_volume.flags() & py::array::c_style) || !grad_volume.writeable())
        throw std::invalid_argument("grad_volume must be a writeable C-contiguous 3-D array");
    if (!grad.dtype().equal(grad_volume.dtype())) throw std::invalid_argument("grad and grad_volume must share one dtype");
    if (starts.ndim() != 2 || starts.shape(1) != 3 || starts.shape(0) != grad.shape(0))
        throw std::invalid_argument("starts must have shape (boxes, 3) matching grad");
    if (order != 0 && order != 1 && order != 3) throw std::invalid_argument("order must be 0, 1 or 3");
    Params p = box_params(grad_volume, grad, grid, scale, offset, order, threads);
    py::array src;
    if (!window.is_none()) {
        auto w = window.cast<std::array<double, 2>>();
        if (!(std::isfinite(w[0]) && std::isfinite(w[1]) && w[1] > w[0])) throw std::invalid_argument("window must be (low, high) with low < high, finite");
        p.window = true;
        p.lo = w[0];
        p.hi = w[1];
        if (volume.is_none()) throw std::invalid_argument("a window needs the sampled volume (the clamp depends on the values)");
        src = volume.cast<py::array>();
        if (!src.dtype().equal(grad.dtype()) || !(src.flags() & py::array::c_style) || src.ndim() != 3)
            throw std::invalid_argument("volume must be a C-contiguous 3-D array of grad's dtype");
        for (int a = 0; a < 3; ++a)
            if (src.shape(a) != grad_volume.shape(a)) throw std::invalid_argument("volume and grad_volume must have one shape");
    }
    const int64_t nbox = grad.shape(0);
    if (grad_volume.size() == 0) return;
    const int64_t* st = starts.data();
    auto run = [&](auto tag) {
        using T = decltype(tag);
        const T* g = static_cast<const T*>(grad.data());
        const T* s = p.window ? static_cast<const T*>(src.data()) : nullptr;
        T* d = static_cast<T*>(grad_volume.mutable_data());
        py::gil_scoped_release release;
        if (p.window) boxes_backward_impl<T, true>(g, s, d, st, nbox, p);
        else boxes_backward_impl<T, false>(g, s, d, st, nbox, p);
    };
    if (is<float>(grad)) run(float{});
    else if (is<double>(grad)) run(double{});
    else throw std::invalid_argument("grad must be float32 or float64");
}

// Adjoint of prefilter_lines along one axis (the backward of order 3): the recursions run in
// reverse order with transposed coefficients. One line per iteration, elements `inner` apart.
template <typename T>
void prefilter_lines_adjoint(T* c, int64_t outer, int64_t n, int64_t inner, int threads) {
    if (n < 2) return;
    const T z = static_cast<T>(std::sqrt(3.0) - 2.0);
    const T gain = T(6);
    const T anti = z / (z * z - T(1));
    const int64_t horizon = std::min<int64_t>(n, 30);
    const int team = threads > 0 ? threads : max_threads();
#pragma omp parallel for schedule(dynamic, 64) num_threads(team) if (threads != 1)
    for (int64_t line = 0; line < outer * inner; ++line) {
        T* g = c + (line / inner) * n * inner + (line % inner);
        auto at = [&](int64_t k) -> T& { return g[k * inner]; };
        T acc = at(0);  // anti-causal pass, reversed: c[k] = z (c[k+1] - y[k])
        for (int64_t k = 0; k < n - 1; ++k) {
            const T next = at(k + 1) + z * acc;
            at(k) = -z * acc;
            acc = next;
        }
        at(n - 1) = anti * acc;  // c[n-1] = anti (y[n-1] + z y[n-2])
        at(n - 2) += anti * z * acc;
        for (int64_t k = n - 1; k >= 1; --k) {  // causal pass, reversed: y[k] = gain x[k] + z y[k-1]
            const T t = at(k);
            at(k) = gain * t;
            at(k - 1) += z * t;
        }
        const T y0 = at(0);  // y[0] = gain * sum_k z^k x[k]
        at(0) = T(0);
        T zk = 1;
        for (int64_t k = 0; k < horizon; ++k) { at(k) += gain * zk * y0; zk *= z; }
    }
}

void spline_prefilter3_adjoint(py::array c, int threads) {
    if (c.ndim() != 3) throw std::invalid_argument("coefficients must be 3-D");
    if (!(c.flags() & py::array::c_style) || !c.writeable()) throw std::invalid_argument("coefficients must be C-contiguous and writeable");
    const int64_t n0 = c.shape(0), n1 = c.shape(1), n2 = c.shape(2);
    auto run = [&](auto* data) {
        py::gil_scoped_release release;
        prefilter_lines_adjoint(data, n0 * n1, n2, 1, threads);  // the forward's axes, reversed
        prefilter_lines_adjoint(data, n0, n1, n2, threads);
        prefilter_lines_adjoint(data, 1, n0, n1 * n2, threads);
    };
    if (py::dtype::of<float>().equal(c.dtype())) run(static_cast<float*>(c.mutable_data()));
    else if (py::dtype::of<double>().equal(c.dtype())) run(static_cast<double*>(c.mutable_data()));
    else throw std::invalid_argument("coefficients must be float32 or float64");
}

bool resample_boxes(py::array vol, py::array out, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
                    std::array<int64_t, 3> grid, std::array<double, 3> scale, std::array<double, 3> offset,
                    int order, double fill, py::object window, int threads) {
    if (vol.ndim() != 3) throw std::invalid_argument("volume must be 3-D (z, y, x), got ndim " + std::to_string(vol.ndim()));
    if (out.ndim() != 4) throw std::invalid_argument("out must be 4-D (boxes, z, y, x)");
    if (!(out.flags() & py::array::c_style) || !out.writeable()) throw std::invalid_argument("out must be C-contiguous and writeable");
    if (starts.ndim() != 2 || starts.shape(1) != 3 || starts.shape(0) != out.shape(0))
        throw std::invalid_argument("starts must have shape (boxes, 3) matching out");
    if (order != 0 && order != 1 && order != 3) throw std::invalid_argument("order must be 0, 1 or 3");
    Params p = box_params(vol, out, grid, scale, offset, order, threads);
    p.fill = fill;
    if (!window.is_none()) {
        auto w = window.cast<std::array<double, 2>>();
        if (!(std::isfinite(w[0]) && std::isfinite(w[1]) && w[1] > w[0])) throw std::invalid_argument("window must be (low, high) with low < high, finite");
        p.window = true;
        p.lo = w[0];
        p.hi = w[1];
    }
    const int64_t nbox = out.shape(0);
    if (nbox == 0 || out.size() == 0) return true;
    const int64_t* st = starts.data();
    if (is<int16_t>(vol)) return run_in<int16_t>(vol, out, st, nbox, p);
    if (is<float>(vol)) return run_in<float>(vol, out, st, nbox, p);
    if (is<double>(vol)) return run_in<double>(vol, out, st, nbox, p);
    if (is<uint8_t>(vol)) return run_in<uint8_t>(vol, out, st, nbox, p);
    if (is<int8_t>(vol)) return run_in<int8_t>(vol, out, st, nbox, p);
    if (is<uint16_t>(vol)) return run_in<uint16_t>(vol, out, st, nbox, p);
    if (is<int32_t>(vol)) return run_in<int32_t>(vol, out, st, nbox, p);
    throw std::invalid_argument("volume dtype must be int8, uint8, int16, uint16, int32, float32 or float64");
}

}  // namespace
}  // namespace lungcore

LUNGCORE_BINDINGS(resample) {
    m.def("spline_prefilter3", &lungcore::spline_prefilter3, py::arg("coefficients"), py::arg("threads") = 0,
          "In place: samples -> cubic B-spline coefficients along every axis (mirror boundaries).");
    m.def("spline_prefilter3_adjoint", &lungcore::spline_prefilter3_adjoint, py::arg("gradient"),
          py::arg("threads") = 0, "In place: the transpose of spline_prefilter3 (its backward).");
    m.def("resample_boxes_backward", &lungcore::resample_boxes_backward, py::arg("grad"), py::arg("volume"),
          py::arg("grad_volume"), py::arg("starts"), py::arg("grid"), py::arg("scale"), py::arg("offset"),
          py::arg("order"), py::arg("window") = py::none(), py::arg("threads") = 0,
          "Writes into `grad_volume` the gradient of resample_boxes for `grad` (boxes, D, H, W): the "
          "transpose of the forward's interpolation, deterministic (no atomics). `volume` (the sampled "
          "volume, same dtype) is needed only with a window.");
    m.def("resample_boxes", &lungcore::resample_boxes, py::arg("volume"), py::arg("out"), py::arg("starts"),
          py::arg("grid"), py::arg("scale"), py::arg("offset"), py::arg("order"), py::arg("fill"),
          py::arg("window") = py::none(), py::arg("threads") = 0,
          "Resample `volume` (order 0/1) into the boxes of `out` (N, D, H, W): box b, voxel k samples "
          "output index starts[b] + k of the full grid `grid` (input index scale * j + offset, clamped to "
          "[0, n-1]; outside [0, grid) -> fill); optional HU window (low, high) -> [0, 1]. Returns False "
          "when a written value is not finite.");
}
