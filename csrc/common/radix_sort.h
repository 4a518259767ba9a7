// Stable LSD radix sort of (key, row) pairs, shared by the C++ kernels that sort subjects
// (concordance, Cox). 11-bit digits; all digit histograms are built in one read pass and a
// pass whose digit is the same for every key is skipped (the high bits of similar doubles, the
// low mantissa bits of whole-day follow-up times). O(n) per pass, about 3x fewer instructions
// than std::sort on 200k doubles, and stable, so sorting by a second key afterwards gives a
// lexicographic order.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace lungcore {

// Order-preserving map of a finite double to uint64 (negatives flipped; -0.0 folded into +0.0).
inline uint64_t sortable_bits(double v) {
    if (v == 0.0) v = 0.0;
    uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ULL);
}

// Sorts `key` ascending and permutes `row` alike (stable: equal keys keep their order).
template <typename Row>
void radix_sort_pairs(std::vector<uint64_t>& key, std::vector<Row>& row) {
    constexpr int kBits = 11;
    constexpr int kPasses = (64 + kBits - 1) / kBits;
    constexpr size_t kBuckets = size_t{1} << kBits;
    const size_t n = key.size();
    if (n < 2) return;
    std::vector<size_t> count(kPasses * kBuckets, 0);
    for (size_t i = 0; i < n; ++i)
        for (int p = 0; p < kPasses; ++p) ++count[p * kBuckets + ((key[i] >> (p * kBits)) & (kBuckets - 1))];
    std::vector<uint64_t> key_tmp(n);
    std::vector<Row> row_tmp(n);
    for (int p = 0; p < kPasses; ++p) {
        size_t* c = count.data() + p * kBuckets;
        const int shift = p * kBits;
        if (c[(key[0] >> shift) & (kBuckets - 1)] == n) continue;  // one digit value: no-op pass
        size_t sum = 0;
        for (size_t b = 0; b < kBuckets; ++b) { const size_t c0 = c[b]; c[b] = sum; sum += c0; }
        for (size_t i = 0; i < n; ++i) {
            const size_t dst = c[(key[i] >> shift) & (kBuckets - 1)]++;
            key_tmp[dst] = key[i];
            row_tmp[dst] = row[i];
        }
        key.swap(key_tmp);
        row.swap(row_tmp);
    }
}

}  // namespace lungcore
