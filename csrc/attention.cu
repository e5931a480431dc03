// attention, CUDA: O = softmax(Q [K; K2]^T / sqrt(D)) [V; V2], the cascade's self+cross attention.
// Math: per (batch, head), online softmax over the key tiles of source 1 then source 2
//   (flash-attention 2): running row max m and row sum l in fp32, scores in the log2 domain
//   (scaled by log2(e)/sqrt(D)) so exponentials are exp2, the accumulator rescaled by
//   exp2(m_old - m_new) per tile and divided by l once at the end.
// Layout: q, out [B, Nq, H, D]; k, v [B, Nk, H, D]; k2, v2 [B, Nc, H, D] (null when Nc = 0), each
//   with its own element strides (batch, token, head) and a unit-stride head dim, so slices of a
//   fused qkv projection are read in place and the concatenation never exists in memory.
// bf16/fp16: grid (ceil(Nq / 64), H, B), 128 threads: 4 warps per 64 query rows, 16 rows a warp
//   (the mma M). Q is held in registers as mma A fragments; 64-key K and V tiles are staged in
//   shared memory with cp.async, double-buffered so the next tile loads while the tensor cores
//   work on the current one (37 KiB at D = 64, so several blocks share an SM and hide latency).
//   S = Q K^T and O += P V use mma.sync m16n8k16 with fp32 accumulators; the S accumulator layout
//   of two adjacent n8 tiles is exactly the A-fragment layout of one k16 step, so P goes from
//   softmax to the second mma without touching shared memory, and each thread's rows are known,
//   so the per-row rescale happens in registers. P is rounded to the input dtype for that mma.
//   Fragments are read with plain 32/16-bit shared loads on rows padded by 16 bytes, which keeps
//   them bank-conflict free; ldmatrix(.trans) would cut the load count (a tuning step left open).
// fp32: tensor cores would mean tf32 rounding, so a SIMT kernel: grid (ceil(Nq / 32), H, B),
//   128 threads, 8 query rows a warp; lane j scores key j of a 32-key tile and accumulates output
//   columns lane, lane + 32, ... of its 8 rows, all in fp32.
// Limits: D <= kAttentionCudaMaxHeadDim (128; padded to 32, 64 or 128 in shared memory and
//   registers), any Nq, Nk >= 1, Nc >= 0, B and H up to 65535. Global rows are copied 16 bytes at
//   a time when every pointer and stride is 16-byte aligned and D % 8 == 0, element-wise otherwise.
//   Needs sm_80 (mma.sync bf16, cp.async).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cascade_rt.h"

