// Shared pieces of the native CPU ops: how a kernel sees a 4-D tensor, the dtypes it computes in,
// branch-free bf16 conversions, and the SIMD clones macro.
//
// Vectorisation: the build uses plain -O3 (no -march), so the binary runs on any x86-64 CPU. The
// hot leaf loops are marked DIPFAST_SIMD_CLONES: GCC compiles each of them for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline, and picks the best one the CPU has when the library
// loads (an ifunc), the same idea as ATen's own runtime CPU dispatch. The loops are plain C++ that
// GCC vectorises (`#pragma omp simd` where a float reduction has to be reordered to vectorise).
// Elsewhere (another compiler, another OS or architecture) the macro is empty and the baseline
// build runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DIPFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DIPFAST_SIMD_CLONES
#endif

namespace dipfast_native {

// The types kernels are instantiated for: float, double, and uint16_t, which stands for bf16 bits
// (kernels read bf16 as raw bits so that the conversions below stay plain integer code).
template <typename T>
struct Acc {
  using type = float;  // fp32 and bf16 compute in fp32
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(uint16_t bf16) {
  uint32_t u = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_acc(acc_t<T> v) {
  return v;
}
// Round to nearest even, NaN kept a (quiet) NaN: c10::BFloat16's rounding, without its branch.
template <>
inline uint16_t from_acc<uint16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// A 4-D (N, C, H, W) tensor as the kernels see it: element (n, c, h, w) at
// data + n*sn + c*sc + h*sh + w*sw. A pass walks its tensors either planar (rows of W values at
// unit stride: NCHW, or a channel slice of it) or interleaved (pixels of C values at unit stride:
// channels_last, or a channel slice of it); `planar_pass` picks the walk for a set of tensors.
template <typename T>
struct View4 {
  T* data;
  int64_t n, c, h, w;
  int64_t sn, sc, sh, sw;

  T* plane(int64_t in, int64_t ic) const { return data + in * sn + ic * sc; }
  T* row(int64_t in, int64_t ih) const { return data + in * sn + ih * sh; }
};

// The storage type a kernel reads for a tensor's dtype (bf16 as raw bits).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<at::BFloat16> {
  using type = uint16_t;
};

template <typename T>
View4<typename Storage<T>::type> view4(const at::Tensor& t) {
  using S = typename Storage<T>::type;
  return {reinterpret_cast<S*>(t.data_ptr<T>()),
          t.size(0),
          t.size(1),
          t.size(2),
          t.size(3),
          t.stride(0),
          t.stride(1),
          t.stride(2),
          t.stride(3)};
}

// The layout an op gives its outputs: channels_last when the input keeps its channels innermost
// (and not also W: a 1 x 1 NCHW map has unit stride along both), else NCHW. dipfast/native mirrors
// this rule in its fake (shape-only) implementations.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  const bool channels_last = t.size(1) > 1 && t.stride(1) == 1 && t.stride(3) != 1;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline bool planar_ok(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1; }
inline bool interleaved_ok(const at::Tensor& t) { return t.stride(1) == 1 || t.size(1) == 1; }

// Whether a kernel can read t as it is: 4-D with unit stride along W or along C.
inline bool readable(const at::Tensor& t) { return t.dim() == 4 && (planar_ok(t) || interleaved_ok(t)); }

// t as it is, or a copy in like's layout when the two cannot be walked together.
inline at::Tensor matching(const at::Tensor& t, const at::Tensor& like) {
  const bool together = (planar_ok(t) && planar_ok(like)) || (interleaved_ok(t) && interleaved_ok(like));
  return together ? t : t.contiguous(layout_of(like));
}

// The walk for tensors that `matching` has made compatible: planar when all allow it.
inline bool planar_pass(std::initializer_list<at::Tensor> ts) {
  bool planar = true, interleaved = true;
  for (const auto& t : ts) {
    planar = planar && planar_ok(t);
    interleaved = interleaved && interleaved_ok(t);
  }
  TORCH_INTERNAL_ASSERT(planar || interleaved, "dipfast_native: tensors with incompatible layouts");
  return planar;
}

// at::parallel_for's grain for tasks of `elements_per_task` values each: at least ~32k values per
// thread hand-off (ATen's grain size), so a small tensor runs on the calling thread alone.
inline int64_t grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_task));
}

// Calls f(DtypeTag<T>{}) for t's dtype: float, double or bf16 (T = at::BFloat16, Storage: uint16_t).
template <typename T>
struct DtypeTag {
  using tensor_type = T;
  using storage = typename Storage<T>::type;
};

template <typename F>
void dispatch_float_types(const at::Tensor& t, const char* op, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(DtypeTag<float>{});
    case at::kDouble:
      return f(DtypeTag<double>{});
    case at::kBFloat16:
      return f(DtypeTag<at::BFloat16>{});
    default:
      TORCH_CHECK(false, op, ": expected a float32, float64 or bfloat16 tensor; got ", t.scalar_type());
  }
}

}  // namespace dipfast_native
