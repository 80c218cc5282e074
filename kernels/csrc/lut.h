// Byte-wise table lookup dst[i] = table[src[i]] (AVX2 when the CPU has it), shared by
// label_lookup and photometric's brightness/contrast-only case. Defined in label_lookup.cpp.
#pragma once

#include <cstdint>

namespace kernels {

// src and dst may be the same buffer; table has 256 entries.
void lookup_bytes(const uint8_t* src, uint8_t* dst, int64_t n, const uint8_t* table);

}  // namespace kernels
