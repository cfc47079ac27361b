// BatchNorm with training statistics fused with LeakyReLU, forward and backward, and the two ways
// it is written where the next layer wants it: into the channel slices of a merge's concatenation
// buffer (no torch.cat), and into a reflection-padded buffer (no F.pad).
//
//   y = act((x - mean) * gamma * rstd + beta),  act(z) = z > 0 ? z : slope * z  (slope 1: no act)
//   mean, var: per channel over (N, H, W), biased var, rstd = 1 / sqrt(var + eps)
//
// Statistics are sums of x - k (k = x[0, c, 0, 0], a shift close to the mean, so that the
// variance formula does not cancel), over fixed blocks in fp32 (double for float64 input):
// a row of one plane, or ~64 pixels of a channels_last image; blocks are combined in double, in
// an order fixed by the shape, never by the thread count, so results are bitwise the same with
// any number of threads. Forward: a pass for the sums, a pass to normalise. Backward: a pass for
// sum(g') and sum(g' * (x - mean)) (g' the gradient through the activation, recomputed from x),
// a pass for dx = gamma * rstd * (g' - sum(g') / M - xhat * sum(g' * xhat) / M). NCHW tensors
// are walked one channel at a time, both passes of a channel back to back while its values are
// still in cache; channels_last tensors in blocks of pixels, vectorised over the channels.
// Inputs fp32, bf16 or float64; gamma, beta, mean, rstd in the compute dtype (fp32, or float64);
// outputs in the input's dtype and layout (NCHW or channels_last: common.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "common.h"

namespace dipfast_native {
namespace {

// Pixels per fp32 partial sum in the channels_last kernels (the NCHW ones use one row).
constexpr int64_t kBlockPixels = 64;

// Below this many channels the pixel leaves walk a row one channel at a time: a pixel's few
// values are too short a loop to vectorise (its set-up costs more than the work).
constexpr int64_t kFewChannels = 16;

template <typename A>
inline A leaky(A z, A slope) {
  return z > A(0) ? z : z * slope;
}

// ---- leaf loops: compiled per SIMD level (common.h) ------------------------------------------

// The plane leaves walk one channel of one image: rows at stride sh, values at stride sw (1 for
// NCHW; C for a channels_last tensor of few channels, where a pixel's C values are too few to
// vectorise over). kUnitStride (all value strides 1) is the vectorised instantiation; a separate
// one, so that the compiler cannot fold the two loops into the scalar one.
template <typename T, bool kUnitStride>
DIPFAST_SIMD_CLONES void plane_sums(const T* __restrict__ x, int64_t h, int64_t w, int64_t sh, int64_t sw,
                                    acc_t<T> k, double* out) {
  double s1 = 0, s2 = 0;
  for (int64_t r = 0; r < h; ++r) {
    const T* row = x + r * sh;
    acc_t<T> a1 = 0, a2 = 0;
    if constexpr (kUnitStride) {
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < w; ++i) {
        acc_t<T> d = to_acc(row[i]) - k;
        a1 += d;
        a2 += d * d;
      }
    } else {
      for (int64_t i = 0; i < w; ++i) {
        acc_t<T> d = to_acc(row[i * sw]) - k;
        a1 += d;
        a2 += d * d;
      }
    }
    s1 += a1;
    s2 += a2;
  }
  out[0] = s1;
  out[1] = s2;
}

// The pixel leaves walk rows of pixels of c values (the channels) at unit stride, pixel stride sw:
// vectorised over the channels; with kFew (c < kFewChannels: too short a loop to vectorise), one
// channel at a time along the row instead, scalar, while the row is in L1.
template <typename T, bool kFew>
DIPFAST_SIMD_CLONES void pixel_sums(const T* __restrict__ x, int64_t rows, int64_t w, int64_t sh, int64_t sw,
                                    int64_t c, const acc_t<T>* __restrict__ k, acc_t<T>* __restrict__ s1,
                                    acc_t<T>* __restrict__ s2) {
  if constexpr (kFew) {
    for (int64_t i = 0; i < c; ++i) {
      acc_t<T> a1 = 0, a2 = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < w; ++j) {
          acc_t<T> d = to_acc(x[r * sh + j * sw + i]) - k[i];
          a1 += d;
          a2 += d * d;
        }
      }
      s1[i] += a1;
      s2[i] += a2;
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < w; ++j) {
      const T* p = x + r * sh + j * sw;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) {
        acc_t<T> d = to_acc(p[i]) - k[i];
        s1[i] += d;
        s2[i] += d * d;
      }
    }
  }
}

