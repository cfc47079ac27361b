// Bilinear x2 upsampling with align_corners=False, F.interpolate(x, scale_factor=2, mode="bilinear"),
// forward and backward, both as gathers (each output value is computed by one thread from the
// values it depends on: no scatter, no atomics).
//
// Along each axis the source of output index d is d / 2 - 1 / 4, clamped at 0, so with x the input:
//   out[2j]     = 1/4 x[j - 1] + 3/4 x[j]        (out[0] = x[0])
//   out[2j + 1] = 3/4 x[j]     + 1/4 x[j + 1]    (x[W] read as x[W - 1])
// The 2-D map is that 1-D map along W on each input row, then along H (ATen's order). The
// backward is its transpose, again separable: input index j gathers output indices 2j - 1 (1/4),
// 2j (3/4; 1 at j = 0), 2j + 1 (3/4; 1 at j = W - 1) and 2j + 2 (1/4). Math in fp32 (float64 for
// float64), one rounding to the output dtype; NCHW or channels_last, the output in the input's layout.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dipfast_native {
namespace {

// ---- leaf loops: compiled per SIMD level (common.h) --------------------------------------------

// out (2w values) = the 1-D x2 map of one planar input row (unit stride when w > 1).
template <typename T>
DIPFAST_SIMD_CLONES void upsample_row(const T* __restrict__ x, int64_t w, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const A q = A(0.25), t = A(0.75);
  out[0] = to_acc(x[0]);
#pragma omp simd
  for (int64_t j = 1; j < w; ++j) {
    const A a = to_acc(x[j - 1]), b = to_acc(x[j]);
    out[2 * j - 1] = t * a + q * b;
    out[2 * j] = q * a + t * b;
  }
  const A last = to_acc(x[w - 1]);
  out[2 * w - 1] = t * last + q * last;
}

// out = a * wa + b * wb, rounded to T (one output row from two upsampled input rows).
template <typename T>
DIPFAST_SIMD_CLONES void blend_rows(const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ b, acc_t<T> wa,
                                    acc_t<T> wb, int64_t n, T* __restrict__ out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = from_acc<T>(wa * a[k] + wb * b[k]);
}

// Output rows 2i and 2i + 1 of an interleaved image (pixels of c values, input pixel stride sw),
// straight from input rows r0 = x[i - 1], r1 = x[i], r2 = x[i + 1] (clamped): per output pixel
// 4 loads and the two 1-D maps in ATen's order, with nothing staged (rows of 128 channels are too
// wide to stage in L1). first: i == 0, where row 2i is x[0]'s row alone.
template <typename T>
DIPFAST_SIMD_CLONES void upsample_row_pair(const T* __restrict__ r0, const T* __restrict__ r1,
                                           const T* __restrict__ r2, int64_t w, int64_t sw, int64_t c, bool first,
                                           T* __restrict__ even_row, T* __restrict__ odd_row) {
  using A = acc_t<T>;
  const A q = A(0.25), t = A(0.75);
  const A va = first ? A(0) : q, vb = first ? A(1) : t;  // row 2i = va * row(i - 1) + vb * row(i)
  for (int64_t j = 0; j < w; ++j) {
    const int64_t jl = std::max<int64_t>(j - 1, 0) * sw, jm = j * sw, jr = std::min<int64_t>(j + 1, w - 1) * sw;
    const A hl = j == 0 ? A(0) : q, hm = j == 0 ? A(1) : t;  // column 2j = hl * x[j - 1] + hm * x[j]
    T* e0 = even_row + 2 * j * c;
    T* e1 = e0 + c;
    T* o0 = odd_row + 2 * j * c;
    T* o1 = o0 + c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const A m0 = to_acc(r0[jm + k]), m1 = to_acc(r1[jm + k]), m2 = to_acc(r2[jm + k]);
      const A left0 = hl * to_acc(r0[jl + k]) + hm * m0, right0 = t * m0 + q * to_acc(r0[jr + k]);
      const A left1 = hl * to_acc(r1[jl + k]) + hm * m1, right1 = t * m1 + q * to_acc(r1[jr + k]);
      const A left2 = hl * to_acc(r2[jl + k]) + hm * m2, right2 = t * m2 + q * to_acc(r2[jr + k]);
      e0[k] = from_acc<T>(va * left0 + vb * left1);
      e1[k] = from_acc<T>(va * right0 + vb * right1);
      o0[k] = from_acc<T>(t * left1 + q * left2);
      o1[k] = from_acc<T>(t * right1 + q * right2);
    }
  }
}

