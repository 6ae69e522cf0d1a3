// A thread-level CPU emulator for ffa's CUDA kernels, so that the real kernel sources run (slowly)
// on a machine without a GPU: every CUDA thread of a block is an std::thread, __syncthreads is an
// std::barrier over the block, warp shuffles / ldmatrix / mma.sync exchange values through a
// per-warp buffer between two warp barriers, with the PTX ISA's fragment layouts. Blocks run one at a
// time, so __shared__ variables (made `static` by run.py) are the block's shared memory.
// cp.async is an immediate copy (the kernels' barriers make that equivalent). Force-included by
// tools/cuda_emu/run.py, which also rewrites `k<<<g, b, smem, stream>>>(args)` into a call of
// ffa_emu_launch. Not a simulator of timing or of races the barriers do not order.
#pragma once
#define __host__
#define __device__
#define __global__
#define __shared__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#undef __launch_bounds__
#define __launch_bounds__(...)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace ffa_emu {

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<unsigned char> slots;  // [warps][32 lanes][64 bytes]
};
inline thread_local Block* block = nullptr;

inline unsigned char* slot(int lane) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  return block->slots.data() + (warp * 32 + lane) * 64;
}
inline void warp_sync() { block->warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

inline std::vector<unsigned char>& dyn_smem() {
  static std::vector<unsigned char> mem(256 * 1024);
  return mem;
}

}  // namespace ffa_emu

inline unsigned char* ffa_emu_dynamic_smem() { return ffa_emu::dyn_smem().data(); }

inline void __syncthreads() { ffa_emu::block->bar->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  std::memcpy(ffa_emu::slot(ffa_emu::lane_id()), &v, sizeof(T));
  ffa_emu::warp_sync();
  T out;
  std::memcpy(&out, ffa_emu::slot(ffa_emu::lane_id() ^ mask), sizeof(T));
  ffa_emu::warp_sync();
  return out;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int min(int a, int b) { return a < b ? a : b; }

// Launch: blocks in order, each with blockDim.x threads (1-D blocks only, as ffa's kernels use).
inline void ffa_emu_launch(dim3 grid, dim3 blk, size_t smem, cudaStream_t,
                           const std::function<void()>& body) {
  if (smem > ffa_emu::dyn_smem().size()) ffa_emu::dyn_smem().resize(smem);
  const unsigned nt = blk.x * blk.y * blk.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        ffa_emu::Block b;
        b.bar = std::make_unique<std::barrier<>>(nt);
        for (unsigned w = 0; w < (nt + 31) / 32; ++w)
          b.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        b.slots.resize(((nt + 31) / 32) * 32 * 64);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            ffa_emu::block = &b;
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{x, y, z};
            blockDim = blk;
            gridDim = grid;
            body();
          });
        for (auto& th : threads) th.join();
      }
}

template <typename F>
cudaError_t ffa_emu_func_set_attribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t ffa_emu_get_last_error() { return cudaSuccess; }
#define cudaFuncSetAttribute ffa_emu_func_set_attribute
#define cudaGetLastError ffa_emu_get_last_error

// ---- PTX wrappers (replace the inline-asm versions of csrc/cuda/device.cuh) -----------------
namespace ffa::cuda {

inline void cp_async16(void* smem, const void* gmem) { std::memcpy(smem, gmem, 16); }
inline void cp_async_commit() {}
template <int kPending>
inline void cp_async_wait() {}

// cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits.
inline float round_tf32(float v) {
  if (!std::isfinite(v)) return v;
  return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xFFFFE000u);
}

inline uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xFFFFu); }
inline uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

// ldmatrix .x4: lanes 8m .. 8m+7 give the row addresses of matrix m (8 x 8 16-bit elements).
inline void ldmatrix_emu(const void* p, uint32_t (&r)[4], bool trans) {
  const int lane = ffa_emu::lane_id();
  std::memcpy(ffa_emu::slot(lane), &p, sizeof(p));
  ffa_emu::warp_sync();
  auto row = [&](int m, int i) {
    const uint16_t* q;
    std::memcpy(&q, ffa_emu::slot(8 * m + i), sizeof(q));
    return q;
  };
  const int g = lane / 4, c = lane % 4;
  for (int m = 0; m < 4; ++m) {
    uint16_t e0, e1;
    if (!trans) {
      e0 = row(m, g)[2 * c];
      e1 = row(m, g)[2 * c + 1];
    } else {
      e0 = row(m, 2 * c)[g];
      e1 = row(m, 2 * c + 1)[g];
    }
    r[m] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
  }
  ffa_emu::warp_sync();
}
inline void ldmatrix_x4(const void* p, uint32_t (&r)[4]) { ldmatrix_emu(p, r, false); }
inline void ldmatrix_x4_trans(const void* p, uint32_t (&r)[4]) { ldmatrix_emu(p, r, true); }

template <typename E>
float half_bits_to_float(uint16_t b) {
  E v;
  std::memcpy(&v, &b, 2);
  return static_cast<float>(v);
}

struct MmaSlot {
  uint32_t a[4], b0, b1;
};

// m16n8k16: A (row g | g+8, k 2c,2c+1 | +8), B (k 2c,2c+1 | +8, n g), D (g | g+8, 2c, 2c+1).
template <typename E>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = ffa_emu::lane_id();
  MmaSlot mine{{a[0], a[1], a[2], a[3]}, b0, b1};
  std::memcpy(ffa_emu::slot(lane), &mine, sizeof(mine));
  ffa_emu::warp_sync();
  auto get = [&](int l) {
    MmaSlot s;
    std::memcpy(&s, ffa_emu::slot(l), sizeof(s));
    return s;
  };
  auto A = [&](int row, int k) {
    const MmaSlot s = get((row % 8) * 4 + (k % 8) / 2);
    const uint32_t r = s.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_bits_to_float<E>(k % 2 ? hi16(r) : lo16(r));
  };
  auto B = [&](int k, int col) {
    const MmaSlot s = get(col * 4 + (k % 8) / 2);
    const uint32_t r = k >= 8 ? s.b1 : s.b0;
    return half_bits_to_float<E>(k % 2 ? hi16(r) : lo16(r));
  };
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * c + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  ffa_emu::warp_sync();
}

// m16n8k8 TF32: A (row g | g+8, k c | c+4), B (k c | c+4, n g); operands truncated to TF32.
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = ffa_emu::lane_id();
  MmaSlot mine{{a[0], a[1], a[2], a[3]}, b0, b1};
  std::memcpy(ffa_emu::slot(lane), &mine, sizeof(mine));
  ffa_emu::warp_sync();
  auto get = [&](int l) {
    MmaSlot s;
    std::memcpy(&s, ffa_emu::slot(l), sizeof(s));
    return s;
  };
  auto tf32 = [](uint32_t r) { return __uint_as_float(r & 0xFFFFE000u); };
  auto A = [&](int row, int k) {
    const MmaSlot s = get((row % 8) * 4 + k % 4);
    return tf32(s.a[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
  };
  auto B = [&](int k, int col) {
    const MmaSlot s = get(col * 4 + k % 4);
    return tf32(k >= 4 ? s.b1 : s.b0);
  };
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * c + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 8; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  ffa_emu::warp_sync();
}

}  // namespace ffa::cuda
