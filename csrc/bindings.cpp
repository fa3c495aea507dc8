// The one binding file: schemas of the florenz decode ops (TORCH_LIBRARY), input checks with clear messages,
// and the CPU / CUDA / Meta implementations that call the torch-free kernels (decode.h).
//
//   florenz::decode_attention(q, k_cache, v_cache, cache_lens, scale, softcap, window) -> out
//   florenz::cross_decode_attention(q, k, v, image_index, image_lens, scale, softcap) -> out
//   florenz::rope_kv_append(q, k, v, k_cache!, v_cache!, cache_lens, inv_freq) -> q_rotated
//
// Semantics and shapes: decode.h and the pure-PyTorch references in florenz_fast/ops.py. The Meta
// implementations (shape only) serve torch.compile's fake tensors.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "decode.h"

namespace florenz {
namespace {

constexpr int kMaxLq = 8;

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    default: return DType::F64;
  }
}

void check_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(st == q.scalar_type(), op, ": ", name, " is ", st, " but q is ", q.scalar_type(),
              " (one dtype for q, k and v)");
  if (t.device().is_cuda()) {
    TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, op, ": on CUDA ", name,
                " must be float16 or bfloat16, got ", st, " (float32/float64 run on the CPU implementation)");
  }
}

void check_index(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, "), got ", shape_of(t));
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

void check_last_dim(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " must have a contiguous last dim (stride 1), got strides ",
              c10::str(t.strides()));
}

void check_head_dim(const char* op, int64_t D, bool cuda) {
  if (cuda) {
    TORCH_CHECK(D == 64 || D == 128 || D == 256, op, ": head dim must be 64, 128 or 256 on CUDA, got ", D);
  } else {
    TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head dim must be positive and even, got ", D);
  }
}

// 16-byte vector loads: base pointers and the slot / head / batch strides must be multiples of 8 elements
bool vector_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

at::Tensor upcast(const at::Tensor& t) {
  return (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat) : t;
}

// ---- shared attention path: k, v viewed as (kv batch, kv head, slot, D) ----

// Data pointers and strides of one call (the same for the CUDA kernels and the CPU implementation).
void set_pointers(DecodeAttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lens, const at::Tensor* kv_index) {
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.out = out.data_ptr();
  p.lens = lens.data_ptr<int32_t>();
  p.kv_index = kv_index ? kv_index->data_ptr<int32_t>() : nullptr;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_ss = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_ss = v.stride(2);
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
}

void check_attention_common(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const char* kname, const char* vname) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, Lq, D), got ", shape_of(q));
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxLq, op, ": q has Lq = ", q.size(2), " new tokens; 1..", kMaxLq,
              " are supported");
  check_float(op, kname, k, q);
  check_float(op, vname, v, q);
  check_float(op, "q", q, q);
  check_device(op, kname, k, q);
  check_device(op, vname, v, q);
  check_last_dim(op, "q", q);
  check_last_dim(op, kname, k);
  check_last_dim(op, vname, v);
  check_head_dim(op, q.size(3), q.is_cuda());
}