template <typename T, bool kUnitStride>
DIPFAST_SIMD_CLONES void plane_normalize(const T* __restrict__ x, T* __restrict__ y, int64_t h, int64_t w,
                                         int64_t sxh, int64_t sxw, int64_t syh, int64_t syw, acc_t<T> mean,
                                         acc_t<T> scale, acc_t<T> beta, acc_t<T> slope) {
  for (int64_t r = 0; r < h; ++r) {
    const T* xr = x + r * sxh;
    T* yr = y + r * syh;
    if constexpr (kUnitStride) {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) yr[i] = from_acc<T>(leaky((to_acc(xr[i]) - mean) * scale + beta, slope));
    } else {
      for (int64_t i = 0; i < w; ++i) {
        yr[i * syw] = from_acc<T>(leaky((to_acc(xr[i * sxw]) - mean) * scale + beta, slope));
      }
    }
  }
}

template <typename T, bool kFew>
DIPFAST_SIMD_CLONES void pixel_normalize(const T* __restrict__ x, T* __restrict__ y, int64_t w, int64_t sxw,
                                         int64_t syw, int64_t c, const acc_t<T>* __restrict__ mean,
                                         const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ beta,
                                         acc_t<T> slope) {
  if constexpr (kFew) {
    for (int64_t i = 0; i < c; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        y[j * syw + i] = from_acc<T>(leaky((to_acc(x[j * sxw + i]) - mean[i]) * scale[i] + beta[i], slope));
      }
    }
    return;
  }
  for (int64_t j = 0; j < w; ++j) {
    const T* xp = x + j * sxw;
    T* yp = y + j * syw;
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) {
      yp[i] = from_acc<T>(leaky((to_acc(xp[i]) - mean[i]) * scale[i] + beta[i], slope));
    }
  }
}

// out[0] = sum(g'), out[1] = sum(g' * (x - mean)) over one plane.
template <typename T, bool kUnitStride>
DIPFAST_SIMD_CLONES void plane_grad_sums(const T* __restrict__ g, const T* __restrict__ x, int64_t h, int64_t w,
                                         int64_t sgh, int64_t sgw, int64_t sxh, int64_t sxw, acc_t<T> mean,
                                         acc_t<T> scale, acc_t<T> beta, acc_t<T> slope, double* out) {
  using A = acc_t<T>;
  double s1 = 0, s2 = 0;
  for (int64_t r = 0; r < h; ++r) {
    const T* gr = g + r * sgh;
    const T* xr = x + r * sxh;
    A a1 = 0, a2 = 0;
    if constexpr (kUnitStride) {
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < w; ++i) {
        A d = to_acc(xr[i]) - mean;
        A gi = to_acc(gr[i]);
        A gp = d * scale + beta > A(0) ? gi : gi * slope;
        a1 += gp;
        a2 += gp * d;
      }
    } else {
      for (int64_t i = 0; i < w; ++i) {
        A d = to_acc(xr[i * sxw]) - mean;
        A gi = to_acc(gr[i * sgw]);
        A gp = d * scale + beta > A(0) ? gi : gi * slope;
        a1 += gp;
        a2 += gp * d;
      }
    }
    s1 += a1;
    s2 += a2;
  }
  out[0] = s1;
  out[1] = s2;
}

template <typename T, bool kFew>
DIPFAST_SIMD_CLONES void pixel_grad_sums(const T* __restrict__ g, const T* __restrict__ x, int64_t rows, int64_t w,
                                         int64_t sgh, int64_t sgw, int64_t sxh, int64_t sxw, int64_t c,
                                         const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ scale,
                                         const acc_t<T>* __restrict__ beta, acc_t<T> slope, acc_t<T>* __restrict__ s1,
                                         acc_t<T>* __restrict__ s2) {
  using A = acc_t<T>;
  if constexpr (kFew) {
    for (int64_t i = 0; i < c; ++i) {
      A a1 = 0, a2 = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < w; ++j) {
          A d = to_acc(x[r * sxh + j * sxw + i]) - mean[i];
          A gi = to_acc(g[r * sgh + j * sgw + i]);
          A gt = d * scale[i] + beta[i] > A(0) ? gi : gi * slope;
          a1 += gt;
          a2 += gt * d;
        }
      }
      s1[i] += a1;
      s2[i] += a2;
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < w; ++j) {
      const T* gp = g + r * sgh + j * sgw;
      const T* xp = x + r * sxh + j * sxw;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) {
        A d = to_acc(xp[i]) - mean[i];
        A gi = to_acc(gp[i]);
        A gt = d * scale[i] + beta[i] > A(0) ? gi : gi * slope;
        s1[i] += gt;
        s2[i] += gt * d;
      }
    }
  }
}