// The taps (<= 4) of the transposed 1-D map at input index j of a side of length n: output
// indices and weights, as in the header comment.
template <typename A>
inline int64_t adjoint_taps(int64_t j, int64_t n, int64_t* index, A* weight) {
  int64_t k = 0;
  if (j >= 1) index[k] = 2 * j - 1, weight[k++] = A(0.25);
  index[k] = 2 * j, weight[k++] = j == 0 ? A(1) : A(0.75);
  index[k] = 2 * j + 1, weight[k++] = j == n - 1 ? A(1) : A(0.75);
  if (j <= n - 2) index[k] = 2 * j + 2, weight[k++] = A(0.25);
  return k;
}

// out[0 : n] = sum of weight[r] * rows[r][0 : n] over 4 dense grad rows (padded with weight 0).
template <typename T>
DIPFAST_SIMD_CLONES void gather_rows(const T* const* rows, const acc_t<T>* weights, int64_t n,
                                     acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  const T *g0 = rows[0], *g1 = rows[1], *g2 = rows[2], *g3 = rows[3];
  const A w0 = weights[0], w1 = weights[1], w2 = weights[2], w3 = weights[3];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    out[e] = w0 * to_acc(g0[e]) + w1 * to_acc(g1[e]) + w2 * to_acc(g2[e]) + w3 * to_acc(g3[e]);
  }
}

// dx row (w values, unit stride) = the transposed 1-D map of v (2w values), for a planar row.
template <typename T>
DIPFAST_SIMD_CLONES void downsample_row_adjoint(const acc_t<T>* __restrict__ v, int64_t w, T* __restrict__ dx) {
  using A = acc_t<T>;
  const A q = A(0.25), t = A(0.75);
#pragma omp simd
  for (int64_t j = 1; j < w - 1; ++j) {
    dx[j] = from_acc<T>(q * v[2 * j - 1] + t * v[2 * j] + t * v[2 * j + 1] + q * v[2 * j + 2]);
  }
  for (int64_t j : {int64_t(0), w - 1}) {  // the borders, where the taps fold (w == 1: both at once)
    int64_t index[4];
    A weight[4];
    const int64_t k = adjoint_taps(j, w, index, weight);
    A s = 0;
    for (int64_t m = 0; m < k; ++m) s += weight[m] * v[index[m]];
    dx[j] = from_acc<T>(s);
  }
}

