// A counter-based Gaussian draw: fills a tensor with N(mean, std^2) values that are a pure function
// of (seed, offset, element index), so a run reproduces, any number of threads gives the same
// numbers, and a step counter can serve as the offset (each offset is an independent stream).
//
// Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011; the generator of cuRAND and of PyTorch's CUDA RNG), key = (seed low, seed
// high 32 bits), counter = (group low, group high, offset low, offset high). Each group's four
// 32-bit words become four normals by Box-Muller on the pairs (w0, w1) and (w2, w3):
//   u1 = w * 2^-32 + 2^-33 in (0, 1] (rounded to fp32, as cuRAND does), u2 = (w >> 8) * 2^-24,
//   z = sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)      (|z| <= 6.66)
// Groups go in blocks of 16 (one AVX-512 vector of counters): element e of the tensor (row-major)
// takes word j = (e mod 64) div 16 of group 16 * (e div 64) + e mod 16, so each word lands in a
// contiguous run of 16 outputs. ln, cos and sin are branch-free Cephes polynomials (relative error
// ~1e-7) so that the loop vectorises; dipfast/native/philox.py has the same draw in plain torch,
// the fallback and the test oracle.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "common.h"

namespace dipfast_native {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // Philox4x32 multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
constexpr int kLanes = 16;                                      // groups per block
constexpr int kBlock = 4 * kLanes;                              // outputs per block

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ln(x) for a normal x in (0, 1] (Cephes logf, branch-free).
inline float log_unit(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = float(int32_t(bits >> 23) - 126);        // x = m * 2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool below = m < 0.70710678f;                 // fold m into [sqrt(1/2), sqrt(2)) - 1
  e = below ? e - 1.0f : e;
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// cos and sin of 2 pi u for u in [0, 1): reduced to a quarter turn q and a rest a in [-pi/4, pi/4].
inline void sincos_turn(float u, float* c_out, float* s_out) {
  const int32_t q = int32_t(4.0f * u + 0.5f);
  const float a = (u - 0.25f * float(q)) * 6.28318530717958647692f;  // the subtraction is exact
  const float z = a * a;
  const float s = a + a * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float c =
      1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const bool swap = q & 1;  // a quarter turn swaps cos and sin; q = 1, 2 negate cos, q = 2, 3 sin
  const float cq = swap ? s : c, sq = swap ? c : s;
  *c_out = ((q + 1) & 2) ? -cq : cq;
  *s_out = (q & 2) ? -sq : sq;
}

inline void box_muller(uint32_t w_radius, uint32_t w_angle, float* z_cos, float* z_sin) {
  const float u1 = float(w_radius) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;  // 2^-32, 2^-33
  const float u2 = float(int32_t(w_angle >> 8)) * 5.9604644775390625e-8f;                // 2^-24
  const float r = std::sqrt(std::max(-2.0f * log_unit(u1), 0.0f));
  float c, s;
  sincos_turn(u2, &c, &s);
  *z_cos = r * c;
  *z_sin = r * s;
}

// out[0 : 64 * blocks] = mean + std * z for the blocks starting at block0; one SIMD lane per group.
// The portable loop (GCC vectorises it for AVX2; the baseline build elsewhere).
DIPFAST_SIMD_CLONES void philox_normal_blocks(float* __restrict__ out, uint64_t block0, int64_t blocks,
                                              uint32_t key0, uint32_t key1, uint32_t offset0, uint32_t offset1,
                                              float mean, float std) {
  for (int64_t b = 0; b < blocks; ++b) {
    // The block's first group is a multiple of 16, so adding a lane never carries into the high word.
    const uint64_t group0 = (block0 + uint64_t(b)) * kLanes;
    const uint32_t group_lo = uint32_t(group0), group_hi = uint32_t(group0 >> 32);
    float* o = out + b * kBlock;
#pragma omp simd
    for (uint32_t l = 0; l < uint32_t(kLanes); ++l) {
      uint32_t c0 = group_lo + l, c1 = group_hi, c2 = offset0, c3 = offset1;
      uint32_t k0 = key0, k1 = key1;
      for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = uint64_t(kMul0) * c0, p1 = uint64_t(kMul1) * c2;
        c0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
        c2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
        c1 = uint32_t(p1);
        c3 = uint32_t(p0);
        k0 += kWeyl0;
        k1 += kWeyl1;
      }
      float z0, z1, z2, z3;
      box_muller(c0, c1, &z0, &z1);
      box_muller(c2, c3, &z2, &z3);
      o[l] = mean + std * z0;
      o[kLanes + l] = mean + std * z1;
      o[2 * kLanes + l] = mean + std * z2;
      o[3 * kLanes + l] = mean + std * z3;
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIPFAST_HAS_AVX512_PATH 1
// The same draw in AVX-512 intrinsics, the same operations in the same order (the two agree to an
// fp32 rounding or two). GCC's own vectorisation of the loop above widens Philox to 64-bit lanes
// and runs 1.6x slower. Philox keeps one 32-bit word per 64-bit lane, 8 groups per register: the
// 32 x 32 -> 64 multiply reads the low halves only, so the high halves need no clearing between
// rounds; the four words are packed into 16 lanes once, for Box-Muller.
#define DIPFAST_AVX512 __attribute__((target("avx512f")))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own _mm512_undefined_* helpers

DIPFAST_AVX512 inline __m512 log_unit_avx512(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
  const __mmask16 below = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.70710678f), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, below, e, _mm512_set1_ps(1.0f));
  m = _mm512_sub_ps(_mm512_mask_add_ps(m, below, m, m), _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  for (float coefficient : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                            -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(coefficient));
  y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(m, y));
}

DIPFAST_AVX512 inline void box_muller_avx512(__m512i w_radius, __m512i w_angle, __m512 mean, __m512 std,
                                             __m512* z_cos, __m512* z_sin) {
  const __m512 u1 = _mm512_fmadd_ps(_mm512_cvtepu32_ps(w_radius), _mm512_set1_ps(2.3283064365386963e-10f),
                                    _mm512_set1_ps(1.1641532182693481e-10f));
  const __m512 u2 =
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w_angle, 8)), _mm512_set1_ps(5.9604644775390625e-8f));
  const __m512 r = _mm512_sqrt_ps(
      _mm512_max_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit_avx512(u1)), _mm512_setzero_ps()));
  const __m512i q = _mm512_cvttps_epi32(_mm512_fmadd_ps(u2, _mm512_set1_ps(4.0f), _mm512_set1_ps(0.5f)));
  const __m512 a = _mm512_mul_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(0.25f), u2),
                                 _mm512_set1_ps(6.28318530717958647692f));
  const __m512 z = _mm512_mul_ps(a, a);
  __m512 ps = _mm512_fmadd_ps(z, _mm512_set1_ps(-1.9515295891e-4f), _mm512_set1_ps(8.3321608736e-3f));
  ps = _mm512_fmadd_ps(ps, z, _mm512_set1_ps(-1.6666654611e-1f));
  const __m512 s = _mm512_fmadd_ps(_mm512_mul_ps(a, z), ps, a);
  __m512 pc = _mm512_fmadd_ps(z, _mm512_set1_ps(2.443315711809948e-5f), _mm512_set1_ps(-1.388731625493765e-3f));
  pc = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(4.166664568298827e-2f));
  const __m512 c =
      _mm512_fmadd_ps(_mm512_mul_ps(z, z), pc, _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  const __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __mmask16 negate_cos = _mm512_test_epi32_mask(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2));
  const __mmask16 negate_sin = _mm512_test_epi32_mask(q, _mm512_set1_epi32(2));
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512i cq = _mm512_castps_si512(_mm512_mask_blend_ps(swap, c, s));
  const __m512i sq = _mm512_castps_si512(_mm512_mask_blend_ps(swap, s, c));
  const __m512 cos_v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(cq, negate_cos, cq, sign));
  const __m512 sin_v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(sq, negate_sin, sq, sign));
  *z_cos = _mm512_fmadd_ps(_mm512_mul_ps(r, cos_v), std, mean);
  *z_sin = _mm512_fmadd_ps(_mm512_mul_ps(r, sin_v), std, mean);
}

