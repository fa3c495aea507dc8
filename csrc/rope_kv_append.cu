// florenz::rope_kv_append: RoPE on the new tokens' q and k, and the KV-cache append (k rotated, v as is) into
// slot position % C, in one launch. No torch headers: see decode.h.
//
// Why fuse: in the unfused decode step this is, per layer, the angle product, cat, cos, sin, two casts, the two
// rotate-halfs (chunk, neg, cat), four multiplies, two adds, the slot arithmetic and two index_copy_ launches:
// ~20 kernels of a few hundred bytes each, i.e. ~520 launches per token for Gemma-2-2B's 26 layers, each
// costing ~2-4 us of launch/latency at batch 1 where the attention itself reads ~8 MB per layer (~3 us at
// 3 TB/s). One launch per layer instead; bench/bench_decode.py times both.
//
// Grid (B * Lq, H + Hk): block y < H rotates query head y, y >= H rotates key head y - H and copies its value;
// one thread per rotation pair (j, j + D/2). Angles: fp32 product position * inv_freq[j] (the model's buffer,
// so every implementation uses the same frequencies), reduced mod 2*pi in fp64, then __sincosf (abs error
// ~1e-6 on [-pi, pi]; CUDA's accurate sincosf has a local-memory slow path for huge arguments, which the static
// no-spill check would flag). Rotation in fp32, one rounding to the output dtype.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_convert.cuh"
#include "decode.h"

namespace florenz {
namespace {

template <typename T>
__global__ void rope_kv_append_kernel(const RopeAppendParams p) {
  const int bi = blockIdx.x;
  const int b = bi / p.Lq, i = bi % p.Lq;
  const int head = blockIdx.y;
  const int half = p.D / 2;
  const int len = p.lens[b];
  const int pos = len - p.Lq + i;
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const float angle = static_cast<float>(pos) * p.inv_freq[j];
    const double two_pi = 6.283185307179586;
    const double a = static_cast<double>(angle);
    const float red = static_cast<float>(a - two_pi * rint(a * (1.0 / two_pi)));
    float sn, cs;
    __sincosf(red, &sn, &cs);
    const T* src;
    T* dst;
    if (head < p.H) {
      src = static_cast<const T*>(p.q) + b * p.q_sb + head * p.q_sh + i * p.q_sl;
      dst = static_cast<T*>(p.q_out) + ((static_cast<int64_t>(b) * p.H + head) * p.Lq + i) * p.D;
    } else {
      const int kh = head - p.H;
      if (pos < 0) continue;  // len < Lq: the binding rejects this; stay in bounds regardless
      const int slot = pos % p.C;
      src = static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh + i * p.k_sl;
      dst = static_cast<T*>(p.k_cache) + b * p.kc_sb + kh * p.kc_sh + slot * p.kc_ss;
      const T* vs = static_cast<const T*>(p.v) + b * p.v_sb + kh * p.v_sh + i * p.v_sl;
      T* vd = static_cast<T*>(p.v_cache) + b * p.vc_sb + kh * p.vc_sh + slot * p.vc_ss;
      vd[j] = vs[j];
      vd[j + half] = vs[j + half];
    }
    const float x1 = to_float(src[j]), x2 = to_float(src[j + half]);
    dst[j] = from_float<T>(x1 * cs - x2 * sn);
    dst[j + half] = from_float<T>(x2 * cs + x1 * sn);
  }
}

}  // namespace

const char* launch_rope_kv_append(const RopeAppendParams& p, DType dtype, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dim3 grid(p.B * p.Lq, p.H + p.Hk);
  const int threads = p.D / 2 < 128 ? p.D / 2 : 128;
  switch (dtype) {
    case DType::F16: rope_kv_append_kernel<__half><<<grid, threads, 0, s>>>(p); break;
    case DType::BF16: rope_kv_append_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(p); break;
    default: return "rope_kv_append on CUDA supports float16 and bfloat16";
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace florenz