// dx = k1 * g' + k2 * (x - mean) + k3 over one plane.
template <typename T, bool kUnitStride>
DIPFAST_SIMD_CLONES void plane_grad_input(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                          int64_t h, int64_t w, int64_t sgh, int64_t sgw, int64_t sxh, int64_t sxw,
                                          int64_t sdh, int64_t sdw, acc_t<T> mean, acc_t<T> scale, acc_t<T> beta,
                                          acc_t<T> slope, acc_t<T> k1, acc_t<T> k2, acc_t<T> k3) {
  using A = acc_t<T>;
  for (int64_t r = 0; r < h; ++r) {
    const T* gr = g + r * sgh;
    const T* xr = x + r * sxh;
    T* dr = dx + r * sdh;
    if constexpr (kUnitStride) {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) {
        A d = to_acc(xr[i]) - mean;
        A gi = to_acc(gr[i]);
        A gt = d * scale + beta > A(0) ? gi : gi * slope;
        dr[i] = from_acc<T>(k1 * gt + k2 * d + k3);
      }
    } else {
      for (int64_t i = 0; i < w; ++i) {
        A d = to_acc(xr[i * sxw]) - mean;
        A gi = to_acc(gr[i * sgw]);
        A gt = d * scale + beta > A(0) ? gi : gi * slope;
        dr[i * sdw] = from_acc<T>(k1 * gt + k2 * d + k3);
      }
    }
  }
}

template <typename T, bool kFew>
DIPFAST_SIMD_CLONES void pixel_grad_input(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                          int64_t w, int64_t sgw, int64_t sxw, int64_t sdw, int64_t c,
                                          const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ scale,
                                          const acc_t<T>* __restrict__ beta, acc_t<T> slope,
                                          const acc_t<T>* __restrict__ k1, const acc_t<T>* __restrict__ k2,
                                          const acc_t<T>* __restrict__ k3) {
  using A = acc_t<T>;
  if constexpr (kFew) {
    for (int64_t i = 0; i < c; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        A d = to_acc(x[j * sxw + i]) - mean[i];
        A gi = to_acc(g[j * sgw + i]);
        A gt = d * scale[i] + beta[i] > A(0) ? gi : gi * slope;
        dx[j * sdw + i] = from_acc<T>(k1[i] * gt + k2[i] * d + k3[i]);
      }
    }
    return;
  }
  for (int64_t j = 0; j < w; ++j) {
    const T* gp = g + j * sgw;
    const T* xp = x + j * sxw;
    T* dp = dx + j * sdw;
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) {
      A d = to_acc(xp[i]) - mean[i];
      A gi = to_acc(gp[i]);
      A gt = d * scale[i] + beta[i] > A(0) ? gi : gi * slope;
      dp[i] = from_acc<T>(k1[i] * gt + k2[i] * d + k3[i]);
    }
  }
}

// ---- the passes: parallel over planes (NCHW) or pixel blocks / rows (channels_last) ----------

// Rows per block in the channels_last passes: about kBlockPixels pixels, whole rows.
inline int64_t block_rows(int64_t w) { return std::max<int64_t>(1, kBlockPixels / std::max<int64_t>(1, w)); }

// Interleaved walk, pass 1: per-block partial sums (blocks x C x 2 doubles, in a fixed block
// order) of about kBlockPixels pixels of one image, all channels; block_fn(n, h0, rows, s1, s2)
// adds a block's sums to s1, s2 (fp32, or double for float64).
template <typename T, typename BlockFn>
std::vector<double> pixel_block_partials(const View4<T>& x, BlockFn block_fn) {
  const int64_t C = x.c;
  const int64_t rows = block_rows(x.w), per_image = (x.h + rows - 1) / rows, blocks = x.n * per_image;
  std::vector<double> partials(blocks * C * 2);
  at::parallel_for(0, blocks, grain(rows * x.w * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> s1(C), s2(C);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b / per_image, h0 = (b % per_image) * rows, h1 = std::min(x.h, h0 + rows);
      std::fill(s1.begin(), s1.end(), acc_t<T>(0));
      std::fill(s2.begin(), s2.end(), acc_t<T>(0));
      block_fn(n, h0, h1 - h0, s1.data(), s2.data());
      for (int64_t c = 0; c < C; ++c) {
        partials[(b * C + c) * 2] = s1[c];
        partials[(b * C + c) * 2 + 1] = s2[c];
      }
    }
  });
  return partials;
}

// Per-channel totals of pixel_block_partials, summed in block order.
inline void sum_blocks(const std::vector<double>& partials, int64_t C, std::vector<double>& s1,
                       std::vector<double>& s2) {
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  const int64_t blocks = int64_t(partials.size()) / (2 * C);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += partials[(b * C + c) * 2];
      s2[c] += partials[(b * C + c) * 2 + 1];
    }
  }
}

// A channel's mean and rstd from the sums of x - k and (x - k)^2 over its M values.
inline std::pair<double, double> mean_rstd(double s1, double s2, double k, double M, double eps) {
  const double shifted_mean = s1 / M;
  const double var = std::max(0.0, s2 / M - shifted_mean * shifted_mean);
  return {k + shifted_mean, 1.0 / std::sqrt(var + eps)};
}