// Input row i of an interleaved image's gradient, straight from the grad rows that read it (rows,
// row_weights: adjoint_taps along H, padded to 4 with weight 0), each input pixel gathering its
// 4 x 4 grad pixels (the same padding along W), vectorised over the channels.
template <typename T>
DIPFAST_SIMD_CLONES void adjoint_row_interleaved(const T* const* rows, const acc_t<T>* row_weights, int64_t w,
                                                 int64_t sgw, int64_t c, T* __restrict__ dx, int64_t sdw) {
  using A = acc_t<T>;
  const T *g0 = rows[0], *g1 = rows[1], *g2 = rows[2], *g3 = rows[3];
  const A w0 = row_weights[0], w1 = row_weights[1], w2 = row_weights[2], w3 = row_weights[3];
  for (int64_t j = 0; j < w; ++j) {
    int64_t cols[4];
    A cw[4];
    const int64_t ncols = adjoint_taps(j, w, cols, cw);
    for (int64_t m = ncols; m < 4; ++m) cols[m] = cols[0], cw[m] = A(0);
    const int64_t e0 = cols[0] * sgw, e1 = cols[1] * sgw, e2 = cols[2] * sgw, e3 = cols[3] * sgw;
    const A c0 = cw[0], c1 = cw[1], c2 = cw[2], c3 = cw[3];
    T* o = dx + j * sdw;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      // the 4 taps along W of each of the 4 grad rows, then the 4 taps along H
      const A v0 = c0 * to_acc(g0[e0 + k]) + c1 * to_acc(g0[e1 + k]) +  //
                   c2 * to_acc(g0[e2 + k]) + c3 * to_acc(g0[e3 + k]);
      const A v1 = c0 * to_acc(g1[e0 + k]) + c1 * to_acc(g1[e1 + k]) +  //
                   c2 * to_acc(g1[e2 + k]) + c3 * to_acc(g1[e3 + k]);
      const A v2 = c0 * to_acc(g2[e0 + k]) + c1 * to_acc(g2[e1 + k]) +  //
                   c2 * to_acc(g2[e2 + k]) + c3 * to_acc(g2[e3 + k]);
      const A v3 = c0 * to_acc(g3[e0 + k]) + c1 * to_acc(g3[e1 + k]) +  //
                   c2 * to_acc(g3[e2 + k]) + c3 * to_acc(g3[e3 + k]);
      o[k] = from_acc<T>(w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3);
    }
  }
}

// ---- the passes ----------------------------------------------------------------------------------

// Planar: tasks of whole input rows of one (n, c) plane, about 8k output values each.
inline int64_t rows_per_task(int64_t w) { return std::max<int64_t>(1, 8192 / (4 * w)); }

// y (N, C, 2H, 2W), freshly allocated (dense), from x.
template <typename T>
void upsample_forward(const View4<T>& x, const View4<T>& y, bool planar) {
  using A = acc_t<T>;
  const int64_t H = x.h, W = x.w;
  if (!planar) {  // one task per output row pair of an image
    at::parallel_for(0, x.n * H, grain(4 * W * x.c), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, i = task % H;
        upsample_row_pair<T>(x.row(n, std::max<int64_t>(i - 1, 0)), x.row(n, i), x.row(n, std::min(i + 1, H - 1)), W,
                             x.sw, x.c, i == 0, y.row(n, 2 * i), y.row(n, 2 * i + 1));
      }
    });
    return;
  }
  const int64_t block = rows_per_task(W), per_plane = (H + block - 1) / block, width = 2 * W;
  at::parallel_for(0, x.n * x.c * per_plane, grain(4 * block * W), [&](int64_t begin, int64_t end) {
    std::vector<A> buffers(3 * width);  // input rows i - 1, i, i + 1 upsampled along W
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / per_plane, i0 = (task % per_plane) * block, i1 = std::min(H, i0 + block);
      const T* xp = x.plane(p / x.c, p % x.c);
      T* yp = y.plane(p / x.c, p % x.c);
      A* prev = buffers.data();
      A* cur = prev + width;
      A* next = cur + width;
      upsample_row<T>(xp + std::max<int64_t>(i0 - 1, 0) * x.sh, W, prev);
      upsample_row<T>(xp + i0 * x.sh, W, cur);
      for (int64_t i = i0; i < i1; ++i) {
        upsample_row<T>(xp + std::min(i + 1, H - 1) * x.sh, W, next);
        if (i == 0) {
          blend_rows<T>(cur, cur, A(1), A(0), width, yp);
        } else {
          blend_rows<T>(prev, cur, A(0.25), A(0.75), width, yp + 2 * i * y.sh);
        }
        blend_rows<T>(cur, next, A(0.75), A(0.25), width, yp + (2 * i + 1) * y.sh);
        std::swap(prev, cur);
        std::swap(cur, next);
      }
    }
  });
}

