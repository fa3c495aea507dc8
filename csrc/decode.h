// Torch-free interface between the kernels (decode_attention.cu, rope_kv_append.cu, cpu_ops.cpp) and the one
// binding file (bindings.cpp). Everything here is plain C++: pointers, element strides, sizes.
//
// Shape legend: B sequences, H query heads, Hk key/value heads (G = H / Hk query heads per KV head),
// Lq new query tokens per sequence, C cache slots (or encoder tokens for cross-attention), D head dim.
//
// Attention semantics (florenz_fast/ops.py holds the pure-PyTorch reference, the definition):
//   row (b, h, i) reads KV batch kvb = kv_index ? kv_index[b] : b, KV head h / G, len = lens[kvb].
//   causal (self-attention decode): query i sits at position p_i = len - Lq + i; slot s < min(len, C) holds
//     position pos(s) = s + C * floor((len - 1 - s) / C) (the largest p < len with p = s mod C: one rule for
//     linear caches and sliding-window ring buffers); the row sees slot s iff pos(s) <= p_i and
//     (window == 0 or p_i - pos(s) < window).
//   non-causal (cross-attention decode): the row sees slots 0 .. min(len, C) - 1.
//   score = scale * q.k; softcap > 0: softcap * tanh(score / softcap); softmax in fp32 (fp64 on the CPU for
//   fp64 tensors); a row that sees nothing is zeros.
#pragma once

#include <cstdint>

namespace florenz {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

struct DecodeAttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* lens;      // per KV batch entry
  const int32_t* kv_index;  // (B,) or nullptr (identity)
  int64_t q_sb, q_sh, q_sl;  // element strides of q (B, H, Lq, D); the last dim is contiguous
  int64_t k_sb, k_sh, k_ss;  // element strides of k as (kv batch, kv head, slot, D)
  int64_t v_sb, v_sh, v_ss;
  int64_t o_sb, o_sh, o_sl;
  int B, H, Hk, Lq, D, C;
  float scale, softcap;
  int window;  // 0: none
  bool causal;
  // CUDA only: split of the slot range (flash-decoding) and the fp32 workspace of the second pass
  int splits;
  float* part_out;  // (B, H, Lq, splits, D)
  float* part_lse;  // (B, H, Lq, splits)
};

struct RopeAppendParams {
  const void* q;  // (B, H, Lq, D)
  const void* k;  // (B, Hk, Lq, D), before RoPE
  const void* v;  // (B, Hk, Lq, D)
  void* q_out;    // (B, H, Lq, D), contiguous
  void* k_cache;  // (B, Hk, C, D)
  void* v_cache;
  const int32_t* lens;     // (B,) tokens so far including the Lq new ones
  const float* inv_freq;   // (D / 2,) fp32
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t kc_sb, kc_sh, kc_ss;
  int64_t vc_sb, vc_sh, vc_ss;
  int B, H, Hk, Lq, D, C;
};

// ---- CUDA (decode_attention.cu, rope_kv_append.cu) ----
// Rows of one CTA: the G * Lq query rows of one KV head are processed in tiles of this many rows.
int decode_row_tile(int rows);
// Number of splits of the slot range for a launch of `ctas` (B * Hk * row tiles) CTAs over C slots.
int decode_num_splits(int ctas, int C, int device);
// Returns an error string (nullptr on success); `stream` is a cudaStream_t.
const char* launch_decode_attention(const DecodeAttnParams& p, DType dtype, void* stream);
const char* launch_rope_kv_append(const RopeAppendParams& p, DType dtype, void* stream);

// ---- CPU (cpu_ops.cpp): fp32 / fp64 tensors (the binding upcasts fp16 / bf16 to fp32 first) ----
// Processes the (b, kv head) pairs [begin, end) of B * Hk; the binding parallelises over them.
void cpu_decode_attention(const DecodeAttnParams& p, DType dtype, int64_t begin, int64_t end);
void cpu_rope_kv_append(const RopeAppendParams& p, DType dtype, int64_t begin, int64_t end);  // over B * Lq

}  // namespace florenz