DIPFAST_AVX512 void philox_normal_blocks_avx512(float* __restrict__ out, uint64_t block0, int64_t blocks,
                                                uint32_t key0, uint32_t key1, uint32_t offset0, uint32_t offset1,
                                                float mean, float std) {
  const __m512i first_half = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);  // groups 0-7 and 8-15 of a block
  const __m512i second_half = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low_words = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i mul0 = _mm512_set1_epi64(kMul0), mul1 = _mm512_set1_epi64(kMul1);
  const __m512 vmean = _mm512_set1_ps(mean), vstd = _mm512_set1_ps(std);
  __m512i round_key0[10], round_key1[10];
  for (int round = 0; round < 10; ++round) {
    round_key0[round] = _mm512_set1_epi64(uint32_t(key0 + uint32_t(round) * kWeyl0));
    round_key1[round] = _mm512_set1_epi64(uint32_t(key1 + uint32_t(round) * kWeyl1));
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t group0 = (block0 + uint64_t(b)) * kLanes;
    const __m512i group_lo = _mm512_set1_epi64(uint32_t(group0));
    __m512i a0 = _mm512_add_epi64(group_lo, first_half), b0 = _mm512_add_epi64(group_lo, second_half);
    __m512i a1 = _mm512_set1_epi64(uint32_t(group0 >> 32)), b1 = a1;
    __m512i a2 = _mm512_set1_epi64(offset0), b2 = a2, a3 = _mm512_set1_epi64(offset1), b3 = a3;
    for (int round = 0; round < 10; ++round) {
      const __m512i pa0 = _mm512_mul_epu32(a0, mul0), pa1 = _mm512_mul_epu32(a2, mul1);
      const __m512i pb0 = _mm512_mul_epu32(b0, mul0), pb1 = _mm512_mul_epu32(b2, mul1);
      a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), a1, round_key0[round], 0x96);  // a ^ b ^ c
      a2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), a3, round_key1[round], 0x96);
      b0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b1, round_key0[round], 0x96);
      b2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b3, round_key1[round], 0x96);
      a1 = pa1, a3 = pa0, b1 = pb1, b3 = pb0;
    }
    const __m512i w0 = _mm512_permutex2var_epi32(a0, low_words, b0), w1 = _mm512_permutex2var_epi32(a1, low_words, b1);
    const __m512i w2 = _mm512_permutex2var_epi32(a2, low_words, b2), w3 = _mm512_permutex2var_epi32(a3, low_words, b3);
    __m512 z0, z1, z2, z3;
    box_muller_avx512(w0, w1, vmean, vstd, &z0, &z1);
    box_muller_avx512(w2, w3, vmean, vstd, &z2, &z3);
    float* o = out + b * kBlock;
    _mm512_storeu_ps(o, z0);
    _mm512_storeu_ps(o + kLanes, z1);
    _mm512_storeu_ps(o + 2 * kLanes, z2);
    _mm512_storeu_ps(o + 3 * kLanes, z3);
  }
}
#pragma GCC diagnostic pop
#endif

