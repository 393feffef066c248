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
//   backward step t: dh = dy[t] + dgates[t+1] U (dy[t] alone at the last step);
//                    dc = dc + dh a[t];  (di, df, dg) = dc (k_i, k_f, k_g)[t];  do = dh k_o[t];  dc = dc f_t
//
// σ(x) = 1 / (1 + e^-x) with ATen's exp_u20 and tanh(x) = 2σ(2x) - 1: measured against ATen's eager
// sigmoid/tanh, at most ~5e-7 apart on the state.

// The narrowest headers that declare what this file uses (not <torch/extension.h>, which brings all of
// torch's C++ API: it doubles the first build, ~55 s to ~25 s of compiling on 2 cores).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
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

// one row of the forward update: g (the row's 4H pre-activations, overwritten with the activations),
// c_prev -> c, h; n = H
void forward_row(float* g, const float* c_prev, float* c, float* h, int64_t n) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    Vec i = sigmoid(Vec::loadu(g + j, k));
    Vec f = sigmoid(Vec::loadu(g + n + j, k));
    Vec gg = tanh_(Vec::loadu(g + 2 * n + j, k));
    Vec o = sigmoid(Vec::loadu(g + 3 * n + j, k));
    Vec cn = f * Vec::loadu(c_prev + j, k) + i * gg;
    i.store(g + j, k);
    f.store(g + n + j, k);
    gg.store(g + 2 * n + j, k);
    o.store(g + 3 * n + j, k);
    cn.store(c + j, k);
    (o * tanh_(cn)).store(h + j, k);
  }
}

// one row of the backward update
void backward_row(const float* dh, float* dc, const float* a, const float* coef, const float* f, float* dg,
                  int64_t n) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    Vec vdh = Vec::loadu(dh + j, k);
    Vec vdc = Vec::loadu(dc + j, k) + vdh * Vec::loadu(a + j, k);
    (vdc * Vec::loadu(coef + j, k)).store(dg + j, k);
    (vdc * Vec::loadu(coef + n + j, k)).store(dg + n + j, k);
    (vdc * Vec::loadu(coef + 2 * n + j, k)).store(dg + 2 * n + j, k);
    (vdh * Vec::loadu(coef + 3 * n + j, k)).store(dg + 3 * n + j, k);
    (vdc * Vec::loadu(f + j, k)).store(dc + j, k);
  }
}

int64_t row_grain(int64_t hid) { return std::max<int64_t>(1, 32768 / (4 * hid)); }

// out = add + x M, by `impl` (products.Linear.cpp_args): 0 addmm with m = M; 1 MKL's packed-weight GEMM
// (torch.ops.mkl._mkl_linear on `weight`, M packed, and w_lin = M^T); 2 oneDNN's inner product
// (torch.ops.mkldnn._linear_pointwise on `weight`: M^T, plain or reordered by oneDNN)
void product(const at::Tensor& x, const at::Tensor& add, at::Tensor& out, const at::Tensor& m, int64_t impl,
             const at::Tensor& weight, const at::Tensor& w_lin) {
  if (impl == 1) {
    static auto linear = c10::Dispatcher::singleton()
        .findSchemaOrThrow("mkl::_mkl_linear", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t)>();
    at::add_out(out, add, linear.call(x, weight, w_lin, std::nullopt, x.size(0)));
  } else if (impl == 2) {
    // boxed: the schema's str and Scalar?[] arguments, without depending on their C++ types
    static auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, weight, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear.callBoxed(&stack);
    at::add_out(out, add, stack[0].toTensor());
  } else {
    at::addmm_out(out, add, x, m);
  }
}

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
    product(hs.select(0, t), g, g, ut, impl, pk, wl);
    float* gt = g0 + t * batch * 4 * hid;
    const float* cp = c0 + t * batch * hid;
    float* cn = c0 + (t + 1) * batch * hid;
    float* hn = h0 + (t + 1) * batch * hid;
    at::parallel_for(0, batch, row_grain(hid), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        forward_row(gt + b * 4 * hid, cp + b * hid, cn + b * hid, hn + b * hid, hid);
      }
    });
  }
}

// gates [T,B,4H] the activations (f read from it); dy [T,B,H]; coef [T,B,4H] and a [T,B,H] the step
// coefficients (loops.py's _backward_coefficients); u = U [4H,H] (impl/weight/w_lin: as forward's, for
// the product with U); dc [B,H] in: dc_T, out: dc_{-1}; dh [B,H] scratch; dgates [T,B,4H] out. fp32;
// all but u contiguous.
void backward_loop(at::Tensor gates, at::Tensor dy, at::Tensor coef, at::Tensor a, at::Tensor u, at::Tensor dc,
                   at::Tensor dh, at::Tensor dgates, int64_t impl, c10::optional<at::Tensor> weight,
                   c10::optional<at::Tensor> w_lin) {
  const at::Tensor pk = weight.value_or(at::Tensor()), wl = w_lin.value_or(at::Tensor());
  const int64_t steps = gates.size(0), batch = gates.size(1), hid = dc.size(1);
  const float* g0 = gates.data_ptr<float>();
  const float* k0 = coef.data_ptr<float>();
  const float* a0 = a.data_ptr<float>();
  float* d0 = dgates.data_ptr<float>();
  float* dcp = dc.data_ptr<float>();
  const float* dhp = dh.data_ptr<float>();
  for (int64_t t = steps - 1; t >= 0; --t) {
    if (t == steps - 1) {
      dh.copy_(dy.select(0, t));
    } else {
      product(dgates.select(0, t + 1), dy.select(0, t), dh, u, impl, pk, wl);
    }
    const int64_t off4 = t * batch * 4 * hid, off1 = t * batch * hid;
    at::parallel_for(0, batch, row_grain(hid), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        backward_row(dhp + b * hid, dcp + b * hid, a0 + off1 + b * hid, k0 + off4 + b * 4 * hid,
                     g0 + off4 + b * 4 * hid + hid, d0 + off4 + b * 4 * hid, hid);
      }
    });
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_loop", &forward_loop, "the LSTM forward time loop (fp32, CPU)");
  m.def("backward_loop", &backward_loop, "the LSTM backward time loop (fp32, CPU)");
}