// kv4: k and v as (kv batch, Hk, C, D) views (strided)
at::Tensor run_attention(const char* op, const at::Tensor& q, at::Tensor k4, at::Tensor v4, const at::Tensor& lens,
                         const c10::optional<at::Tensor>& kv_index, double scale, double softcap, int64_t window,
                         bool causal) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k4.size(1), C = k4.size(2);
  TORCH_CHECK(H % Hk == 0, op, ": ", H, " query heads are not a multiple of ", Hk, " key/value heads");
  TORCH_CHECK(k4.size(3) == D, op, ": head dims differ, q ", D, " vs k ", k4.size(3));
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0, got ", softcap);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = none), got ", window);
  TORCH_CHECK(C < (int64_t(1) << 31) && B * H * Lq < (int64_t(1) << 31), op, ": sizes overflow int32");

  at::Tensor out = at::empty({B, H, Lq, D}, q.options());
  if (q.device().is_meta() || out.numel() == 0) return out;

  DecodeAttnParams p{};
  p.lens = nullptr;
  p.B = B; p.H = H; p.Hk = Hk; p.Lq = Lq; p.D = D; p.C = C;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window = static_cast<int>(window);
  p.causal = causal;

  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    if (!vector_aligned(k4)) k4 = k4.contiguous();
    if (!vector_aligned(v4)) v4 = v4.contiguous();
    at::Tensor lens_c = lens.contiguous();
    at::Tensor index_c = kv_index ? kv_index->contiguous() : at::Tensor();
    const int tiles = static_cast<int>((H / Hk * Lq + decode_row_tile(H / Hk * Lq) - 1) / decode_row_tile(H / Hk * Lq));
    p.splits = decode_num_splits(static_cast<int>(B * Hk * tiles), static_cast<int>(C), q.get_device());
    at::Tensor part_out, part_lse;
    if (p.splits > 1) {
      part_out = at::empty({B, H, Lq, p.splits, D}, q.options().dtype(at::kFloat));
      part_lse = at::empty({B, H, Lq, p.splits}, q.options().dtype(at::kFloat));
      p.part_out = part_out.data_ptr<float>();
      p.part_lse = part_lse.data_ptr<float>();
    }
    set_pointers(p, q, k4, v4, out, lens_c, kv_index ? &index_c : nullptr);
    const char* err = launch_decode_attention(p, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
    return out;
  }

  // CPU: fp16 / bf16 computed in fp32, as on the GPU
  at::Tensor qc = upcast(q), kc = upcast(k4), vc = upcast(v4);
  at::Tensor oc = (qc.scalar_type() == q.scalar_type()) ? out : at::empty({B, H, Lq, D}, qc.options());
  at::Tensor lens_c = lens.contiguous();
  at::Tensor index_c = kv_index ? kv_index->contiguous() : at::Tensor();
  // an out-of-range image index or length would read out of bounds: check on the CPU, where it is free
  const int64_t n_kv = k4.size(0);
  if (kv_index) {
    const int32_t* ix = index_c.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ix[b] >= 0 && ix[b] < n_kv, op, ": image_index[", b, "] = ", ix[b], " is outside [0, ", n_kv, ")");
    }
  }
  {
    const int32_t* ln = lens_c.data_ptr<int32_t>();
    for (int64_t e = 0; e < lens_c.numel(); ++e) {
      TORCH_CHECK(ln[e] >= 0, op, ": lengths must be >= 0, got ", ln[e], " at ", e);
      if (causal) TORCH_CHECK(ln[e] >= Lq, op, ": cache_lens[", e, "] = ", ln[e], " < Lq = ", Lq,
                              " (the lengths include the new tokens)");
    }
  }
  set_pointers(p, qc, kc, vc, oc, lens_c, kv_index ? &index_c : nullptr);
  const DType dt = dtype_of(qc);
  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) { cpu_decode_attention(p, dt, begin, end); });
  if (!oc.is_same(out)) out.copy_(oc);
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_lens, double scale, double softcap, int64_t window) {
  const char* op = "florenz::decode_attention";
  check_attention_common(op, q, k_cache, v_cache, "k_cache", "v_cache");
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (B, Hk, C, D), got ", shape_of(k_cache));
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", shape_of(k_cache), " and v_cache ",
              shape_of(v_cache), " differ");
  TORCH_CHECK(k_cache.size(0) == q.size(0), op, ": q has batch ", q.size(0), " but k_cache ", shape_of(k_cache));
  check_index(op, "cache_lens", cache_lens, q.size(0), q);
  return run_attention(op, q, k_cache, v_cache, cache_lens, c10::nullopt, scale, softcap, window, true);
}

at::Tensor cross_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& image_index, const at::Tensor& image_lens, double scale,
                                  double softcap) {
  const char* op = "florenz::cross_decode_attention";
  check_attention_common(op, q, k, v, "k", "v");
  TORCH_CHECK(k.dim() == 4, op, ": k must be (n_images, S, Hk, D), got ", shape_of(k));
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", shape_of(k), " and v ", shape_of(v), " differ");
  check_index(op, "image_index", image_index, q.size(0), q);
  check_index(op, "image_lens", image_lens, k.size(0), q);
  return run_attention(op, q, k.transpose(1, 2), v.transpose(1, 2), image_lens, image_index, scale, softcap, 0,
                       false);
}

