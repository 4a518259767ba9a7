// Concordance counting in O(n log n) (Harrell's C, and Uno's C through per-event weights).
//
// For every event i the comparable set is {j : t_j > t_i} plus the censored j with t_j == t_i
// (lifelines' and scikit-survival's rule: an event is earlier than a censoring at the same time;
// two events at the same time are not compared). Within it, j is tied when
// |risk_j - risk_i| <= tied_tol (0 = exact equality, lifelines' rule; scikit-survival uses 1e-8),
// concordant when risk_j < risk_i - tied_tol, discordant otherwise.
//
// Walk the time groups from the latest to the earliest with a Fenwick tree over the sorted
// distinct risks that holds every subject later than the current group: insert the group's
// censored subjects, query each of its events (two binary searches bound the tie window), then
// insert its events. Counts are exact int64; the weighted sums
// (numerator = sum_i w_i (con_i + tie_i / 2), denominator = sum_i w_i |S_i|) are float64.
// Memory: O(n) int64/int32 scratch. Inputs are validated here too (never UB on NaN).
#include "bindings.h"
#include "common/radix_sort.h"

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstring>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace lungcore {
namespace {

struct Fenwick {
    std::vector<int64_t> tree;
    explicit Fenwick(size_t n) : tree(n + 1, 0) {}
    void add(size_t pos) {  // pos is 0-based
        for (size_t i = pos + 1; i < tree.size(); i += i & (~i + 1)) tree[i] += 1;
    }
    int64_t prefix(size_t count) const {  // sum of positions [0, count)
        int64_t s = 0;
        for (size_t i = count; i > 0; i -= i & (~i + 1)) s += tree[i];
        return s;
    }
};

// Indices 0..n-1 ordered by ascending value (stable radix sort, common/radix_sort.h).
std::vector<int32_t> radix_argsort(const double* values, size_t n) {
    std::vector<uint64_t> keys(n);
    std::vector<int32_t> order(n);
    for (size_t i = 0; i < n; ++i) { keys[i] = sortable_bits(values[i]); order[i] = static_cast<int32_t>(i); }
    radix_sort_pairs(keys, order);
    return order;
}

struct Counts {
    double numerator = 0.0;
    double denominator = 0.0;
    int64_t concordant = 0;
    int64_t discordant = 0;
    int64_t tied_risk = 0;
    int64_t tied_time = 0;
    int64_t comparable = 0;
};

Counts concordance_counts_impl(const double* risk, const double* time, const uint8_t* event,
                               const double* weight, size_t n, double tied_tol) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(risk[i])) throw std::invalid_argument("risk holds a NaN or inf value at index " + std::to_string(i));
        if (!std::isfinite(time[i])) throw std::invalid_argument("time holds a NaN or inf value at index " + std::to_string(i));
        if (event[i] > 1) throw std::invalid_argument("event must be 0 or 1; index " + std::to_string(i));
        if (weight && !std::isfinite(weight[i])) throw std::invalid_argument("weight holds a NaN or inf value at index " + std::to_string(i));
    }
    Counts c;
    if (n < 2) return c;
    if (n > static_cast<size_t>(INT32_MAX)) throw std::invalid_argument("more than 2^31 - 1 subjects");

    if (!(tied_tol >= 0.0) || !std::isfinite(tied_tol)) throw std::invalid_argument("tied_tol must be finite and >= 0");
    // Sorted distinct risks; rank = position of a subject's risk among them.
    const std::vector<int32_t> by_risk = radix_argsort(risk, n);
    std::vector<double> values;
    values.reserve(n);
    std::vector<int32_t> rank(n);
    for (size_t k = 0; k < n; ++k) {
        const double v = risk[by_risk[k]];
        if (values.empty() || v != values.back()) values.push_back(v);
        rank[by_risk[k]] = static_cast<int32_t>(values.size() - 1);
    }
    const size_t n_ranks = values.size();
    auto below = [&](double v) {  // number of distinct values < v
        return static_cast<size_t>(std::lower_bound(values.begin(), values.end(), v) - values.begin());
    };
    auto at_most = [&](double v) {  // number of distinct values <= v
        return static_cast<size_t>(std::upper_bound(values.begin(), values.end(), v) - values.begin());
    };

    // Subjects by time, latest first.
    std::vector<int32_t> by_time = radix_argsort(time, n);
    std::reverse(by_time.begin(), by_time.end());

    Fenwick tree(n_ranks);
    int64_t inserted = 0;
    size_t start = 0;
    while (start < n) {
        size_t end = start + 1;
        while (end < n && time[by_time[end]] == time[by_time[start]]) ++end;
        int64_t censored_here = 0;
        for (size_t k = start; k < end; ++k) {
            const int64_t j = by_time[k];
            if (!event[j]) { tree.add(rank[j]); ++inserted; ++censored_here; }
        }
        for (size_t k = start; k < end; ++k) {
            const int64_t i = by_time[k];
            if (!event[i]) continue;
            const size_t lo = tied_tol > 0 ? below(risk[i] - tied_tol) : static_cast<size_t>(rank[i]);
            const size_t hi = tied_tol > 0 ? at_most(risk[i] + tied_tol) : static_cast<size_t>(rank[i]) + 1;
            const int64_t less = tree.prefix(lo);
            const int64_t tie = tree.prefix(hi) - less;
            const int64_t more = inserted - less - tie;
            const double w = weight ? weight[i] : 1.0;
            c.concordant += less;
            c.tied_risk += tie;
            c.discordant += more;
            c.comparable += inserted;
            c.tied_time += censored_here;
            c.numerator += w * (static_cast<double>(less) + 0.5 * static_cast<double>(tie));
            c.denominator += w * static_cast<double>(inserted);
        }
        for (size_t k = start; k < end; ++k) {
            const int64_t j = by_time[k];
            if (event[j]) { tree.add(rank[j]); ++inserted; }
        }
        start = end;
    }
    return c;
}

}  // namespace
}  // namespace lungcore

