// Flash-decoding attention for one (or a few) new query tokens per sequence: florenz::decode_attention (self-
// attention over the KV cache, linear or sliding-window ring buffer) and florenz::cross_decode_attention (over an
// image's cached encoder K/V, shared by its beams). No torch headers: see decode.h for the semantics.
//
// Work split. Grid (splits, Hk * row_tiles, B): one CTA per sequence, KV head, tile of query rows and slice of
// the cache ("split"). The G * Lq query rows of one KV head share every K/V load (GQA). A CTA has 4 warps;
// a key row of D elements is read by D / 8 lanes with one 16-byte load each (D 256: a whole warp per key,
// D 64: four keys per warp), so every load is a full, coalesced 512-byte row segment. Each lane group keeps
// its own online-softmax state over a strided stream of slots, KCH keys per step with all 2*KCH loads issued
// before any math (memory-level parallelism is what a bandwidth-bound kernel needs). At the end the groups are
// merged through shared memory; with one split the CTA writes the output, otherwise an fp32 partial and its
// log-sum-exp, which a second kernel merges (the "second reduction pass").
//
// Decode is bandwidth-bound: a K/V byte is used for ~G*Lq FMAs, so CUDA cores suffice for the usual G*Lq <= 8.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_convert.cuh"
#include "decode.h"

namespace florenz {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 8 consecutive 16-bit elements (one 16-byte load) to fp32
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&out)[8]);

template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& raw, float (&out)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __half22float2(h[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& raw, float (&out)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __bfloat1622float2(h[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}

// c * tanh(x / c) through one exp: tanh(y) = 1 - 2 / (exp(2y) + 1). Absolute error ~1e-7 in tanh (5e-6 in a
// score capped at 50), far below what bf16/fp16 inputs carry; exp overflow gives exactly +-1.
__device__ __forceinline__ float softcap_fn(float x, float cap) {
  const float e = __expf(2.0f * x / cap);
  return cap - 2.0f * cap / (e + 1.0f);
}

template <typename T, int D, int ROWS, int KCH>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeAttnParams p) {
  constexpr int LANES = D / 8;       // lanes per key row
  constexpr int KPW = 32 / LANES;    // keys per warp step
  constexpr int NG = kWarps * KPW;   // independent lane groups (key streams) per CTA
  constexpr int STEP = NG * KCH;     // slots per CTA step

  __shared__ float sm_acc[NG][ROWS][D];
  __shared__ float sm_m[NG][ROWS];
  __shared__ float sm_l[NG][ROWS];
  __shared__ float sm_w[NG][ROWS];
  __shared__ float sm_M[ROWS];
  __shared__ float sm_L[ROWS];

  const int G = p.H / p.Hk;
  const int rows = G * p.Lq;
  const int tiles = (rows + ROWS - 1) / ROWS;
  const int split = blockIdx.x;
  const int hk = blockIdx.y / tiles;
  const int tile = blockIdx.y % tiles;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp * KPW + lane / LANES;
  const int dl = lane % LANES;  // this lane's 8 dims: [dl * 8, dl * 8 + 8)

  const int kvb = p.kv_index ? p.kv_index[b] : b;
  const int len = p.lens[kvb];
  const int n_slots = min(len, p.C);
  const int per_split = (p.C + p.splits - 1) / p.splits;
  const int s0 = split * per_split;
  const int s1 = min(n_slots, s0 + per_split);

  // query rows of this tile: row r -> head h_r, query index i_r, position pq_r
  float qf[ROWS][8];
  int pq[ROWS];
  bool row_ok[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int gr = tile * ROWS + r;
    row_ok[r] = gr < rows;
    const int h = hk * G + (row_ok[r] ? gr / p.Lq : 0);
    const int i = row_ok[r] ? gr % p.Lq : 0;
    pq[r] = p.causal ? len - p.Lq + i : len - 1;
    if (row_ok[r]) {
      const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_sl + dl * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) qf[r][j] = to_float(qp[j]) * p.scale;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) qf[r][j] = 0.0f;
    }
  }

  float m[ROWS], l[ROWS], acc[ROWS][8];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[r][j] = 0.0f;
  }

  const T* kbase = static_cast<const T*>(p.k) + kvb * p.k_sb + hk * p.k_sh + dl * 8;
  const T* vbase = static_cast<const T*>(p.v) + kvb * p.v_sb + hk * p.v_sh + dl * 8;

  for (int base = s0; base < s1; base += STEP) {
    uint4 kr[KCH], vr[KCH];
    int slot[KCH];
#pragma unroll
    for (int c = 0; c < KCH; ++c) {
      slot[c] = base + c * NG + group;
      if (slot[c] < s1) {
        kr[c] = __ldg(reinterpret_cast<const uint4*>(kbase + slot[c] * p.k_ss));
        vr[c] = __ldg(reinterpret_cast<const uint4*>(vbase + slot[c] * p.v_ss));
      } else {
        kr[c] = make_uint4(0, 0, 0, 0);
        vr[c] = make_uint4(0, 0, 0, 0);
      }
    }
    float sc[KCH][ROWS];
#pragma unroll
    for (int c = 0; c < KCH; ++c) {
      float kf[8];
      to_float8<T>(kr[c], kf);
      const bool valid = slot[c] < s1;
      const int pos = valid ? slot[c] + p.C * ((len - 1 - slot[c]) / p.C) : 0;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) d = fmaf(qf[r][j], kf[j], d);
#pragma unroll
        for (int off = LANES / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
        if (p.softcap > 0.0f) d = softcap_fn(d, p.softcap);
        const bool vis = valid && row_ok[r] && pos <= pq[r] && (p.window == 0 || pq[r] - pos < p.window);
        sc[c][r] = vis ? d : neg_inf();
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float mx = m[r];
#pragma unroll
      for (int c = 0; c < KCH; ++c) mx = fmaxf(mx, sc[c][r]);
      const float mu = mx == neg_inf() ? 0.0f : mx;  // all masked so far: keep everything at zero
      const float alpha = __expf(m[r] - mu);
      m[r] = mx;
      l[r] *= alpha;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] *= alpha;
#pragma unroll
      for (int c = 0; c < KCH; ++c) {
        sc[c][r] = __expf(sc[c][r] - mu);
        l[r] += sc[c][r];
      }
    }
