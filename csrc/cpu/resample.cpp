// CT volume resampling (orders 0 and 1) fused with an optional HU window and box crops.
//
// Grid (DESIGN.md "Spatial conventions"), per axis a with scale s = new_spacing / old_spacing:
// output index j samples input continuous index i = s * j + o, o = 0.5 * s - 0.5 (computed in
// float64 exactly as scipy.ndimage.affine_transform does with matrix = diag(s), offset = o).
// Inside the input (j in [0, m), m = the full output size) the coordinates are clamped to the
// voxel-centre hull [0, n - 1] (scipy's mode="nearest": the output grid covers the same physical
// extent, so only the outer half voxel is clamped); a box voxel whose j lies outside [0, m)
// gets `fill`. A whole resample is one box with start 0 and size m.
//
// Work: every output row (box, z, y) first blends the 4 (order 1) input rows it needs over the
// x-range its box touches (contiguous, vectorised), then interpolates along x from that row in
// L1. Traffic: each output voxel is written once; input rows are read once per output row that
// touches them (z/y up-sampling re-reads, from cache). Accumulation is float32 (float64 when the
// input or the output is float64); integer outputs are rounded to nearest and saturated.
// Limits: 3-D volumes of int8/uint8/int16/uint16/int32/float32/float64 with any strides;
// output C-contiguous (N, D, H, W) of float32/float64 or the input dtype. Non-finite output
// values (NaN/inf in the sampled input) are reported to the caller, which raises.
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

namespace py = pybind11;

namespace lungcore {
namespace {

template <typename Acc>
struct AxisTable {
    std::vector<int64_t> i0, i1;   // input indices (element offsets already multiplied by stride)
    std::vector<Acc> w;            // weight of i1 (order 1)
    std::vector<uint8_t> valid;    // 0 -> fill
    int64_t lo = 0, hi = -1;       // range of input indices touched (unscaled), for the row blend
};

template <typename Acc>
AxisTable<Acc> axis_table(int64_t start, int64_t size, int64_t grid, int64_t n, double scale,
                          double offset, int order) {
    AxisTable<Acc> t;
    t.i0.resize(size);
    t.i1.resize(size);
    t.w.resize(size);
    t.valid.resize(size);
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
    for (int64_t k = 0; k < size; ++k) {
        const int64_t j = start + k;
        const bool ok = j >= 0 && j < grid;
        t.valid[k] = ok;
        int64_t a = 0, b = 0;
        Acc w = 0;
        if (ok) {
            volatile double prod = scale * static_cast<double>(j);  // no FMA: match scipy bit for bit
            const double x = prod + offset;
            if (order == 0) {
                a = static_cast<int64_t>(std::floor(x + 0.5));
                a = std::min<int64_t>(std::max<int64_t>(a, 0), n - 1);
                b = a;
            } else {
                const double f = std::floor(x);
                a = static_cast<int64_t>(f);
                double frac = x - f;
                if (a < 0) { a = 0; frac = 0.0; }
                if (a >= n - 1) { a = n - 1; frac = 0.0; }
                b = std::min<int64_t>(a + 1, n - 1);
                w = static_cast<Acc>(frac);
            }
            lo = std::min(lo, a);
            hi = std::max(hi, b);
        }
        t.i0[k] = a;
        t.i1[k] = b;
        t.w[k] = w;
    }
    t.lo = hi >= 0 ? lo : 0;
    t.hi = hi;
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
};

// Returns true when every written value is finite.
template <typename In, typename Out, typename Acc>
bool resample_boxes_impl(const In* src, Out* dst, const int64_t* starts, int64_t nbox, const Params& p) {
    std::vector<std::array<AxisTable<Acc>, 3>> tables(nbox);
    for (int64_t b = 0; b < nbox; ++b)
        for (int a = 0; a < 3; ++a)
            tables[b][a] = axis_table<Acc>(starts[3 * b + a], p.size[a], p.grid[a], p.n[a], p.scale[a],
                                           p.offset[a], p.order);
    const Acc wlo = static_cast<Acc>(p.lo), whi = static_cast<Acc>(p.hi);
    const Acc winv = static_cast<Acc>(p.window ? 1.0 / (p.hi - p.lo) : 1.0);
    const bool window = p.window;
    auto post = [=](Acc v) -> Acc {
        if (!window) return v;
        v = v < wlo ? wlo : (v > whi ? whi : v);
        return (v - wlo) * winv;
    };
    const Out fill_out = store<Out, Acc>(post(static_cast<Acc>(p.fill)));
    const Acc fill_acc = post(static_cast<Acc>(p.fill));
    const int64_t D = p.size[0], H = p.size[1], W = p.size[2];
    const int64_t rows = nbox * D * H;
    const int64_t sx = p.stride[2], sy = p.stride[1], sz = p.stride[0];
    int bad = 0;

#pragma omp parallel reduction(| : bad)
    {
        std::vector<Acc> row(static_cast<size_t>(p.n[2]) + 1);
#pragma omp for schedule(static)
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
                if (!std::isfinite(static_cast<double>(fill_acc))) bad |= 1;
                continue;
            }
            Acc acc_check = 0;
            if (p.order == 0) {
                const In* base = src + tz.i0[kz] * sz + ty.i0[ky] * sy;
                for (int64_t kx = 0; kx < W; ++kx) {
                    Acc v = tx.valid[kx] ? post(static_cast<Acc>(base[tx.i0[kx] * sx])) : fill_acc;
                    acc_check += v * Acc(0);
                    out[kx] = store<Out, Acc>(v);
                }
            } else {
                const Acc wz = tz.w[kz], wy = ty.w[ky];
                const Acc c00 = (1 - wz) * (1 - wy), c01 = (1 - wz) * wy, c10 = wz * (1 - wy), c11 = wz * wy;
                const In* r00 = src + tz.i0[kz] * sz + ty.i0[ky] * sy;
                const In* r01 = src + tz.i0[kz] * sz + ty.i1[ky] * sy;
                const In* r10 = src + tz.i1[kz] * sz + ty.i0[ky] * sy;
                const In* r11 = src + tz.i1[kz] * sz + ty.i1[ky] * sy;
                const int64_t x0 = tx.lo, x1 = tx.hi;
                Acc* rw = row.data();
                if (sx == 1) {
                    for (int64_t x = x0; x <= x1; ++x)
                        rw[x] = c00 * static_cast<Acc>(r00[x]) + c01 * static_cast<Acc>(r01[x]) +
                                c10 * static_cast<Acc>(r10[x]) + c11 * static_cast<Acc>(r11[x]);
                } else {
                    for (int64_t x = x0; x <= x1; ++x)
                        rw[x] = c00 * static_cast<Acc>(r00[x * sx]) + c01 * static_cast<Acc>(r01[x * sx]) +
                                c10 * static_cast<Acc>(r10[x * sx]) + c11 * static_cast<Acc>(r11[x * sx]);
                }
                const int64_t* i0 = tx.i0.data();
                const int64_t* i1 = tx.i1.data();
                const Acc* wx = tx.w.data();
                for (int64_t kx = 0; kx < W; ++kx) {
                    const Acc v = tx.valid[kx] ? post(rw[i0[kx]] + wx[kx] * (rw[i1[kx]] - rw[i0[kx]])) : fill_acc;
                    acc_check += v * Acc(0);  // NaN/inf anywhere -> NaN here
                    out[kx] = store<Out, Acc>(v);
                }
            }
            if (!(acc_check == 0)) bad |= 1;
        }
    }
    return bad == 0;
}