// The backward's constants for a channel, dx = k1 g' + k2 (x - mean) + k3, from sum(g') and
// sum(g' (x - mean)); writes dgamma and dbeta.
template <typename A>
inline std::array<A, 3> grad_constants(double sum_g, double sum_gd, double gamma, double rstd, double M,
                                       A* dgamma, A* dbeta) {
  const double gr = gamma * rstd;
  *dbeta = A(sum_g);
  *dgamma = A(sum_gd * rstd);
  return {A(gr), A(-gr * rstd * rstd * sum_gd / M), A(-gr * sum_g / M)};
}

// The forward: y = act((x - mean) * gamma * rstd + beta), y a view with x's shape; writes mean, rstd.
// Per channel (NCHW): one task per channel sums its N planes and then normalises them
// while they are still in cache, so x comes from memory once. Interleaved: a pass for the sums
// over blocks of pixels, then one for the output.
template <typename T>
void forward(const View4<T>& x, const View4<T>& y, bool per_channel, const acc_t<T>* gamma, const acc_t<T>* beta,
             double eps, acc_t<T> slope, acc_t<T>* mean_out, acc_t<T>* rstd_out) {
  using A = acc_t<T>;
  const int64_t C = x.c;
  const double M = double(x.n * x.h * x.w);
  if (per_channel) {
    auto sums = x.sw == 1 ? plane_sums<T, true> : plane_sums<T, false>;
    auto apply = x.sw == 1 && y.sw == 1 ? plane_normalize<T, true> : plane_normalize<T, false>;
    at::parallel_for(0, C, grain(x.n * x.h * x.w), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const A k = to_acc(x.plane(0, c)[0]);
        double s1 = 0, s2 = 0, plane[2];
        for (int64_t n = 0; n < x.n; ++n) {
          sums(x.plane(n, c), x.h, x.w, x.sh, x.sw, k, plane);
          s1 += plane[0];
          s2 += plane[1];
        }
        const auto [mean, rstd] = mean_rstd(s1, s2, double(k), M, eps);
        mean_out[c] = A(mean);
        rstd_out[c] = A(rstd);
        const A scale = A(double(gamma[c]) * rstd);
        for (int64_t n = 0; n < x.n; ++n)
          apply(x.plane(n, c), y.plane(n, c), x.h, x.w, x.sh, x.sw, y.sh, y.sw, mean_out[c], scale, beta[c], slope);
      }
    });
    return;
  }
  std::vector<A> k(C), scale(C);
  for (int64_t c = 0; c < C; ++c) k[c] = to_acc(x.plane(0, c)[0]);
  auto partials = pixel_block_partials(x, [&](int64_t n, int64_t h0, int64_t rows, A* s1, A* s2) {
    auto sums = C < kFewChannels ? pixel_sums<T, true> : pixel_sums<T, false>;
    sums(x.row(n, h0), rows, x.w, x.sh, x.sw, C, k.data(), s1, s2);
  });
  std::vector<double> s1, s2;
  sum_blocks(partials, C, s1, s2);
  for (int64_t c = 0; c < C; ++c) {
    const auto [mean, rstd] = mean_rstd(s1[c], s2[c], double(k[c]), M, eps);
    mean_out[c] = A(mean);
    rstd_out[c] = A(rstd);
    scale[c] = A(double(gamma[c]) * rstd);
  }
  auto apply = C < kFewChannels ? pixel_normalize<T, true> : pixel_normalize<T, false>;
  at::parallel_for(0, x.n * x.h, grain(x.w * C), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / x.h, h = q % x.h;
      apply(x.row(n, h), y.row(n, h), x.w, x.sw, y.sw, C, mean_out, scale.data(), beta, slope);
    }
  });
}

