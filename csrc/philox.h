// Philox4x32-10 counter-based RNG: the one definition of mmattn's dropout mask.
//
// Bit-identical to Triton's `tl.rand(seed, offset)` when `counter1 == counter2 == 0`
// (the round constants, key schedule and uint -> float map are the same), and to
// mmattn/philox.py. Header-only so CPU (.cpp) and CUDA (.cu) code share it.
//
// Dropout convention (see mmattn/philox.py): for attention probability element
// (b, h, i, j) of a (B, H, Lq, Lk) tensor, with n = i * Lk + j in 64 bits:
// counter0 = low word of n, counter1 = b * H + h (mod 2^32), counter2 = high word
// of n (0 whenever Lq * Lk < 2^32); the element is kept when
// uniform(seed, counter0, counter1, counter2) >= p. dropout_uniform() applies it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMATTN_HOST_DEVICE inline
#endif

namespace mmattn {

MMATTN_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32 with 10 rounds for counter (c0, c1, c2, 0)
// and key (seed & 0xffffffff, seed >> 32).
MMATTN_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint32_t c0, uint32_t c1,
                                        uint32_t c2 = 0u) {
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = philox_mulhi(0xCD9E8D57u, prev_c2) ^ c1 ^ k0;
    c2 = philox_mulhi(0xD2511F53u, prev_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev_c2;
    c3 = 0xD2511F53u * prev_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's uint -> [0, 1) map: reinterpret as int32, fold negatives with ~x,
// then one float32 multiply (so every backend rounds identically).
MMATTN_HOST_DEVICE float philox_uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

MMATTN_HOST_DEVICE float philox_uniform(uint64_t seed, uint32_t c0, uint32_t c1,
                                        uint32_t c2 = 0u) {
  return philox_uint_to_uniform(philox_word(seed, c0, c1, c2));
}

// The dropout uniform of element `flat_index = i * Lk + j` of head `batch_head = b * H + h`.
MMATTN_HOST_DEVICE float dropout_uniform(uint64_t seed, uint64_t flat_index, uint64_t batch_head) {
  return philox_uniform(seed, static_cast<uint32_t>(flat_index), static_cast<uint32_t>(batch_head),
                        static_cast<uint32_t>(flat_index >> 32));
}

}  // namespace mmattn
