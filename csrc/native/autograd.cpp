// The differentiable ops the Python wrappers call: each pairs a forward op with its backward op in a
// C++ autograd function, registered for the Autograd dispatch key.
//
//   batch_norm_act(x, weight, bias, eps, negative_slope, pad=0) -> y    (pad > 0: reflection-padded y)
//   concat_batch_norm(skip, deeper, weight, bias, eps, pad=0) -> y
//   upsample_bilinear2x(x) -> y
//
// Why C++: a Python autograd function (torch.library.register_autograd) costs ~85 us a call, forward
// and backward, and a step of the default net makes 35 of these calls. The forward and backward ops
// are called through the dispatcher, so under torch.compile they reach their fake implementations
// (dipfast/native/*.py) and AOTAutograd traces the pair like any other op with a derivative.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"

namespace dipfast_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// An incoming gradient the kernels can walk (the backward ops check it), in like's layout if copied.
at::Tensor walkable(const at::Tensor& grad, const at::Tensor& like) {
  return readable(grad) ? grad : grad.contiguous(layout_of(like));
}

Stats batch_norm_act_stats(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           double negative_slope, int64_t pad) {
  static auto plain = op<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>(
      "dipfast_native::batch_norm_act_fwd");
  static auto padded = op<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t)>(
      "dipfast_native::batch_norm_act_reflect_pad_fwd");
  return pad > 0 ? padded.call(x, weight, bias, eps, negative_slope, pad)
                 : plain.call(x, weight, bias, eps, negative_slope);
}

Stats concat_batch_norm_stats(const at::Tensor& skip, const at::Tensor& deeper, const at::Tensor& weight,
                              const at::Tensor& bias, double eps, int64_t pad) {
  static auto fwd =
      op<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>(
          "dipfast_native::concat_batch_norm_fwd");
  return fwd.call(skip, deeper, weight, bias, eps, pad);
}

at::Tensor upsample_forward(const at::Tensor& x) {
  static auto fwd = op<at::Tensor(const at::Tensor&)>("dipfast_native::upsample_bilinear2x_fwd");
  return fwd.call(x);
}

class BatchNormAct : public torch::autograd::Function<BatchNormAct> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double eps, double negative_slope, int64_t pad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = batch_norm_act_stats(x, weight, bias, eps, negative_slope, pad);
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["pad"] = pad;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto plain = op<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double)>("dipfast_native::batch_norm_act_bwd");
    static auto padded = op<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, double, int64_t)>(
        "dipfast_native::batch_norm_act_reflect_pad_bwd");
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const int64_t pad = ctx->saved_data["pad"].toInt();
    const auto grad = walkable(grads[0], x);
    auto [dx, dweight, dbias] = pad > 0 ? padded.call(grad, x, saved[1], saved[2], saved[3], saved[4], slope, pad)
                                        : plain.call(grad, x, saved[1], saved[2], saved[3], saved[4], slope);
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ConcatBatchNorm : public torch::autograd::Function<ConcatBatchNorm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& skip, const at::Tensor& deeper,
                            const at::Tensor& weight, const at::Tensor& bias, double eps, int64_t pad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = concat_batch_norm_stats(skip, deeper, weight, bias, eps, pad);
    ctx->save_for_backward({skip, deeper, weight, mean, rstd});
    ctx->saved_data["pad"] = pad;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t)>("dipfast_native::concat_batch_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const auto grad = walkable(grads[0], saved[1]);
    auto [dskip, ddeeper, dweight, dbias] =
        bwd.call(grad, saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["pad"].toInt());
    return {dskip, ddeeper, dweight, dbias, at::Tensor(), at::Tensor()};
  }
};

class UpsampleBilinear2x : public torch::autograd::Function<UpsampleBilinear2x> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["h"] = x.size(2);
    ctx->saved_data["w"] = x.size(3);
    return upsample_forward(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd =
        op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("dipfast_native::upsample_bilinear2x_bwd");
    const auto grad = walkable(grads[0], grads[0]);
    return {bwd.call(grad, ctx->saved_data["h"].toInt(), ctx->saved_data["w"].toInt())};
  }
};

// Below autograd (inference mode, or a caller past the Autograd key): the forward alone.
at::Tensor batch_norm_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                  double negative_slope, int64_t pad) {
  return std::get<0>(batch_norm_act_stats(x, weight, bias, eps, negative_slope, pad));
}

at::Tensor concat_batch_norm_forward(const at::Tensor& skip, const at::Tensor& deeper, const at::Tensor& weight,
                                     const at::Tensor& bias, double eps, int64_t pad) {
  return std::get<0>(concat_batch_norm_stats(skip, deeper, weight, bias, eps, pad));
}

at::Tensor batch_norm_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                          double negative_slope, int64_t pad) {
  return BatchNormAct::apply(x, weight, bias, eps, negative_slope, pad);
}

at::Tensor concat_batch_norm(const at::Tensor& skip, const at::Tensor& deeper, const at::Tensor& weight,
                             const at::Tensor& bias, double eps, int64_t pad) {
  return ConcatBatchNorm::apply(skip, deeper, weight, bias, eps, pad);
}

at::Tensor upsample_bilinear2x(const at::Tensor& x) { return UpsampleBilinear2x::apply(x); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dipfast_native, m) {
  m.def("batch_norm_act(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope, int pad=0) -> Tensor");
  m.def("concat_batch_norm(Tensor skip, Tensor deeper, Tensor weight, Tensor bias, float eps, int pad=0) -> Tensor");
  m.def("upsample_bilinear2x(Tensor x) -> Tensor");
}

// Autograd: the functions above (under no_grad they run the forward and record nothing).
TORCH_LIBRARY_IMPL(dipfast_native, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act);
  m.impl("concat_batch_norm", &concat_batch_norm);
  m.impl("upsample_bilinear2x", &upsample_bilinear2x);
}

// Every key below autograd (inference mode skips the Autograd key): the forward op alone.
TORCH_LIBRARY_IMPL(dipfast_native, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_forward);
  m.impl("concat_batch_norm", &concat_batch_norm_forward);
  m.impl("upsample_bilinear2x", &upsample_forward);
}

}  // namespace dipfast_native
