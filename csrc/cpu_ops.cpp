// CPU implementations of florenz::decode_attention / cross_decode_attention / rope_kv_append (same semantics as
// the CUDA kernels, see decode.h). No torch headers: plain loops over fp32 or fp64 data with element strides;
// the binding upcasts fp16 / bf16 to fp32 and parallelises over (sequence, KV head) pairs. fp32 inputs are
// accumulated in fp32 as on the GPU, fp64 in fp64 (so the tests can check the semantics exactly).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode.h"

namespace florenz {
namespace {

template <typename T>
void decode_attention_impl(const DecodeAttnParams& p, int64_t begin, int64_t end) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int G = p.H / p.Hk;
  std::vector<T> scores(std::max(p.C, 1));
  std::vector<T> acc(p.D);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int b = static_cast<int>(bh / p.Hk), hk = static_cast<int>(bh % p.Hk);
    const int kvb = p.kv_index ? p.kv_index[b] : b;
    const int len = p.lens[kvb];
    const int n_slots = std::min(len, p.C);
    const T* kb = k + kvb * p.k_sb + hk * p.k_sh;
    const T* vb = v + kvb * p.v_sb + hk * p.v_sh;
    for (int g = 0; g < G; ++g) {
      const int h = hk * G + g;
      for (int i = 0; i < p.Lq; ++i) {
        const T* qr = q + b * p.q_sb + h * p.q_sh + i * p.q_sl;
        T* orow = out + b * p.o_sb + h * p.o_sh + i * p.o_sl;
        const int pq = p.causal ? len - p.Lq + i : len - 1;
        T mx = -std::numeric_limits<T>::infinity();
        for (int s = 0; s < n_slots; ++s) {
          const int pos = s + p.C * ((len - 1 - s) / p.C);
          const bool vis = pos <= pq && (p.window == 0 || pq - pos < p.window);
          if (!vis) {
            scores[s] = -std::numeric_limits<T>::infinity();
            continue;
          }
          const T* kr = kb + s * p.k_ss;
          T d = 0;
          for (int j = 0; j < p.D; ++j) d += qr[j] * kr[j];
          d *= static_cast<T>(p.scale);
          if (p.softcap > 0) d = static_cast<T>(p.softcap) * std::tanh(d / static_cast<T>(p.softcap));
          scores[s] = d;
          mx = std::max(mx, d);
        }
        std::fill(acc.begin(), acc.end(), T(0));
        if (mx == -std::numeric_limits<T>::infinity()) {  // sees nothing: zeros
          for (int j = 0; j < p.D; ++j) orow[j] = 0;
          continue;
        }
        T sum = 0;
        for (int s = 0; s < n_slots; ++s) {
          if (scores[s] == -std::numeric_limits<T>::infinity()) continue;
          const T w = std::exp(scores[s] - mx);
          sum += w;
          const T* vr = vb + s * p.v_ss;
          for (int j = 0; j < p.D; ++j) acc[j] += w * vr[j];
        }
        for (int j = 0; j < p.D; ++j) orow[j] = acc[j] / sum;
      }
    }
  }
}

template <typename T>
void rope_kv_append_impl(const RopeAppendParams& p, int64_t begin, int64_t end) {
  const int half = p.D / 2;
  for (int64_t bi = begin; bi < end; ++bi) {
    const int b = static_cast<int>(bi / p.Lq), i = static_cast<int>(bi % p.Lq);
    const int pos = p.lens[b] - p.Lq + i;
    const int slot = pos % p.C;
    for (int j = 0; j < half; ++j) {
      // the fp32 angle exactly as the model forms it (positions.float() * inv_freq), then cos/sin in fp64
      const float angle = static_cast<float>(pos) * p.inv_freq[j];
      const T cs = static_cast<T>(std::cos(static_cast<double>(angle)));
      const T sn = static_cast<T>(std::sin(static_cast<double>(angle)));
      auto rotate = [&](const T* src, T* dst) {
        const T x1 = src[j], x2 = src[j + half];
        dst[j] = x1 * cs - x2 * sn;
        dst[j + half] = x2 * cs + x1 * sn;
      };
      for (int h = 0; h < p.H; ++h) {
        rotate(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_sl,
               static_cast<T*>(p.q_out) + ((static_cast<int64_t>(b) * p.H + h) * p.Lq + i) * p.D);
      }
      for (int kh = 0; kh < p.Hk; ++kh) {
        rotate(static_cast<const T*>(p.k) + b * p.k_sb + kh * p.k_sh + i * p.k_sl,
               static_cast<T*>(p.k_cache) + b * p.kc_sb + kh * p.kc_sh + slot * p.kc_ss);
        const T* vs = static_cast<const T*>(p.v) + b * p.v_sb + kh * p.v_sh + i * p.v_sl;
        T* vd = static_cast<T*>(p.v_cache) + b * p.vc_sb + kh * p.vc_sh + slot * p.vc_ss;
        vd[j] = vs[j];
        vd[j + half] = vs[j + half];
      }
    }
  }
}

}  // namespace

void cpu_decode_attention(const DecodeAttnParams& p, DType dtype, int64_t begin, int64_t end) {
  if (dtype == DType::F64) decode_attention_impl<double>(p, begin, end);
  else decode_attention_impl<float>(p, begin, end);
}

void cpu_rope_kv_append(const RopeAppendParams& p, DType dtype, int64_t begin, int64_t end) {
  if (dtype == DType::F64) rope_kv_append_impl<double>(p, begin, end);
  else rope_kv_append_impl<float>(p, begin, end);
}

}  // namespace florenz