LUNGCORE_BINDINGS(concordance) {
    using lungcore::Array1d;
    m.def(
        "concordance_counts",
        [](Array1d<double> risk, Array1d<double> time, Array1d<uint8_t> event, py::object weight,
           double tied_tol) {
            const size_t n = static_cast<size_t>(risk.size());
            if (risk.ndim() != 1 || time.ndim() != 1 || event.ndim() != 1)
                throw std::invalid_argument("risk, time and event must be 1-D");
            if (static_cast<size_t>(time.size()) != n || static_cast<size_t>(event.size()) != n)
                throw std::invalid_argument("risk, time and event must have the same length");
            Array1d<double> w;
            const double* wp = nullptr;
            if (!weight.is_none()) {
                w = weight.cast<Array1d<double>>();
                if (w.ndim() != 1 || static_cast<size_t>(w.size()) != n)
                    throw std::invalid_argument("weight must be 1-D with the length of risk");
                wp = w.data();
            }
            lungcore::Counts c;
            {
                py::gil_scoped_release release;
                c = lungcore::concordance_counts_impl(risk.data(), time.data(), event.data(), wp, n, tied_tol);
            }
            py::dict out;
            out["numerator"] = c.numerator;
            out["denominator"] = c.denominator;
            out["concordant"] = c.concordant;
            out["discordant"] = c.discordant;
            out["tied_risk"] = c.tied_risk;
            out["tied_time"] = c.tied_time;
            out["comparable"] = c.comparable;
            return out;
        },
        py::arg("risk"), py::arg("time"), py::arg("event"), py::arg("weight") = py::none(),
        py::arg("tied_tol") = 0.0,
        "Harrell-style concordance counts in O(n log n); weight (per event) gives Uno's C.");
}