// The backward: dx (a view with x's shape), dgamma and dbeta, walked as the forward is.
template <typename T>
void backward(const View4<T>& g, const View4<T>& x, const View4<T>& dx, bool per_channel, const acc_t<T>* gamma,
              const acc_t<T>* beta, const acc_t<T>* mean, const acc_t<T>* rstd, acc_t<T> slope, acc_t<T>* dgamma,
              acc_t<T>* dbeta) {
  using A = acc_t<T>;
  const int64_t C = x.c;
  const double M = double(x.n * x.h * x.w);
  std::vector<A> scale(C);
  for (int64_t c = 0; c < C; ++c) scale[c] = A(double(gamma[c]) * double(rstd[c]));
  if (per_channel) {
    auto sums = g.sw == 1 && x.sw == 1 ? plane_grad_sums<T, true> : plane_grad_sums<T, false>;
    auto apply = g.sw == 1 && x.sw == 1 && dx.sw == 1 ? plane_grad_input<T, true> : plane_grad_input<T, false>;
    at::parallel_for(0, C, grain(x.n * x.h * x.w), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum_g = 0, sum_gd = 0, plane[2];
        for (int64_t n = 0; n < x.n; ++n) {
          sums(g.plane(n, c), x.plane(n, c), x.h, x.w, g.sh, g.sw, x.sh, x.sw, mean[c], scale[c], beta[c], slope,
               plane);
          sum_g += plane[0];
          sum_gd += plane[1];
        }
        const auto [k1, k2, k3] = grad_constants(sum_g, sum_gd, double(gamma[c]), double(rstd[c]), M, &dgamma[c],
                                                 &dbeta[c]);
        for (int64_t n = 0; n < x.n; ++n)
          apply(g.plane(n, c), x.plane(n, c), dx.plane(n, c), x.h, x.w, g.sh, g.sw, x.sh, x.sw, dx.sh, dx.sw, mean[c],
                scale[c], beta[c], slope, k1, k2, k3);
      }
    });
    return;
  }
  auto partials = pixel_block_partials(x, [&](int64_t n, int64_t h0, int64_t rows, A* s1, A* s2) {
    auto sums = C < kFewChannels ? pixel_grad_sums<T, true> : pixel_grad_sums<T, false>;
    sums(g.row(n, h0), x.row(n, h0), rows, x.w, g.sh, g.sw, x.sh, x.sw, C, mean, scale.data(), beta, slope, s1, s2);
  });
  std::vector<double> sum_g, sum_gd;
  sum_blocks(partials, C, sum_g, sum_gd);
  std::vector<A> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto [a, b, d] = grad_constants(sum_g[c], sum_gd[c], double(gamma[c]), double(rstd[c]), M, &dgamma[c],
                                          &dbeta[c]);
    k1[c] = a, k2[c] = b, k3[c] = d;
  }
  auto apply = C < kFewChannels ? pixel_grad_input<T, true> : pixel_grad_input<T, false>;
  at::parallel_for(0, x.n * x.h, grain(x.w * C), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / x.h, h = q % x.h;
      apply(g.row(n, h), x.row(n, h), dx.row(n, h), x.w, g.sw, x.sw, dx.sw, C, mean, scale.data(), beta, slope,
            k1.data(), k2.data(), k3.data());
    }
  });
}

// ---- reflection padding: fill the border of a padded buffer from its interior, fold it back --

// The interior position that padded index i of a side (n values + p on each end) reflects:
// as a padded index, p + (p - i), i, or p + 2(n - 1) - (i - p).
inline int64_t reflect(int64_t i, int64_t n, int64_t p) {
  const int64_t s = i - p;
  return p + (s < 0 ? -s : (s >= n ? 2 * (n - 1) - s : s));
}

// y: the padded (N, C, H + 2p, W + 2p) buffer, freshly allocated (dense), whose interior is written.
// Planar: per plane; interleaved: per image, pixels of C values.
template <typename T>
void fill_reflection_border(const View4<T>& y, bool planar, int64_t p) {
  const int64_t H = y.h - 2 * p, W = y.w - 2 * p;
  const int64_t inner = planar ? 1 : y.c;  // values per pixel
  const int64_t units = planar ? y.n * y.c : y.n;
  at::parallel_for(0, units, grain(y.h * y.w * inner), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      T* base = planar ? y.plane(u / y.c, u % y.c) : y.row(u, 0);
      for (int64_t i = p; i < p + H; ++i) {  // the left and right pads of the interior rows
        T* row = base + i * y.sh;
        for (int64_t j = 0; j < p; ++j) std::copy_n(row + reflect(j, W, p) * inner, inner, row + j * inner);
        for (int64_t j = p + W; j < y.w; ++j) std::copy_n(row + reflect(j, W, p) * inner, inner, row + j * inner);
      }
      for (int64_t i = 0; i < y.h; ++i) {  // the top and bottom pad rows, whole
        if (i < p || i >= p + H) std::copy_n(base + reflect(i, H, p) * y.sh, y.w * inner, base + i * y.sh);
      }
    }
  });
}

// out (pixels x inner values, dense) = the sum of <= 3 rows of a padded gradient (pixel stride sw).
template <typename T>
DIPFAST_SIMD_CLONES void sum_rows(const T* const* rows, int64_t nrows, int64_t pixels, int64_t sw, int64_t inner,
                                  acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const bool dense = sw == inner;
  const int64_t runs = dense ? 1 : pixels, run = dense ? pixels * inner : inner;
  for (int64_t e = 0; e < runs; ++e) {
    A* o = out + e * inner;
    const T* r0 = rows[0] + e * sw;
#pragma omp simd
    for (int64_t i = 0; i < run; ++i) o[i] = to_acc(r0[i]);
    for (int64_t r = 1; r < nrows; ++r) {
      const T* rr = rows[r] + e * sw;
#pragma omp simd
      for (int64_t i = 0; i < run; ++i) o[i] += to_acc(rr[i]);
    }
  }
}

