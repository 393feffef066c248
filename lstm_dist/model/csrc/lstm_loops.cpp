// The fast LSTM's two time loops on the CPU, fp32 (lstm_dist/model/cpu_loops.py builds and loads this file;
// lstm_dist/model/loops.py calls it). The same equations as the eager loops in loops.py, with each step's
// pointwise work fused into one pass over the rows instead of 7 (forward) or 6 (backward) ATen calls,
// and no Python between steps.
//
// The recurrent product is the eager loops' too, by the implementation lstm_dist/model/products.py chose
// for the machine: addmm, MKL's packed GEMM or oneDNN's inner product (U packed or laid out once per
// window by the caller).
//
//   forward step t:  gates[t] += h_{t-1} U^T;  i, f, o = σ(·), g = tanh(·) (written back into gates[t]);
//                    c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
//   backward step t: dh = dy[t] + dgates[t+1] U (dy[t] alone at the last step); with tc = tanh(c_t),
//                    dc = dc + dh (o - h_t tc);  di = dc (i - i i) g;  df = dc (f - f f) c_{t-1};
//                    dg = dc (i - i g g);  do = dh (h_t - h_t o);  dc = dc f
//
// Where the product makes a new tensor (MKL's, oneDNN's), its add (gates[t] + ·, dy[t] + ·) is done in the
// row pass that reads it, not in a pass of its own; the backward's coefficients are computed in its row
// pass from the saved activations and state (loops.py's _backward_coefficients is the eager form, a
// [T,B,4H] and a [T,B,H] buffer written for the whole window first).
//
// σ(x) = 1 / (1 + e^-x) with ATen's exp_u20 and tanh(x) = 2σ(2x) - 1: measured against ATen's eager
// sigmoid/tanh, at most ~5e-7 apart on the state.

// The narrowest headers that declare what this file uses (not <torch/extension.h>, which brings all of
// torch's C++ API: it doubles the first build, ~55 s to ~25 s of compiling on 2 cores).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 and its at::Tensor conversions
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/List.h>
#include <ATen/core/stack.h>

namespace {

using Vec = at::vec::Vectorized<float>;

inline Vec sigmoid(Vec x) {
  const Vec one(1.0f);
  return one / (one + x.neg().exp_u20());
}

inline Vec tanh_(Vec x) {
  const Vec one(1.0f), two(2.0f);
  return two * sigmoid(two * x) - one;
}

// g + y (y: the product's row where it is a tensor of its own, else null: already added into g)
inline Vec pre(const float* g, const float* y, int64_t j, int64_t k) {
  return y ? Vec::loadu(g + j, k) + Vec::loadu(y + j, k) : Vec::loadu(g + j, k);
}

// one row of the forward update: g (the row's 4H pre-activations, less y's where y is given; overwritten
// with the activations), c_prev -> c, h; n = H
void forward_row(float* g, const float* y, const float* c_prev, float* c, float* h, int64_t n) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    Vec i = sigmoid(pre(g, y, j, k));
    Vec f = sigmoid(pre(g, y, n + j, k));
    Vec gg = tanh_(pre(g, y, 2 * n + j, k));
    Vec o = sigmoid(pre(g, y, 3 * n + j, k));
    Vec cn = f * Vec::loadu(c_prev + j, k) + i * gg;
    i.store(g + j, k);
    f.store(g + n + j, k);
    gg.store(g + 2 * n + j, k);
    o.store(g + 3 * n + j, k);
    cn.store(c + j, k);
    (o * tanh_(cn)).store(h + j, k);
  }
}

// one row of the backward update: dh = dy + y (y null: dy holds dh already); a the row's activations
// (i, f, g, o), c_prev, c and h the step's state; dc in: dc_{t+1} f_{t+1}, out: dc_t f_t; dg out
void backward_row(const float* dy, const float* y, float* dc, const float* a, const float* c_prev,
                  const float* c, const float* h, float* dg, int64_t n) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    const Vec vdh = pre(dy, y, j, k);
    const Vec i = Vec::loadu(a + j, k), f = Vec::loadu(a + n + j, k);
    const Vec g = Vec::loadu(a + 2 * n + j, k), o = Vec::loadu(a + 3 * n + j, k);
    const Vec vh = Vec::loadu(h + j, k);
    const Vec vdc = Vec::loadu(dc + j, k) + vdh * (o - vh * tanh_(Vec::loadu(c + j, k)));
    (vdc * ((i - i * i) * g)).store(dg + j, k);
    (vdc * ((f - f * f) * Vec::loadu(c_prev + j, k))).store(dg + n + j, k);
    (vdc * (i - i * (g * g))).store(dg + 2 * n + j, k);
    (vdh * (vh - vh * o)).store(dg + 3 * n + j, k);
    (vdc * f).store(dc + j, k);
  }
}

int64_t row_grain(int64_t hid) { return std::max<int64_t>(1, 32768 / (4 * hid)); }