namespace cascade_rt {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// One [B, N, H, D] tensor as the kernels see it: base pointer and element strides.
struct View {
  const void* ptr;
  int64_t sb, sn, sh;
};

struct Params {
  View q, k, v, k2, v2;
  void* out;
  int64_t ob, on, oh;
  int nq, nk, nc, d;
  float scale_log2;  // log2(e) / sqrt(D)
  bool aligned;      // 16-byte copies allowed for every input row
};

// ---------------------------------------------------------------- bf16 / fp16: tensor cores

constexpr int kBM = 64;  // query rows a block: 16 a warp, the mma M
constexpr int kBN = 64;  // keys a tile
static_assert(kBM == kBN, "Q is staged in a K tile buffer");

template <int kD>
struct HalfTile {
  static constexpr int kLd = kD + 8;  // 16-byte row pad: rows shift by 4 banks, fragment loads
                                      // of 8 rows x 4 lanes hit 32 distinct banks
  static constexpr int kElems = kBN * kLd;
  // K and V, two buffers each. Q (kBM == kBN rows) is first loaded into K buffer 1, which is
  // free until tile 1 is prefetched, so it needs no space of its own.
  static constexpr int kSmemBytes = 4 * kElems * 2;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies rows [0, rows) of a [*, D] 16-bit row block (row stride `stride` elements) into a
// [kBN, kLd] shared tile, zero-filling rows >= rows and columns >= D: padded keys must give
// finite scores (they are then masked) and zero values (0 * garbage could be NaN).
template <int kD>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* g, int64_t stride,
                                          int rows, int d, bool aligned) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks a row
  for (int i = threadIdx.x; i < kBN * kChunks; i += kThreads) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    uint16_t* dst = smem + r * HalfTile<kD>::kLd + c;
    if (r < rows && aligned && c + 8 <= d) {
      cp_async16(dst, g + r * stride + c);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (r < rows && c + e < d) ? g[r * stride + c + e] : 0;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c[16x8] += a[16x16] b[16x8], fp32 accumulate. Fragments (PTX ISA, mma.m16n8k16; g = lane / 4,
// t = lane % 4; the lower column / row index sits in the low 16 bits of each register):
//   a0: (g, 2t..2t+1)  a1: (g+8, 2t..2t+1)  a2: (g, 2t+8..2t+9)  a3: (g+8, 2t+8..2t+9)
//   b0: (k 2t..2t+1, n g)  b1: (k 2t+8..2t+9, n g)
//   c0, c1: (g, 2t..2t+1)  c2, c3: (g+8, 2t..2t+1)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_mma_kernel(const Params p) {
  using Tile = HalfTile<kD>;
  constexpr int kLd = Tile::kLd;
  constexpr int kKSteps = kD / 16;  // k16 steps of S = Q K^T
  constexpr int kSTiles = kBN / 8;  // n8 tiles of S (keys)
  constexpr int kOTiles = kD / 8;   // n8 tiles of O (head dim)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem_raw);  // [2][kBN][kLd]
  uint16_t* vs = ks + 2 * Tile::kElems;                  // [2][kBN][kLd]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int row0 = blockIdx.x * kBM;

  const auto base = [&](const View& x) {
    return static_cast<const uint16_t*>(x.ptr) + b * x.sb + h * x.sh;
  };
  const uint16_t* k1 = base(p.k);
  const uint16_t* v1 = base(p.v);
  const uint16_t* k2 = p.nc > 0 ? base(p.k2) : nullptr;
  const uint16_t* v2 = p.nc > 0 ? base(p.v2) : nullptr;
  const int tiles1 = (p.nk + kBN - 1) / kBN;
  const int tiles = tiles1 + (p.nc + kBN - 1) / kBN;
  // Tile `i` of the virtual sequence [source 1 ; source 2]: K/V rows, token stride, valid rows.
  const auto issue_tile = [&](int i, int buf) {
    const bool first = i < tiles1;
    const int r0 = (first ? i : i - tiles1) * kBN;
    const int rows = (first ? p.nk : p.nc) - r0;
    const View& kv = first ? p.k : p.k2;
    const View& vv = first ? p.v : p.v2;
    load_tile<kD>(ks + buf * Tile::kElems, (first ? k1 : k2) + r0 * kv.sn, kv.sn, rows, p.d,
                  p.aligned);
    load_tile<kD>(vs + buf * Tile::kElems, (first ? v1 : v2) + r0 * vv.sn, vv.sn, rows, p.d,
                  p.aligned);
  };

  // Prologue: Q into K buffer 1 (one commit group), tile 0 into buffer 0 (the next group).
  load_tile<kD>(ks + Tile::kElems, base(p.q) + row0 * p.q.sn, p.q.sn, p.nq - row0, p.d, p.aligned);
  cp_async_commit();
  issue_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qa[kKSteps][4];
  {
    const uint16_t* qs = ks + Tile::kElems + (warp * 16) * kLd;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      qa[kk][0] = ld32(qs + g * kLd + kk * 16 + 2 * t);
      qa[kk][1] = ld32(qs + (g + 8) * kLd + kk * 16 + 2 * t);
      qa[kk][2] = ld32(qs + g * kLd + kk * 16 + 8 + 2 * t);
      qa[kk][3] = ld32(qs + (g + 8) * kLd + kk * 16 + 8 + 2 * t);
    }
  }
  __syncthreads();  // every warp holds its Q before tile 1 overwrites buffer 1

  float o[kOTiles][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp
  float l[2] = {0.f, 0.f};              // this thread's partial row sums (quad-reduced at the end)

  for (int i = 0; i < tiles; ++i) {
    const int buf = i & 1;
    if (i + 1 < tiles) issue_tile(i + 1, buf ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = tile i
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* kt = ks + buf * Tile::kElems;
    const uint16_t* vt = vs + buf * Tile::kElems;
    const bool first = i < tiles1;
    const int valid = (first ? p.nk - i * kBN : p.nc - (i - tiles1) * kBN);  // >= 1

    // S = Q K^T for this warp's 16 rows x 64 keys. B[k=d][n=key] = K[key][d]: pairs along d
    // are adjacent in shared memory, so each b register is one 32-bit load.
    float s[kSTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        const uint16_t* kr = kt + (j * 8 + g) * kLd + kk * 16 + 2 * t;
        mma16816<T>(s[j], qa[kk], ld32(kr), ld32(kr + 8));
      }
    }

    // Online softmax. Each row lives in the 4 threads of a quad, so row reductions are two
    // xor-shuffles; the row sum stays per-thread until the end since alpha is quad-uniform.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j * 8 + 2 * t + (e & 1);
        const float x = key < valid ? s[j][e] * p.scale_log2 : -INFINITY;
        s[j][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      alpha[r] = exp2f(m[r] - mx[r]);  // 0 on the first tile, where m = -inf
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m[e >> 1]);
        l[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V. The A fragment of k-step kk is S tiles 2kk (a0, a1) and 2kk + 1 (a2, a3).
    // B[k=key][n=d] = V[key][d]: pairs along keys are a row apart, so two 16-bit loads each.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint16_t* vr = vt + (kk * 16 + 2 * t) * kLd + g;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        const uint16_t* c = vr + j * 8;
        const uint32_t b0 = c[0] | (static_cast<uint32_t>(c[kLd]) << 16);
        const uint32_t b1 = c[8 * kLd] | (static_cast<uint32_t>(c[9 * kLd]) << 16);
        mma16816<T>(o[j], pa, b0, b1);
      }
    }
    __syncthreads();  // every warp is done with `buf` before iteration i + 1 refills it
  }

  // Normalize and store rows g and g + 8 of this warp.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  T* out = static_cast<T*>(p.out) + b * p.ob + h * p.oh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + warp * 16 + g + 8 * r;
    if (row >= p.nq) continue;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j * 8 + 2 * t + e;
        if (col < p.d) out[row * p.on + col] = static_cast<T>(o[j][2 * r + e] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------- fp32: SIMT

constexpr int kRowsPerWarp = 8;
constexpr int kFBM = kWarps * kRowsPerWarp;  // query rows a block
constexpr int kFBN = 32;                     // keys a tile: one per lane

template <int kD>
struct FloatTile {
  static constexpr int kKLd = kD + 1;  // lane j reads row j of K: an odd stride spreads banks
  static constexpr int kSmemBytes = (kFBM * kD + kFBN * kKLd + kFBN * kD) * 4;
};

template <int kD>
__device__ __forceinline__ void load_rows_f32(float* smem, int ld, const float* g, int64_t stride,
                                              int rows, int max_rows, int d) {
  for (int i = threadIdx.x; i < max_rows * kD; i += kThreads) {
    const int r = i / kD;
    const int c = i % kD;
    smem[r * ld + c] = (r < rows && c < d) ? g[r * stride + c] : 0.f;
  }
}

template <int kD>
__global__ void __launch_bounds__(kThreads) attention_f32_kernel(const Params p) {
  using Tile = FloatTile<kD>;
  constexpr int kCols = kD / 32;  // output columns a lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qs = reinterpret_cast<float*>(smem_raw);  // [kFBM][kD]
  float* ks = qs + kFBM * kD;                      // [kFBN][kKLd]
  float* vs = ks + kFBN * Tile::kKLd;              // [kFBN][kD]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int row0 = blockIdx.x * kFBM;
  const auto base = [&](const View& x) {
    return static_cast<const float*>(x.ptr) + b * x.sb + h * x.sh;
  };
  load_rows_f32<kD>(qs, kD, base(p.q) + row0 * p.q.sn, p.q.sn, p.nq - row0, kFBM, p.d);

  float o[kRowsPerWarp][kCols] = {};
  float m[kRowsPerWarp];
  float l[kRowsPerWarp] = {};  // per-lane partial sums over the keys this lane scored
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) m[r] = -INFINITY;
  const float* qw = qs + warp * kRowsPerWarp * kD;

  for (int src = 0; src < 2; ++src) {
    const int n = src == 0 ? p.nk : p.nc;
    const float* kg = n > 0 ? base(src == 0 ? p.k : p.k2) : nullptr;
    const float* vg = n > 0 ? base(src == 0 ? p.v : p.v2) : nullptr;
    const int64_t ksn = src == 0 ? p.k.sn : p.k2.sn;
    const int64_t vsn = src == 0 ? p.v.sn : p.v2.sn;
    for (int r0 = 0; r0 < n; r0 += kFBN) {
      __syncthreads();  // the previous tile is consumed (and, at the start, Q is stored)
      load_rows_f32<kD>(ks, Tile::kKLd, kg + r0 * ksn, ksn, n - r0, kFBN, p.d);
      load_rows_f32<kD>(vs, kD, vg + r0 * vsn, vsn, n - r0, kFBN, p.d);
      __syncthreads();
      const bool valid = r0 + lane < n;
      float s[kRowsPerWarp] = {};
      for (int c = 0; c < kD; c += 4) {
        float kc[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) kc[e] = ks[lane * Tile::kKLd + c + e];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 q4 = *reinterpret_cast<const float4*>(qw + r * kD + c);  // broadcast
          s[r] = fmaf(q4.x, kc[0], fmaf(q4.y, kc[1], fmaf(q4.z, kc[2], fmaf(q4.w, kc[3], s[r]))));
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float x = valid ? s[r] * p.scale_log2 : -INFINITY;
        float mx = fmaxf(m[r], x);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float alpha = exp2f(m[r] - mx);  // 0 on the first tile, where m = -inf
        m[r] = mx;
        s[r] = exp2f(x - mx);
        l[r] = l[r] * alpha + s[r];
#pragma unroll
        for (int c = 0; c < kCols; ++c) o[r][c] *= alpha;
      }
      const int keys = min(kFBN, n - r0);
      for (int j = 0; j < keys; ++j) {
        float vj[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) vj[c] = vs[j * kD + lane + 32 * c];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float pj = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
          for (int c = 0; c < kCols; ++c) o[r][c] = fmaf(pj, vj[c], o[r][c]);
        }
      }
    }
  }

  float* out = static_cast<float*>(p.out) + b * p.ob + h * p.oh;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    float sum = l[r];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const int row = row0 + warp * kRowsPerWarp + r;
    if (row >= p.nq) continue;
    const float inv = 1.f / sum;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < p.d) out[row * p.on + col] = o[r][c] * inv;
    }
  }
}