template <typename T>
DIPFAST_SIMD_CLONES void round_row(const acc_t<T>* __restrict__ v, int64_t n, T* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = from_acc<T>(v[i]);
}

// g (N, C, H, W), freshly allocated (dense) = the adjoint of reflection padding applied to gp
// (N, C, H + 2p, W + 2p): each value gathers the <= 3 x 3 padded positions that reflect onto it.
template <typename T>
void fold_reflection_border(const View4<T>& gp, const View4<T>& g, bool planar, int64_t p) {
  using A = acc_t<T>;
  const int64_t H = g.h, W = g.w, Wp = gp.w;
  const int64_t inner = planar ? 1 : g.c;
  const int64_t units = planar ? g.n * g.c : g.n;
  at::parallel_for(0, units * H, grain(Wp * inner), [&](int64_t begin, int64_t end) {
    std::vector<A> sums(Wp * inner);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t u = q / H, h = q % H;
      const T* src = planar ? gp.plane(u / g.c, u % g.c) : gp.row(u, 0);
      T* dst = (planar ? g.plane(u / g.c, u % g.c) : g.row(u, 0)) + h * g.sh;
      // The padded rows that reflect onto row h: h + p, and its mirrors above and below.
      const T* rows[3] = {src + (h + p) * gp.sh, nullptr, nullptr};
      int64_t nrows = 1;
      if (h >= 1 && h <= p) rows[nrows++] = src + (p - h) * gp.sh;
      if (h >= H - 1 - p && h <= H - 2) rows[nrows++] = src + (p + 2 * (H - 1) - h) * gp.sh;
      sum_rows<T>(rows, nrows, Wp, gp.sw, inner, sums.data());
      // Fold the pad columns onto the interior ones they mirror (sources lie in the pads, never written).
      for (int64_t w = 1; w <= p; ++w)
        for (int64_t i = 0; i < inner; ++i) sums[(w + p) * inner + i] += sums[(p - w) * inner + i];
      for (int64_t w = std::max<int64_t>(W - 1 - p, 0); w <= W - 2; ++w)
        for (int64_t i = 0; i < inner; ++i) sums[(w + p) * inner + i] += sums[(p + 2 * (W - 1) - w) * inner + i];
      round_row<T>(sums.data() + p * inner, W * inner, dst);
    }
  });
}

// ---- the ops ------------------------------------------------------------------------------------

at::ScalarType compute_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (N, C, H, W); got ", x.sizes());
  TORCH_CHECK(readable(x), op, ": ", name, " must have unit stride along W or C (NCHW or channels_last); got strides ",
              x.strides());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, op, ": expected more than 1 value per channel; got ", name,
              " of shape ", x.sizes());
}

void check_channel_vector(const char* op, const char* name, const at::Tensor& v, int64_t C, at::ScalarType dtype) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C && v.is_contiguous(), op, ": ", name,
              " must be a contiguous vector of ", C, " values; got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (the compute dtype); got ",
              v.scalar_type());
}

at::Tensor channel_vector(const at::Tensor& x, int64_t C) {
  return at::empty({C}, x.options().dtype(compute_dtype(x)));
}

at::Tensor empty_in_layout_of(at::IntArrayRef sizes, const at::Tensor& like) {
  return at::empty(sizes, like.options().memory_format(layout_of(like)));
}

template <typename T>
using A_of = acc_t<typename Storage<T>::type>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps,
                                                                  double negative_slope) {
  const char* op = "dipfast_native::batch_norm_act_fwd";
  check_input(op, "x", x);
  check_channel_vector(op, "weight", weight, x.size(1), compute_dtype(x));
  check_channel_vector(op, "bias", bias, x.size(1), compute_dtype(x));
  auto y = empty_in_layout_of(x.sizes(), x);
  auto mean = channel_vector(x, x.size(1)), rstd = channel_vector(x, x.size(1));
  const bool per_channel = planar_pass({x, y});
  dispatch_float_types(x, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    using A = A_of<T>;
    forward(view4<T>(x), view4<T>(y), per_channel, weight.data_ptr<A>(), bias.data_ptr<A>(), eps, A(negative_slope),
            mean.data_ptr<A>(), rstd.data_ptr<A>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  double negative_slope) {
  const char* op = "dipfast_native::batch_norm_act_bwd";
  check_input(op, "x", x);
  check_input(op, "grad", grad);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must have the shape and dtype of x; got ", grad.sizes(), " ", grad.scalar_type(), " for ",
              x.sizes(), " ", x.scalar_type());
  const int64_t C = x.size(1);
  check_channel_vector(op, "weight", weight, C, compute_dtype(x));
  check_channel_vector(op, "bias", bias, C, compute_dtype(x));
  check_channel_vector(op, "mean", mean, C, compute_dtype(x));
  check_channel_vector(op, "rstd", rstd, C, compute_dtype(x));
  auto g = matching(grad, x);
  auto dx = empty_in_layout_of(x.sizes(), x);
  auto dweight = channel_vector(x, C), dbias = channel_vector(x, C);
  const bool per_channel = planar_pass({g, x, dx});
  dispatch_float_types(x, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    using A = A_of<T>;
    backward(view4<T>(g), view4<T>(x), view4<T>(dx), per_channel, weight.data_ptr<A>(), bias.data_ptr<A>(),
             mean.data_ptr<A>(), rstd.data_ptr<A>(), A(negative_slope), dweight.data_ptr<A>(), dbias.data_ptr<A>());
  });
  return {dx, dweight, dbias};
}