template <typename T>
bool is(const py::array& a) { return py::dtype::of<T>().is(a.dtype()); }

template <typename In, typename Out>
bool run_typed(const py::array& vol, py::array& out, const int64_t* starts, int64_t nbox, const Params& p) {
    const In* src = static_cast<const In*>(vol.data());
    Out* dst = static_cast<Out*>(out.mutable_data());
    bool ok;
    py::gil_scoped_release release;
    if constexpr (std::is_same_v<In, double> || std::is_same_v<Out, double>)
        ok = resample_boxes_impl<In, Out, double>(src, dst, starts, nbox, p);
    else
        ok = resample_boxes_impl<In, Out, float>(src, dst, starts, nbox, p);
    return ok;
}

template <typename In>
bool run_in(const py::array& vol, py::array& out, const int64_t* starts, int64_t nbox, const Params& p) {
    if (is<float>(out)) return run_typed<In, float>(vol, out, starts, nbox, p);
    if (is<double>(out)) return run_typed<In, double>(vol, out, starts, nbox, p);
    if (py::dtype::of<In>().is(out.dtype())) return run_typed<In, In>(vol, out, starts, nbox, p);
    throw std::invalid_argument("out dtype must be float32, float64 or the volume's dtype");
}

bool resample_boxes(py::array vol, py::array out, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
                    std::array<int64_t, 3> grid, std::array<double, 3> scale, std::array<double, 3> offset,
                    int order, double fill, py::object window) {
    if (vol.ndim() != 3) throw std::invalid_argument("volume must be 3-D (z, y, x), got ndim " + std::to_string(vol.ndim()));
    if (out.ndim() != 4) throw std::invalid_argument("out must be 4-D (boxes, z, y, x)");
    if (!(out.flags() & py::array::c_style) || !out.writeable()) throw std::invalid_argument("out must be C-contiguous and writeable");
    if (starts.ndim() != 2 || starts.shape(1) != 3 || starts.shape(0) != out.shape(0))
        throw std::invalid_argument("starts must have shape (boxes, 3) matching out");
    if (order != 0 && order != 1) throw std::invalid_argument("order must be 0 or 1 in the C++ core");
    Params p;
    for (int a = 0; a < 3; ++a) {
        p.n[a] = vol.shape(a);
        if (p.n[a] < 1) throw std::invalid_argument("volume has an empty axis");
        if (vol.strides(a) % static_cast<py::ssize_t>(vol.itemsize()) != 0) throw std::invalid_argument("volume strides must be multiples of its item size");
        p.stride[a] = vol.strides(a) / static_cast<py::ssize_t>(vol.itemsize());
        p.size[a] = out.shape(a + 1);
        p.grid[a] = grid[a];
        p.scale[a] = scale[a];
        p.offset[a] = offset[a];
        if (!(std::isfinite(scale[a]) && scale[a] > 0) || !std::isfinite(offset[a]))
            throw std::invalid_argument("scale must be finite and > 0, offset finite");
    }
    p.order = order;
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
    m.def("resample_boxes", &lungcore::resample_boxes, py::arg("volume"), py::arg("out"), py::arg("starts"),
          py::arg("grid"), py::arg("scale"), py::arg("offset"), py::arg("order"), py::arg("fill"),
          py::arg("window") = py::none(),
          "Resample `volume` (order 0/1) into the boxes of `out` (N, D, H, W): box b, voxel k samples "
          "output index starts[b] + k of the full grid `grid` (input index scale * j + offset, clamped to "
          "[0, n-1]; outside [0, grid) -> fill); optional HU window (low, high) -> [0, 1]. Returns False "
          "when a written value is not finite.");
}
