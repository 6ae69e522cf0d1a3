// Counter-based Gaussian probes for FFA: Z[i, j] is a pure function of (seed, offset, i * k + j),
// so the CUDA kernels regenerate Z on the fly (never stored) and the CPU fallback regenerates the
// same values. Torch-free and CUDA-free: compiled by g++ (CPU op) and nvcc (kernels) alike.
//
// Generator: Philox4x32-10 (Salmon et al., SC'11; same rounds and constants as Random123 and
// curand_Philox4x32_10). Element e = i * k + j of the [N, k] probe matrix (shared by the batch)
// uses block g = e / 4 with the 128-bit counter (lo64 = offset / 4 + g, hi64 = 0) and key = seed,
// lane e % 4 of the 4 outputs. `offset` is the torch.Generator's Philox offset (counted in 32-bit
// draws, a multiple of 4, as torch's CUDA generator counts it); a call consumes philox_increment(N
// * k) draws, so the caller advances the generator by that much and calls never overlap. Normals:
// Box-Muller on the pairs (r0, r1) and (r2, r3), evaluated in double:
//   u1 = (r0 + 1) 2^-32 in (0, 1], u2 = r1 2^-32, z0 = sqrt(-2 ln u1) cos(2 pi u2), z1 = ... sin.
// The 32-bit stream is bitwise identical on host and device; after the double transform only libm's
// last-ulp differences remain, which rounding to float almost always hides (|dz| <= ~1e-15 |z|).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FFA_HD __host__ __device__ __forceinline__
#else
#define FFA_HD inline
#endif

namespace ffa::philox {

struct U4 {
  uint32_t x, y, z, w;
};

FFA_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter c under key (k0, k1).
FFA_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c.x, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c.z, &hi1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Draws (32-bit values) one call with n = N * k probes consumes; a multiple of 4 as torch requires.
FFA_HD uint64_t philox_increment(uint64_t n) { return (n + 3) / 4 * 4; }

// Four standard normals z[4g .. 4g+3] of block g.
FFA_HD void normal4(uint64_t seed, uint64_t offset, uint64_t g, double z[4]) {
  const uint64_t ctr = offset / 4 + g;
  const U4 r =
      philox4x32_10(U4{static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u},
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr double kInv2p32 = 2.3283064365386963e-10;  // 2^-32
  constexpr double kTwoPi = 6.283185307179586;
  const uint32_t a[2] = {r.x, r.z}, b[2] = {r.y, r.w};
  for (int h = 0; h < 2; ++h) {
    const double u1 = (static_cast<double>(a[h]) + 1.0) * kInv2p32;  // (0, 1]: log finite
    const double u2 = static_cast<double>(b[h]) * kInv2p32;
    const double rad = sqrt(-2.0 * log(u1));
    const double ang = kTwoPi * u2;
    z[2 * h] = rad * cos(ang);
    z[2 * h + 1] = rad * sin(ang);
  }
}

// One probe value Z[e], e = i * k + j (callers that need many consecutive values use normal4).
FFA_HD double normal_at(uint64_t seed, uint64_t offset, uint64_t e) {
  double z[4];
  normal4(seed, offset, e / 4, z);
  return z[e % 4];
}

}  // namespace ffa::philox