using BlocksFn = void (*)(float*, uint64_t, int64_t, uint32_t, uint32_t, uint32_t, uint32_t, float, float);

// One implementation for the whole process, so every block of every call is drawn the same way.
BlocksFn blocks_fn() {
#ifdef DIPFAST_HAS_AVX512_PATH
  static const BlocksFn fn = __builtin_cpu_supports("avx512f") ? philox_normal_blocks_avx512 : philox_normal_blocks;
  return fn;
#else
  return philox_normal_blocks;
#endif
}

template <typename T>
void fill_normal(T* out, int64_t numel, uint32_t key0, uint32_t key1, uint32_t offset0, uint32_t offset1, float mean,
          float std) {
  constexpr int64_t kTaskBlocks = 64;  // 4096 values per task: a fp32 staging buffer fits in L1
  const BlocksFn draw = blocks_fn();
  const int64_t full = numel / kBlock, tasks = (numel + kTaskBlocks * kBlock - 1) / (kTaskBlocks * kBlock);
  at::parallel_for(0, tasks, grain(kTaskBlocks * kBlock), [&](int64_t begin, int64_t end) {
    float staging[kTaskBlocks * kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = task * kTaskBlocks, b1 = std::min(b0 + kTaskBlocks, (numel + kBlock - 1) / kBlock);
      const int64_t first = b0 * kBlock, count = std::min(numel, b1 * kBlock) - first;
      const bool direct = std::is_same_v<T, float> && b1 <= full;  // whole fp32 blocks: write in place
      float* dst = direct ? reinterpret_cast<float*>(out + first) : staging;
      draw(dst, uint64_t(b0), b1 - b0, key0, key1, offset0, offset1, mean, std);
      if (!direct) {
        for (int64_t i = 0; i < count; ++i) out[first + i] = from_acc<T>(acc_t<T>(staging[i]));
      }
    }
  });
}

// offset: a one-element int64 CPU tensor (a step counter can live in one and be bumped in place,
// so a compiled caller never sees it change).
void philox_normal_(const at::Tensor& self, int64_t seed, const at::Tensor& offset, double mean, double std) {
  const char* op = "dipfast_native::philox_normal_";
  TORCH_CHECK(self.device().is_cpu(), op, ": self must be a CPU tensor");
  TORCH_CHECK(self.is_contiguous(), op, ": self must be contiguous (row-major); got strides ", self.strides());
  TORCH_CHECK(offset.device().is_cpu() && offset.scalar_type() == at::kLong && offset.numel() == 1, op,
              ": offset must be a one-element int64 CPU tensor; got ", offset.scalar_type(), " of shape ",
              offset.sizes());
  const int64_t offset_value = *offset.data_ptr<int64_t>();
  TORCH_CHECK(seed >= 0 && offset_value >= 0, op, ": seed and offset must be >= 0; got ", seed, ", ", offset_value);
  const auto s = uint64_t(seed), o = uint64_t(offset_value);
  dispatch_float_types(self, op, [&](auto tag) {
    using T = typename decltype(tag)::storage;
    fill_normal(reinterpret_cast<T*>(self.data_ptr()), self.numel(), uint32_t(s), uint32_t(s >> 32), uint32_t(o),
                uint32_t(o >> 32), float(mean), float(std));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dipfast_native, m) {
  m.def("philox_normal_(Tensor(a!) self, int seed, Tensor offset, float mean, float std) -> ()");
}

TORCH_LIBRARY_IMPL(dipfast_native, CPU, m) { m.impl("philox_normal_", &philox_normal_); }

}  // namespace dipfast_native
