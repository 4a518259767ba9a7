// Cox negative log partial likelihood (Breslow / Efron ties, weights, strata) and its gradient,
// float64 throughout, for CPU tensors.
//
// Subjects are sorted once by (stratum, time) (LSD radix sort of the key bits; the order is returned to
// Python and handed back to the backward, so it is sorted once per step). Then, per stratum:
//   reverse pass over tie groups: online log-sum-exp of w e^eta (running max M, scaled sum s,
//     rescaled when M grows: shift invariant, finite for any finite eta), giving log S_g, the
//     tied sum T_g on the same scale, d_g (events with w > 0) and W_g; each event's term is
//     w_i (L_g - eta_i) with L_g = log S_g (+ 1/d sum_l log1p(-l rho/d) for Efron, rho = T/S).
//   backward, forward pass over groups: C_g = sum_{g' <= g} Q_g' a_g' / S_g' kept as
//     C_g * S_g (each step multiplies by S_g / S_g-1 <= 1: no overflow), and
//     grad_j = w_j e^(eta_j - log S_g) (C_g S_g - e_j Q_g b_g) - g_j w_j e_j,
//   with Q_g = sum of the upstream gradient times w over the group's events, a_g = 1/d sum_l
//   1/(1 - l rho/d), b_g = 1/d sum_l (l/d)/(1 - l rho/d) (Breslow: a = 1, b = 0).
// Rows with w == 0 join nothing (masked). Memory: O(n) doubles. Inputs were validated in Python.
#include "bindings.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace lungcore {
namespace {

struct CoxInput {
    const double* eta;
    const double* time;
    const uint8_t* event;
    const double* weight;   // may be null (all ones)
    const int64_t* strata;  // may be null (one stratum)
    size_t n;
    double w(size_t i) const { return weight ? weight[i] : 1.0; }
    bool ev(size_t i) const { return event[i] != 0 && w(i) > 0.0; }
    bool same_group(size_t a, size_t b) const {
        return time[a] == time[b] && (!strata || strata[a] == strata[b]);
    }
    bool same_stratum(size_t a, size_t b) const { return !strata || strata[a] == strata[b]; }
};

struct Group {
    size_t begin, end;  // positions in the sorted order [begin, end)
    double log_s, rho, d, wsum;
};

// One stable LSD radix pass over 11-bit digit `shift` of `key`, permuting (key, row) pairs.
// Returns false (and does nothing) when every key has the same digit, which skips most passes
// for follow-up times in whole days (their low mantissa bits are all zero).
bool radix_pass(std::vector<uint64_t>& key, std::vector<int64_t>& row, std::vector<uint64_t>& key_tmp,
                std::vector<int64_t>& row_tmp, int shift) {
    constexpr size_t kBuckets = 2048;
    size_t count[kBuckets] = {0};
    const size_t n = key.size();
    for (size_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & (kBuckets - 1)];
    for (size_t b = 0; b < kBuckets; ++b)
        if (count[b] == n) return false;
    size_t sum = 0;
    for (size_t b = 0; b < kBuckets; ++b) { const size_t c = count[b]; count[b] = sum; sum += c; }
    for (size_t i = 0; i < n; ++i) {
        const size_t pos = count[(key[i] >> shift) & (kBuckets - 1)]++;
        key_tmp[pos] = key[i];
        row_tmp[pos] = row[i];
    }
    key.swap(key_tmp);
    row.swap(row_tmp);
    return true;
}

void radix_sort(std::vector<uint64_t>& key, std::vector<int64_t>& row) {
    std::vector<uint64_t> key_tmp(key.size());
    std::vector<int64_t> row_tmp(row.size());
    for (int shift = 0; shift < 64; shift += 11) radix_pass(key, row, key_tmp, row_tmp, shift);
}

// Sorted position -> row, by (stratum, time, row): two stable LSD radix sorts (time, then
// stratum) starting from row order, i.e. exactly the order of torch.sort(stable=True) used by
// the Triton path. Times are >= 0 (validated), so their IEEE bits order like the values once
// -0.0 is folded into +0.0; strata flip the sign bit to order as signed integers.
std::vector<int64_t> sort_order(const CoxInput& in) {
    std::vector<int64_t> row(in.n);
    std::iota(row.begin(), row.end(), 0);
    std::vector<uint64_t> key(in.n);
    for (size_t i = 0; i < in.n; ++i) {
        const double t = in.time[i] + 0.0;
        std::memcpy(&key[i], &t, sizeof(double));
    }
    radix_sort(key, row);
    if (in.strata) {
        for (size_t i = 0; i < in.n; ++i)
            key[i] = static_cast<uint64_t>(in.strata[row[i]]) ^ (uint64_t{1} << 63);
        radix_sort(key, row);
    }
    return row;
}

// Tie groups in sorted order with log S, rho, d, W (reverse online log-sum-exp per stratum).
std::vector<Group> groups_of(const CoxInput& in, const std::vector<int64_t>& order) {
    std::vector<Group> groups;
    size_t i = 0;
    while (i < in.n) {
        size_t j = i + 1;
        while (j < in.n && in.same_group(order[i], order[j])) ++j;
        groups.push_back({i, j, 0.0, 0.0, 0.0, 0.0});
        i = j;
    }
    const double neg = -std::numeric_limits<double>::infinity();
    double m = neg, s = 0.0;
    for (size_t k = groups.size(); k-- > 0;) {
        Group& g = groups[k];
        const bool stratum_ends = (g.end == in.n) || !in.same_stratum(order[g.end - 1], order[g.end]);
        if (stratum_ends) { m = neg; s = 0.0; }
        double gm = neg;
        for (size_t p = g.begin; p < g.end; ++p)
            if (in.w(order[p]) > 0.0) gm = std::max(gm, in.eta[order[p]]);
        if (gm > m) {
            s = (m == neg) ? 0.0 : s * std::exp(m - gm);
            m = gm;
        }
        double t = 0.0;
        for (size_t p = g.begin; p < g.end; ++p) {
            const size_t r = order[p];
            const double w = in.w(r);
            if (w <= 0.0) continue;
            const double x = w * std::exp(in.eta[r] - m);
            s += x;
            if (in.ev(r)) { t += x; g.d += 1.0; g.wsum += w; }
        }
        g.log_s = (s > 0.0) ? m + std::log(s) : neg;
        g.rho = (s > 0.0) ? std::min(t / s, 1.0) : 0.0;
    }
    return groups;
}

CoxInput make_input(const Array1d<double>& risk, const Array1d<double>& time, const Array1d<uint8_t>& event,
                    const py::object& weight_obj, const py::object& strata_obj,
                    Array1d<double>& weight, Array1d<int64_t>& strata) {
    const size_t n = static_cast<size_t>(risk.size());
    if (static_cast<size_t>(time.size()) != n || static_cast<size_t>(event.size()) != n)
        throw std::invalid_argument("risk, time and event must have the same length");
    CoxInput in{risk.data(), time.data(), event.data(), nullptr, nullptr, n};
    if (!weight_obj.is_none()) {
        weight = weight_obj.cast<Array1d<double>>();
        if (static_cast<size_t>(weight.size()) != n) throw std::invalid_argument("weights must have the same length as risk");
        in.weight = weight.data();
    }
    if (!strata_obj.is_none()) {
        strata = strata_obj.cast<Array1d<int64_t>>();
        if (static_cast<size_t>(strata.size()) != n) throw std::invalid_argument("strata must have the same length as risk");
        in.strata = strata.data();
    }
    return in;
}

py::tuple cox_forward(const Array1d<double>& risk, const Array1d<double>& time, const Array1d<uint8_t>& event,
                      const py::object& weight_obj, const py::object& strata_obj, bool efron) {
    Array1d<double> weight;
    Array1d<int64_t> strata;
    const CoxInput in = make_input(risk, time, event, weight_obj, strata_obj, weight, strata);
    py::array_t<double> terms_arr(in.n);
    py::array_t<int64_t> order_arr(in.n);
    double total = 0.0, norm = 0.0;
    {
        py::gil_scoped_release release;
        const std::vector<int64_t> order = sort_order(in);
        const std::vector<Group> groups = groups_of(in, order);
        double* terms = terms_arr.mutable_data();
        std::fill(terms, terms + in.n, 0.0);
        for (const Group& g : groups) {
            if (g.d == 0.0) continue;
            double log_l = g.log_s;
            if (efron) {
                double u = 0.0;
                const int64_t d = static_cast<int64_t>(g.d);
                for (int64_t l = 0; l < d; ++l) u += std::log1p(-static_cast<double>(l) * g.rho / g.d);
                log_l += u / g.d;
            }
            for (size_t p = g.begin; p < g.end; ++p) {
                const size_t r = order[p];
                if (!in.ev(r)) continue;
                const double w = in.w(r);
                terms[r] = w * (log_l - in.eta[r]);
                total += terms[r];
                norm += w;
            }
        }
        std::copy(order.begin(), order.end(), order_arr.mutable_data());
    }
    return py::make_tuple(terms_arr, total, norm, order_arr);
}

py::array_t<double> cox_backward(const Array1d<double>& risk, const Array1d<double>& time,
                                 const Array1d<uint8_t>& event, const py::object& weight_obj,
                                 const py::object& strata_obj, bool efron, const Array1d<int64_t>& order_arr,
                                 const Array1d<double>& grad_arr) {
    Array1d<double> weight;
    Array1d<int64_t> strata;
    const CoxInput in = make_input(risk, time, event, weight_obj, strata_obj, weight, strata);
    if (static_cast<size_t>(order_arr.size()) != in.n || static_cast<size_t>(grad_arr.size()) != in.n)
        throw std::invalid_argument("order and grad must have the same length as risk");
    py::array_t<double> out_arr(in.n);
    {
        py::gil_scoped_release release;
        const std::vector<int64_t> order(order_arr.data(), order_arr.data() + in.n);
        const double* g = grad_arr.data();
        const std::vector<Group> groups = groups_of(in, order);
        double* out = out_arr.mutable_data();
        double c_scaled = 0.0, prev_log_s = 0.0;
        for (size_t k = 0; k < groups.size(); ++k) {
            const Group& gr = groups[k];
            const bool stratum_starts = (k == 0) || !in.same_stratum(order[gr.begin - 1], order[gr.begin]);
            if (stratum_starts || !std::isfinite(gr.log_s)) c_scaled = 0.0;
            else if (c_scaled != 0.0) c_scaled *= std::exp(gr.log_s - prev_log_s);
            double q = 0.0, a = 0.0, b = 0.0;
            if (gr.d > 0.0) {
                for (size_t p = gr.begin; p < gr.end; ++p) {
                    const size_t r = order[p];
                    if (in.ev(r)) q += g[r] * in.w(r);
                }
                if (efron) {
                    const int64_t d = static_cast<int64_t>(gr.d);
                    for (int64_t l = 0; l < d; ++l) {
                        const double f = static_cast<double>(l) / gr.d;
                        const double inv = 1.0 / (1.0 - f * gr.rho);
                        a += inv;
                        b += f * inv;
                    }
                    a /= gr.d;
                    b /= gr.d;
                } else {
                    a = 1.0;
                }
                c_scaled += q * a;
            }
            prev_log_s = gr.log_s;
            for (size_t p = gr.begin; p < gr.end; ++p) {
                const size_t r = order[p];
                const double w = in.w(r);
                if (w <= 0.0) { out[r] = 0.0; continue; }
                const double share = w * std::exp(in.eta[r] - gr.log_s);
                double v = share * c_scaled;
                if (in.ev(r)) v -= share * q * b + g[r] * w;
                out[r] = v;
            }
        }
    }
    return out_arr;
}

}  // namespace
}  // namespace lungcore

LUNGCORE_BINDINGS(cox) {
    m.def("cox_forward", &lungcore::cox_forward, py::arg("risk"), py::arg("time"), py::arg("event"),
          py::arg("weight"), py::arg("strata"), py::arg("efron"),
          "Cox loss terms per row (float64), their sum, the event weight, and the (stratum, time) order.");
    m.def("cox_backward", &lungcore::cox_backward, py::arg("risk"), py::arg("time"), py::arg("event"),
          py::arg("weight"), py::arg("strata"), py::arg("efron"), py::arg("order"), py::arg("grad"),
          "d loss / d risk (float64) given the per-row upstream gradient of every event term.");
}
