// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator curand and torch use. Host and
// device compute the same bits, so a dropout mask is regenerated in backward instead of stored, and
// the CPU and CUDA kernels drop the same elements for the same seed.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace lora_ext {

struct Philox4 {
  uint32_t v[4];
};

LORA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

LORA_HD Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Element e's dropout draw: word e % 4 of the Philox call for elements 4c..4c+3.
LORA_HD uint32_t dropout_draw(uint64_t e, uint64_t seed) {
  const Philox4 r = philox4x32_10(e >> 2, seed);
  // A select rather than r.v[e & 3]: a dynamic index would put r in local memory on the GPU.
  const uint32_t j = static_cast<uint32_t>(e & 3);
  return j == 0 ? r.v[0] : j == 1 ? r.v[1] : j == 2 ? r.v[2] : r.v[3];
}

// Dropout keep decision for element e. keep_threshold = round((1 - p) * 2^32), as a 64-bit value so
// p = 0 keeps everything.
LORA_HD bool dropout_keep(uint64_t e, uint64_t seed, uint64_t keep_threshold) {
  return static_cast<uint64_t>(dropout_draw(e, seed)) < keep_threshold;
}

}  // namespace lora_ext