void check_parts(const char* op, const at::Tensor& skip, const at::Tensor& deeper) {
  check_input(op, "skip", skip);
  check_input(op, "deeper", deeper);
  TORCH_CHECK(skip.size(0) == deeper.size(0) && skip.size(2) == deeper.size(2) && skip.size(3) == deeper.size(3) &&
                  skip.scalar_type() == deeper.scalar_type(),
              op, ": skip and deeper must share N, H, W and dtype; got ", skip.sizes(), " ", skip.scalar_type(),
              " and ", deeper.sizes(), " ", deeper.scalar_type());
}

void check_pad(const char* op, const at::Tensor& x, int64_t pad) {
  TORCH_CHECK(pad >= 0 && pad < x.size(2) && pad < x.size(3), op,
              ": reflection padding needs 0 <= pad < H and pad < W; got pad ", pad, " for ", x.sizes());
}

// The merge: BatchNorm over cat([skip, deeper], 1), each part normalised straight into its channel
// slice of the output (per-channel statistics make the parts independent). pad > 0: the output is
// the (N, C, H + 2 pad, W + 2 pad) buffer the next conv reads, its border filled by reflection.
std::tuple<at::Tensor, at::Tensor, at::Tensor> concat_batch_norm_fwd(const at::Tensor& skip, const at::Tensor& deeper,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     double eps, int64_t pad) {
  const char* op = "dipfast_native::concat_batch_norm_fwd";
  check_parts(op, skip, deeper);
  check_pad(op, deeper, pad);
  const int64_t C = skip.size(1) + deeper.size(1), H = deeper.size(2), W = deeper.size(3);
  check_channel_vector(op, "weight", weight, C, compute_dtype(deeper));
  check_channel_vector(op, "bias", bias, C, compute_dtype(deeper));
  // deeper's layout (skip's when deeper has one channel, which says nothing about its layout)
  auto y = empty_in_layout_of({deeper.size(0), C, H + 2 * pad, W + 2 * pad}, deeper.size(1) > 1 ? deeper : skip);
  auto interior = y.narrow(2, pad, H).narrow(3, pad, W);
  auto mean = channel_vector(deeper, C), rstd = channel_vector(deeper, C);
  dispatch_float_types(deeper, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    using A = A_of<T>;
    int64_t c0 = 0;
    for (const at::Tensor* part : {&skip, &deeper}) {
      auto out = interior.narrow(1, c0, part->size(1));
      auto x = matching(*part, out);
      const bool per_channel = planar_pass({x, out});
      forward(view4<T>(x), view4<T>(out), per_channel, weight.data_ptr<A>() + c0, bias.data_ptr<A>() + c0, eps, A(1),
              mean.data_ptr<A>() + c0, rstd.data_ptr<A>() + c0);
      c0 += part->size(1);
    }
    if (pad > 0) fill_reflection_border(view4<T>(y), planar_pass({y}), pad);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> concat_batch_norm_bwd(
    const at::Tensor& grad, const at::Tensor& skip, const at::Tensor& deeper, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t pad) {
  const char* op = "dipfast_native::concat_batch_norm_bwd";
  check_parts(op, skip, deeper);
  check_pad(op, deeper, pad);
  check_input(op, "grad", grad);
  const int64_t C = skip.size(1) + deeper.size(1), H = deeper.size(2), W = deeper.size(3);
  TORCH_CHECK(grad.size(0) == deeper.size(0) && grad.size(1) == C && grad.size(2) == H + 2 * pad &&
                  grad.size(3) == W + 2 * pad && grad.scalar_type() == deeper.scalar_type(),
              op, ": grad must have the merged output's shape and dtype; got ", grad.sizes(), " ", grad.scalar_type());
  check_channel_vector(op, "weight", weight, C, compute_dtype(deeper));
  check_channel_vector(op, "mean", mean, C, compute_dtype(deeper));
  check_channel_vector(op, "rstd", rstd, C, compute_dtype(deeper));
  auto dweight = channel_vector(deeper, C), dbias = channel_vector(deeper, C);
  std::vector<at::Tensor> dparts;
  dispatch_float_types(deeper, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    using A = A_of<T>;
    auto g_merged = grad;
    if (pad > 0) {  // fold the border back onto the interior it mirrors, then the unpadded backward
      auto gp = matching(grad, deeper);
      g_merged = empty_in_layout_of({deeper.size(0), C, H, W}, gp);
      fold_reflection_border(view4<T>(gp), view4<T>(g_merged), planar_pass({gp, g_merged}), pad);
    }
    const std::vector<A> any_beta(C, A(0));  // with no activation, beta does not enter the backward
    int64_t c0 = 0;
    for (const at::Tensor* part : {&skip, &deeper}) {
      auto x = *part;
      auto g = matching(g_merged.narrow(1, c0, x.size(1)), x);
      auto dx = empty_in_layout_of(x.sizes(), x);
      const bool per_channel = planar_pass({g, x, dx});
      backward(view4<T>(g), view4<T>(x), view4<T>(dx), per_channel, weight.data_ptr<A>() + c0, any_beta.data() + c0,
               mean.data_ptr<A>() + c0, rstd.data_ptr<A>() + c0, A(1), dweight.data_ptr<A>() + c0,
               dbias.data_ptr<A>() + c0);
      dparts.push_back(dx);
      c0 += x.size(1);
    }
  });
  return {dparts[0], dparts[1], dweight, dbias};
}

// BatchNorm + activation written into the interior of a (N, C, H + 2p, W + 2p) buffer whose border
// is then filled by reflection: F.pad(batch_norm_act(x), (p,) * 4, mode="reflect") in one buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_reflect_pad_fwd(const at::Tensor& x,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bias, double eps,
                                                                              double negative_slope, int64_t pad) {
  const char* op = "dipfast_native::batch_norm_act_reflect_pad_fwd";
  check_input(op, "x", x);
  check_pad(op, x, pad);
  check_channel_vector(op, "weight", weight, x.size(1), compute_dtype(x));
  check_channel_vector(op, "bias", bias, x.size(1), compute_dtype(x));
  auto y = empty_in_layout_of({x.size(0), x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad}, x);
  auto interior = y.narrow(2, pad, x.size(2)).narrow(3, pad, x.size(3));
  auto mean = channel_vector(x, x.size(1)), rstd = channel_vector(x, x.size(1));
  const bool per_channel = planar_pass({x, interior}), planar = planar_pass({y});
  dispatch_float_types(x, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    using A = A_of<T>;
    forward(view4<T>(x), view4<T>(interior), per_channel, weight.data_ptr<A>(), bias.data_ptr<A>(), eps,
            A(negative_slope), mean.data_ptr<A>(), rstd.data_ptr<A>());
    fill_reflection_border(view4<T>(y), planar, pad);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_reflect_pad_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, double negative_slope, int64_t pad) {
  const char* op = "dipfast_native::batch_norm_act_reflect_pad_bwd";
  check_input(op, "x", x);
  check_pad(op, x, pad);
  check_input(op, "grad", grad);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == x.size(2) + 2 * pad &&
                  grad.size(3) == x.size(3) + 2 * pad && grad.scalar_type() == x.scalar_type(),
              op, ": grad must have the padded output's shape and dtype; got ", grad.sizes(), " ", grad.scalar_type());
  auto g = matching(grad, x);
  auto folded = empty_in_layout_of(x.sizes(), x);
  const bool planar = planar_pass({g, folded});
  dispatch_float_types(x, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    fold_reflection_border(view4<T>(g), view4<T>(folded), planar, pad);
  });
  return batch_norm_act_bwd(folded, x, weight, bias, mean, rstd, negative_slope);
}

}  // namespace

// Every TU of the library adds its own ops with a fragment (no TU owns the namespace).
TORCH_LIBRARY_FRAGMENT(dipfast_native, m) {
  m.def(
      "batch_norm_act_fwd(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd,"
      " float negative_slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "concat_batch_norm_fwd(Tensor skip, Tensor deeper, Tensor weight, Tensor bias, float eps, int pad=0)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "concat_batch_norm_bwd(Tensor grad, Tensor skip, Tensor deeper, Tensor weight, Tensor mean, Tensor rstd,"
      " int pad=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_reflect_pad_fwd(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope,"
      " int pad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_reflect_pad_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
      " Tensor rstd, float negative_slope, int pad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dipfast_native, CPU, m) {
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd);
  m.impl("concat_batch_norm_fwd", &concat_batch_norm_fwd);
  m.impl("concat_batch_norm_bwd", &concat_batch_norm_bwd);
  m.impl("batch_norm_act_reflect_pad_fwd", &batch_norm_act_reflect_pad_fwd);
  m.impl("batch_norm_act_reflect_pad_bwd", &batch_norm_act_reflect_pad_bwd);
}

}  // namespace dipfast_native