#pragma unroll
    for (int c = 0; c < KCH; ++c) {
      float vf[8];
      to_float8<T>(vr[c], vf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r][j] = fmaf(sc[c][r], vf[j], acc[r][j]);
      }
    }
  }

  // merge the NG lane groups
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (dl == 0) {
      sm_m[group][r] = m[r];
      sm_l[group][r] = l[r];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) sm_acc[group][r][dl * 8 + j] = acc[r][j];
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    float M = neg_inf();
    for (int g = 0; g < NG; ++g) M = fmaxf(M, sm_m[g][r]);
    const float mu = M == neg_inf() ? 0.0f : M;
    float L = 0.0f;
    for (int g = 0; g < NG; ++g) {
      const float w = __expf(sm_m[g][r] - mu);
      sm_w[g][r] = w;
      L += w * sm_l[g][r];
    }
    sm_M[r] = M;
    sm_L[r] = L;
  }
  __syncthreads();

  for (int e = threadIdx.x; e < ROWS * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int gr = tile * ROWS + r;
    if (gr >= rows) continue;
    const int h = hk * G + gr / p.Lq, i = gr % p.Lq;
    float o = 0.0f;
#pragma unroll
    for (int g = 0; g < NG; ++g) o = fmaf(sm_w[g][r], sm_acc[g][r][d], o);
    const float L = sm_L[r];
    o = L > 0.0f ? o / L : 0.0f;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[b * p.o_sb + h * p.o_sh + i * p.o_sl + d] = from_float<T>(o);
    } else {
      const int64_t row = (static_cast<int64_t>(b) * p.H + h) * p.Lq + i;
      p.part_out[(row * p.splits + split) * D + d] = o;
      if (d == 0) p.part_lse[row * p.splits + split] = L > 0.0f ? sm_M[r] + __logf(L) : neg_inf();
    }
  }
}

// second pass: one CTA per query row, one thread per output element
template <typename T>
__global__ void decode_combine_kernel(const DecodeAttnParams p) {
  const int row = blockIdx.x;  // (b * H + h) * Lq + i
  const int i = row % p.Lq, h = (row / p.Lq) % p.H, b = row / (p.Lq * p.H);
  const float* lse = p.part_lse + static_cast<int64_t>(row) * p.splits;
  float M = neg_inf();
  for (int s = 0; s < p.splits; ++s) M = fmaxf(M, lse[s]);
  const float mu = M == neg_inf() ? 0.0f : M;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.0f, W = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      const float w = __expf(lse[s] - mu);
      W += w;
      o = fmaf(w, p.part_out[(static_cast<int64_t>(row) * p.splits + s) * p.D + d], o);
    }
    o = W > 0.0f ? o / W : 0.0f;
    static_cast<T*>(p.out)[b * p.o_sb + h * p.o_sh + i * p.o_sl + d] = from_float<T>(o);
  }
}

template <typename T, int D, int ROWS>
cudaError_t launch_split(const DecodeAttnParams& p, cudaStream_t stream) {
  // more keys in flight per step when few rows keep registers free (no spills: tests/test_decode_build.py)
  constexpr int KCH = ROWS <= 2 ? 4 : 2;
  const int tiles = (p.H / p.Hk * p.Lq + ROWS - 1) / ROWS;
  dim3 grid(p.splits, p.Hk * tiles, p.B);
  decode_split_kernel<T, D, ROWS, KCH><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  const int threads = D < 128 ? D : 128;
  decode_combine_kernel<T><<<p.B * p.H * p.Lq, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_rows(const DecodeAttnParams& p, cudaStream_t stream) {
  switch (decode_row_tile(p.H / p.Hk * p.Lq)) {
    case 2: return launch_split<T, D, 2>(p, stream);
    case 4: return launch_split<T, D, 4>(p, stream);
    default: return launch_split<T, D, 8>(p, stream);
  }
}

template <typename T>
cudaError_t launch_dim(const DecodeAttnParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch_rows<T, 64>(p, stream);
    case 128: return launch_rows<T, 128>(p, stream);
    case 256: return launch_rows<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;  // the binding allows only these
  }
}

}  // namespace

int decode_row_tile(int rows) { return rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

int decode_num_splits(int ctas, int C, int device) {
  // Aim at ~8 CTAs per SM so that per-sequence length differences and the last wave even out, but keep
  // >= 128 slots per split: the fp32 partials (H * Lq * D * 4 bytes per split and sequence) stay ~1% of the
  // K/V bytes read at D 256, G 2. Measured choice: bench/bench_decode.py.
  static int sms[64] = {0};
  int n = 0;
  if (device >= 0 && device < 64) {
    if (sms[device] == 0) cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device);
    n = sms[device];
  }
  if (n <= 0) n = 108;
  const int want = (8 * n + ctas - 1) / ctas;
  const int most = (C + 127) / 128;
  int s = want < most ? want : most;
  return s < 1 ? 1 : s;
}

const char* launch_decode_attention(const DecodeAttnParams& p, DType dtype, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case DType::F16: err = launch_dim<__half>(p, s); break;
    case DType::BF16: err = launch_dim<__nv_bfloat16>(p, s); break;
    default: return "decode attention on CUDA supports float16 and bfloat16";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace florenz