// ---------------------------------------------------------------- host

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int smem, cudaStream_t stream, const Params& p) {
  if (smem > 48 * 1024) {
    // Above 48 KiB a kernel must opt in; not a stream operation, so safe inside graph capture.
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("attention_cuda: shared memory opt-in failed: ") +
                               cudaGetErrorString(err));
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

template <typename T>
void launch_mma(const Params& p, int64_t batch, int64_t heads, cudaStream_t stream) {
  const dim3 grid((p.nq + kBM - 1) / kBM, static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  if (p.d <= 32) {
    launch(attention_mma_kernel<T, 32>, grid, HalfTile<32>::kSmemBytes, stream, p);
  } else if (p.d <= 64) {
    launch(attention_mma_kernel<T, 64>, grid, HalfTile<64>::kSmemBytes, stream, p);
  } else {
    launch(attention_mma_kernel<T, 128>, grid, HalfTile<128>::kSmemBytes, stream, p);
  }
}

void launch_f32(const Params& p, int64_t batch, int64_t heads, cudaStream_t stream) {
  const dim3 grid((p.nq + kFBM - 1) / kFBM, static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  if (p.d <= 32) {
    launch(attention_f32_kernel<32>, grid, FloatTile<32>::kSmemBytes, stream, p);
  } else if (p.d <= 64) {
    launch(attention_f32_kernel<64>, grid, FloatTile<64>::kSmemBytes, stream, p);
  } else {
    launch(attention_f32_kernel<128>, grid, FloatTile<128>::kSmemBytes, stream, p);
  }
}

bool aligned16(const void* ptr, const AttentionStrides& s) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 &&
         s[2] % 8 == 0;
}

}  // namespace

void attention_cuda(const void* q, const void* k, const void* v, const void* k2, const void* v2,
                    void* out, int64_t batch, int64_t heads, int64_t head_dim, int64_t nq,
                    int64_t nk, int64_t nc, const AttentionStrides& q_strides,
                    const AttentionStrides& k_strides, const AttentionStrides& v_strides,
                    const AttentionStrides& k2_strides, const AttentionStrides& v2_strides,
                    const AttentionStrides& out_strides, int dtype, void* stream) {
  if (head_dim < 1 || head_dim > kAttentionCudaMaxHeadDim) {
    throw std::invalid_argument("attention_cuda: head dim out of range");
  }
  if (batch < 1 || batch > 65535 || heads < 1 || heads > 65535 || nk < 1 || nc < 0 ||
      nq > INT32_MAX || nk > INT32_MAX || nc > INT32_MAX) {
    throw std::invalid_argument("attention_cuda: sizes out of range");
  }
  if (nc > 0 && (k2 == nullptr || v2 == nullptr)) {
    throw std::invalid_argument("attention_cuda: Nc > 0 needs k2 and v2");
  }
  if (nq == 0) return;
  const auto view = [](const void* ptr, const AttentionStrides& s) {
    return View{ptr, s[0], s[1], s[2]};
  };
  Params p{};
  p.q = view(q, q_strides);
  p.k = view(k, k_strides);
  p.v = view(v, v_strides);
  p.k2 = view(k2, k2_strides);
  p.v2 = view(v2, v2_strides);
  p.out = out;
  p.ob = out_strides[0];
  p.on = out_strides[1];
  p.oh = out_strides[2];
  p.nq = static_cast<int>(nq);
  p.nk = static_cast<int>(nk);
  p.nc = static_cast<int>(nc);
  p.d = static_cast<int>(head_dim);
  p.scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  p.aligned = head_dim % 8 == 0 && aligned16(q, q_strides) && aligned16(k, k_strides) &&
              aligned16(v, v_strides) &&
              (nc == 0 || (aligned16(k2, k2_strides) && aligned16(v2, v2_strides)));
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_f32(p, batch, heads, s);
      break;
    case kFloat16:
      launch_mma<__half>(p, batch, heads, s);
      break;
    case kBFloat16:
      launch_mma<__nv_bfloat16>(p, batch, heads, s);
      break;
    default:
      throw std::invalid_argument("attention_cuda: unsupported dtype tag");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("attention_cuda: launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace cascade_rt