// dx (N, C, H, W), freshly allocated, from the gradient g (N, C, 2H, 2W) of upsample_forward's output.
template <typename T>
void upsample_backward(const View4<T>& g, const View4<T>& dx, bool planar) {
  using A = acc_t<T>;
  const int64_t H = dx.h, W = dx.w;
  const int64_t block = planar ? rows_per_task(W) : 1, per_unit = (H + block - 1) / block;
  const int64_t units = planar ? dx.n * dx.c : dx.n;  // a plane, or an image of interleaved pixels
  const int64_t values_per_task = 4 * block * W * (planar ? 1 : dx.c);
  at::parallel_for(0, units * per_unit, grain(values_per_task), [&](int64_t begin, int64_t end) {
    std::vector<A> v(planar ? 2 * W : 0);  // a planar row's vertical gather
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / per_unit, i0 = (task % per_unit) * block, i1 = std::min(H, i0 + block);
      const T* gu = planar ? g.plane(u / g.c, u % g.c) : g.row(u, 0);
      T* du = planar ? dx.plane(u / dx.c, u % dx.c) : dx.row(u, 0);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t index[4];
        A weight[4];
        const T* rows[4];
        const int64_t k = adjoint_taps(i, H, index, weight);
        for (int64_t m = 0; m < 4; ++m) {  // padded to 4 taps with weight 0
          rows[m] = gu + (m < k ? index[m] : index[0]) * g.sh;
          weight[m] = m < k ? weight[m] : A(0);
        }
        if (planar) {
          gather_rows<T>(rows, weight, 2 * W, v.data());
          downsample_row_adjoint<T>(v.data(), W, du + i * dx.sh);
        } else {  // rows of 128 channels are too wide to stage in L1: gather per pixel
          adjoint_row_interleaved<T>(rows, weight, W, g.sw, dx.c, du + i * dx.sh, dx.sw);
        }
      }
    }
  });
}

void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, op, ": ", name, " must be a non-empty (N, C, H, W); got ", x.sizes());
  TORCH_CHECK(readable(x), op, ": ", name, " must have unit stride along W or C (NCHW or channels_last); got strides ",
              x.strides());
}

at::Tensor upsample_bilinear2x_fwd(const at::Tensor& x) {
  const char* op = "dipfast_native::upsample_bilinear2x_fwd";
  check_input(op, "x", x);
  auto y = at::empty({x.size(0), x.size(1), 2 * x.size(2), 2 * x.size(3)}, x.options().memory_format(layout_of(x)));
  const bool planar = planar_pass({x, y});
  dispatch_float_types(x, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    upsample_forward(view4<T>(x), view4<T>(y), planar);
  });
  return y;
}

// grad: (N, C, 2h, 2w), the gradient of upsample_bilinear2x_fwd's output; returns (N, C, h, w).
at::Tensor upsample_bilinear2x_bwd(const at::Tensor& grad, int64_t h, int64_t w) {
  const char* op = "dipfast_native::upsample_bilinear2x_bwd";
  check_input(op, "grad", grad);
  TORCH_CHECK(h >= 1 && w >= 1 && grad.size(2) == 2 * h && grad.size(3) == 2 * w, op, ": grad must be (N, C, ", 2 * h,
              ", ", 2 * w, ") for an input of ", h, " x ", w, "; got ", grad.sizes());
  auto dx = at::empty({grad.size(0), grad.size(1), h, w}, grad.options().memory_format(layout_of(grad)));
  const bool planar = planar_pass({grad, dx});
  dispatch_float_types(grad, op, [&](auto tag) {
    using T = typename decltype(tag)::tensor_type;
    upsample_backward(view4<T>(grad), view4<T>(dx), planar);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dipfast_native, m) {
  m.def("upsample_bilinear2x_fwd(Tensor x) -> Tensor");
  m.def("upsample_bilinear2x_bwd(Tensor grad, int h, int w) -> Tensor");
}

TORCH_LIBRARY_IMPL(dipfast_native, CPU, m) {
  m.impl("upsample_bilinear2x_fwd", &upsample_bilinear2x_fwd);
  m.impl("upsample_bilinear2x_bwd", &upsample_bilinear2x_bwd);
}

}  // namespace dipfast_native