// x M by `impl` (products.Linear.cpp_args): 0 addmm with m = M, out = add + x M, and an undefined tensor
// returned; else a new tensor, which the caller adds: 1 MKL's packed-weight GEMM
// (torch.ops.mkl._mkl_linear on `weight`, M packed, and w_lin = M^T); 2 oneDNN's inner product
// (torch.ops.mkldnn._linear_pointwise on `weight`: M^T, plain or reordered by oneDNN)
at::Tensor product(const at::Tensor& x, const at::Tensor& add, at::Tensor& out, const at::Tensor& m, int64_t impl,
                   const at::Tensor& weight, const at::Tensor& w_lin) {
  if (impl == 1) {
    static auto linear = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkl::_mkl_linear", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t)>();
    return linear.call(x, weight, w_lin, std::nullopt, x.size(0)).contiguous();
  }
  if (impl == 2) {
    // boxed: the schema's str and Scalar?[] arguments, without depending on their C++ types
    static auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, weight, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear.callBoxed(&stack);
    return stack[0].toTensor().contiguous();
  }
  at::addmm_out(out, add, x, m);
  return at::Tensor();
}

const float* data_or_null(const at::Tensor& y) { return y.defined() ? y.data_ptr<float>() : nullptr; }

}  // namespace

// gates [T,B,4H] holds x W^T + b on entry and the activations on return; hs, cs [T+1,B,H] with the
// initial state at index 0; ut = U^T [H,4H] (any strides); impl/weight/w_lin: the product's
// implementation and its operands (`product`; undefined where unused). The others contiguous fp32.
void forward_loop(at::Tensor gates, at::Tensor hs, at::Tensor cs, at::Tensor ut, int64_t impl,
                  c10::optional<at::Tensor> weight, c10::optional<at::Tensor> w_lin) {
  const at::Tensor pk = weight.value_or(at::Tensor()), wl = w_lin.value_or(at::Tensor());
  const int64_t steps = gates.size(0), batch = gates.size(1), hid = hs.size(2);
  float* g0 = gates.data_ptr<float>();
  float* h0 = hs.data_ptr<float>();
  float* c0 = cs.data_ptr<float>();
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor g = gates.select(0, t);
    const at::Tensor y = product(hs.select(0, t), g, g, ut, impl, pk, wl);
    const float* y0 = data_or_null(y);
    float* gt = g0 + t * batch * 4 * hid;
    const float* cp = c0 + t * batch * hid;
    float* cn = c0 + (t + 1) * batch * hid;
    float* hn = h0 + (t + 1) * batch * hid;
    at::parallel_for(0, batch, row_grain(hid), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        forward_row(gt + b * 4 * hid, y0 ? y0 + b * 4 * hid : nullptr, cp + b * hid, cn + b * hid, hn + b * hid,
                    hid);
      }
    });
  }
}

// gates [T,B,4H] the activations; hs, cs [T+1,B,H] the forward's states (index 0: the initial state);
// dy [T,B,H]; u = U [4H,H] (impl/weight/w_lin: as forward's, for the product with U); dc [B,H] in: dc_T,
// out: dc_{-1}; dh [B,H] scratch; dgates [T,B,4H] out. fp32; all but u contiguous.
void backward_loop(at::Tensor gates, at::Tensor hs, at::Tensor cs, at::Tensor dy, at::Tensor u, at::Tensor dc,
                   at::Tensor dh, at::Tensor dgates, int64_t impl, c10::optional<at::Tensor> weight,
                   c10::optional<at::Tensor> w_lin) {
  const at::Tensor pk = weight.value_or(at::Tensor()), wl = w_lin.value_or(at::Tensor());
  const int64_t steps = gates.size(0), batch = gates.size(1), hid = dc.size(1);
  const float* g0 = gates.data_ptr<float>();
  const float* h0 = hs.data_ptr<float>();
  const float* c0 = cs.data_ptr<float>();
  const float* dy0 = dy.data_ptr<float>();
  float* d0 = dgates.data_ptr<float>();
  float* dcp = dc.data_ptr<float>();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t off4 = t * batch * 4 * hid, off1 = t * batch * hid;
    const float* dh_in = dy0 + off1;  // dh = dy[t] (+ y)
    at::Tensor y;
    if (t < steps - 1) {
      y = product(dgates.select(0, t + 1), dy.select(0, t), dh, u, impl, pk, wl);  // addmm: into dh
      if (!y.defined()) dh_in = dh.data_ptr<float>();
    }
    const float* y0 = data_or_null(y);
    at::parallel_for(0, batch, row_grain(hid), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r4 = off4 + b * 4 * hid, r1 = off1 + b * hid;
        backward_row(dh_in + b * hid, y0 ? y0 + b * hid : nullptr, dcp + b * hid, g0 + r4, c0 + r1,
                     c0 + r1 + batch * hid, h0 + r1 + batch * hid, d0 + r4, hid);
      }
    });
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_loop", &forward_loop, "the LSTM forward time loop (fp32, CPU)");
  m.def("backward_loop", &backward_loop, "the LSTM backward time loop (fp32, CPU)");
}