at::Tensor rope_kv_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                          at::Tensor& v_cache, const at::Tensor& cache_lens, const at::Tensor& inv_freq) {
  const char* op = "florenz::rope_kv_append";
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, Lq, D), got ", shape_of(q));
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), op, ": k and v must be (B, Hk, Lq, D) alike, got k ",
              shape_of(k), " and v ", shape_of(v));
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache and v_cache must be (B, Hk, C, D) alike, got ", shape_of(k_cache), " and ",
              shape_of(v_cache));
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hk = k.size(1), C = k_cache.size(2);
  TORCH_CHECK(Lq >= 1 && Lq <= kMaxLq, op, ": q has Lq = ", Lq, " new tokens; 1..", kMaxLq, " are supported");
  TORCH_CHECK(k.size(0) == B && k.size(2) == Lq && k.size(3) == D, op, ": k ", shape_of(k),
              " does not match q ", shape_of(q), " (want (B, Hk, Lq, D))");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(1) == Hk && k_cache.size(3) == D, op, ": k_cache ",
              shape_of(k_cache), " does not match k ", shape_of(k), " (want (B, Hk, C, D))");
  TORCH_CHECK(C >= Lq, op, ": the cache has ", C, " slots, fewer than the ", Lq, " new tokens");
  TORCH_CHECK(D % 2 == 0, op, ": head dim must be even, got ", D);
  if (q.is_cuda()) TORCH_CHECK(D <= 512, op, ": head dim must be <= 512 on CUDA, got ", D);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}, {"k_cache", &k_cache},
                         {"v_cache", &v_cache}}) {
    check_float(op, name, *t, q);
    check_device(op, name, *t, q);
    check_last_dim(op, name, *t);
  }
  check_float(op, "q", q, q);
  check_last_dim(op, "q", q);
  check_index(op, "cache_lens", cache_lens, B, q);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) == D / 2, op,
              ": inv_freq must be float32 of shape (", D / 2, "), got ", inv_freq.scalar_type(), " ",
              shape_of(inv_freq));
  check_device(op, "inv_freq", inv_freq, q);

  at::Tensor q_out = at::empty({B, H, Lq, D}, q.options());
  if (q.device().is_meta() || q_out.numel() == 0) return q_out;

  RopeAppendParams p{};
  p.B = B; p.H = H; p.Hk = Hk; p.Lq = Lq; p.D = D; p.C = C;
  at::Tensor lens_c = cache_lens.contiguous(), freq_c = inv_freq.contiguous();
  p.lens = lens_c.data_ptr<int32_t>();
  p.inv_freq = freq_c.data_ptr<float>();
  auto set = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv, at::Tensor& kc, at::Tensor& vc,
                 at::Tensor& qo) {
    p.q = qq.data_ptr(); p.k = kk.data_ptr(); p.v = vv.data_ptr(); p.q_out = qo.data_ptr();
    p.k_cache = kc.data_ptr(); p.v_cache = vc.data_ptr();
    p.q_sb = qq.stride(0); p.q_sh = qq.stride(1); p.q_sl = qq.stride(2);
    p.k_sb = kk.stride(0); p.k_sh = kk.stride(1); p.k_sl = kk.stride(2);
    p.v_sb = vv.stride(0); p.v_sh = vv.stride(1); p.v_sl = vv.stride(2);
    p.kc_sb = kc.stride(0); p.kc_sh = kc.stride(1); p.kc_ss = kc.stride(2);
    p.vc_sb = vc.stride(0); p.vc_sh = vc.stride(1); p.vc_ss = vc.stride(2);
  };
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    set(q, k, v, k_cache, v_cache, q_out);
    const char* err = launch_rope_kv_append(p, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
    return q_out;
  }
  const int32_t* ln = lens_c.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ln[b] >= Lq, op, ": cache_lens[", b, "] = ", ln[b], " < Lq = ", Lq,
                " (the lengths include the new tokens)");
  }
  // CPU: fp16 / bf16 in fp32 (the caches round-trip exactly), one rounding at the end
  at::Tensor qc = upcast(q), kc = upcast(k), vc = upcast(v), kcc = upcast(k_cache), vcc = upcast(v_cache);
  at::Tensor qo = (qc.scalar_type() == q.scalar_type()) ? q_out : at::empty({B, H, Lq, D}, qc.options());
  set(qc, kc, vc, kcc, vcc, qo);
  const DType dt = dtype_of(qc);
  at::parallel_for(0, B * Lq, 1, [&](int64_t begin, int64_t end) { cpu_rope_kv_append(p, dt, begin, end); });
  if (!qo.is_same(q_out)) {
    q_out.copy_(qo);
    k_cache.copy_(kcc);
    v_cache.copy_(vcc);
  }
  return q_out;
}

}  // namespace
}  // namespace florenz

TORCH_LIBRARY(florenz, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float scale, "
        "float softcap, int window) -> Tensor");
  m.def("cross_decode_attention(Tensor q, Tensor k, Tensor v, Tensor image_index, Tensor image_lens, "
        "float scale, float softcap) -> Tensor");
  m.def("rope_kv_append(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor inv_freq) -> Tensor");
}

TORCH_LIBRARY_IMPL(florenz, CPU, m) {
  m.impl("decode_attention", &florenz::decode_attention);
  m.impl("cross_decode_attention", &florenz::cross_decode_attention);
  m.impl("rope_kv_append", &florenz::rope_kv_append);
}

TORCH_LIBRARY_IMPL(florenz, CUDA, m) {
  m.impl("decode_attention", &florenz::decode_attention);
  m.impl("cross_decode_attention", &florenz::cross_decode_attention);
  m.impl("rope_kv_append", &florenz::rope_kv_append);
}

TORCH_LIBRARY_IMPL(florenz, Meta, m) {
  m.impl("decode_attention", &florenz::decode_attention);
  m.impl("cross_decode_attention", &florenz::cross_decode_attention);
  m.impl("rope_kv_append", &florenz::rope_kv_append);
}
