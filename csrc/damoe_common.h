// Shared by the CPU and CUDA implementations of the dasam3 mixture-of-low-rank-experts ops:
// input validation, the activation names, and the experts' factors rearranged for the fused passes.
//
// The op computes, for token t with slots j = 1..k (expert e = indices[t, j], weight p = weights[t, j]):
//   z_tj = W1 x_t + b1 + s B1[e] A1[e] x_t,  h_tj = act(z_tj)
//   y_t  = Σ_j p_tj (W2 h_tj + b2 + s B2[e] A2[e] h_tj)
// evaluated with both W0 products once per token: y_t = W2 m_t + (Σ_j p_tj) b2 + V_t (s B2)ᵀ, where
// m_t = Σ_j p_tj h_tj and V_t [E·r] holds Σ_j p_tj A2[e] h_tj in expert e's r columns.
// Gated (a gate_weight W_g given: SwiGLU, GeGLU), with the gate's own optional bias and factors:
//   g_tj = W_g x_t + b_g + s B_g[e] A_g[e] x_t,  h_tj = act(g_tj) ⊙ z_tj,  and W_g x_t also once per token.
#pragma once

#include "damoe_activation.h"

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <type_traits>
#include <vector>

namespace dasam3 {

// The op schemas are defined once, in Python (`dasam3_kernels/cpp_ops.py`, before either library loads),
// so the CPU and the CUDA library each only implement them and each loads alone.  fwd returns
// (y [T, D], pre [T, F] = x W1ᵀ + b1, U [T, E·r] = x A1ᵀ, V [T, E·r]); the last three only when
// save_for_backward (else empty), U/V only for an adapted projection, U/V in float for half inputs.
// Gated, pre is [T, 2F] = [x W1ᵀ + b1 | x W_gᵀ + b_g] and U [T, n·E·r] = x [A1; A_g]ᵀ for the n of fc1 and
// the gate that are adapted (fc1's columns first).
// bwd returns the gradients of (x, weights, fc1_A, fc1_B, fc2_A, fc2_B), when need_fc_grads dL/dpre
// (gated: [T, 2F], the gate's half second) and m = Σ_j p_j h_j (for the frozen weights' gradients), and
// the gradients of (gate_A, gate_B); empty where not computed.

inline Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "quick_gelu") return Activation::kQuickGelu;
  TORCH_CHECK(false, "lowrank_moe: activation must be one of gelu, gelu_tanh, relu, silu, quick_gelu, got '",
              std::string(name.data(), name.size()), "'");
}

// Sizes of one call; experts/rank are 0 when no projection is adapted.
struct MoeSizes {
  int64_t tokens, d_model, d_ff, top_k, experts, rank;
  bool adapt_fc1, adapt_fc2;
  bool gated = false, adapt_gate = false;

  // Width of a row of pre: the fc1 and (gated) the gate pre-activations side by side.
  int64_t pre_width() const { return gated ? 2 * d_ff : d_ff; }
  // Width of a row of U: E·r columns for each of fc1 and the gate that is adapted.
  int64_t u_width() const { return (int64_t(adapt_fc1) + int64_t(adapt_gate)) * experts * rank; }
  // Where the gate's columns of U start: after fc1's, when fc1 is adapted.
  int64_t gate_column() const { return adapt_fc1 ? experts * rank : 0; }
};

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, "lowrank_moe: ", name, " must be ", dims, " = ", expected, ", got ",
              t.sizes());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "lowrank_moe: ", name, " must be on ", x.device(), " like x, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lowrank_moe: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// A low-rank pair (A: [E, r, n_in], B: [E, n_out, r]) is given whole or not at all.
inline bool check_lora(const c10::optional<at::Tensor>& A, const c10::optional<at::Tensor>& B, const char* name,
                       const at::Tensor& x) {
  TORCH_CHECK(A.has_value() == B.has_value(), "lowrank_moe: ", name, "_A and ", name,
              "_B must be given together, got ", A.has_value() ? "only A" : "only B");
  if (!A.has_value()) return false;
  TORCH_CHECK(A->dim() == 3, "lowrank_moe: ", name, "_A must be [experts, rank, n_in], got ", A->sizes());
  check_like(*A, x, (std::string(name) + "_A").c_str());
  check_like(*B, x, (std::string(name) + "_B").c_str());
  return true;
}

// An index past the factors would read out of bounds.  On the CPU the values are at hand, so the
// error names them; on a GPU reading them back would stall the host on every call (and forbid CUDA
// graph capture), so the check runs on the device: a failing one is a device-side assert.
inline void check_index_range(const at::Tensor& indices, int64_t experts) {
  if (indices.is_cuda()) {
    at::_assert_async(at::logical_and(indices >= 0, indices < experts).all(),
                      "lowrank_moe: indices must lie in [0, experts)");
    return;
  }
  const auto [min, max] = at::aminmax(indices);
  const auto lo = min.item<int64_t>(), hi = max.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < experts, "lowrank_moe: indices must lie in [0, ", experts, "), got values in [", lo,
              ", ", hi, "]");
}

inline MoeSizes check_inputs(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
                             const at::Tensor& fc1_weight, const c10::optional<at::Tensor>& fc1_bias,
                             const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
                             const c10::optional<at::Tensor>& fc1_A, const c10::optional<at::Tensor>& fc1_B,
                             const c10::optional<at::Tensor>& fc2_A, const c10::optional<at::Tensor>& fc2_B,
                             const c10::optional<at::Tensor>& gate_weight = c10::nullopt,
                             const c10::optional<at::Tensor>& gate_bias = c10::nullopt,
                             const c10::optional<at::Tensor>& gate_A = c10::nullopt,
                             const c10::optional<at::Tensor>& gate_B = c10::nullopt) {
  TORCH_CHECK(x.dim() == 2, "lowrank_moe: x must be [tokens, d_model], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lowrank_moe: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(fc1_weight.dim() == 2, "lowrank_moe: fc1_weight must be [d_ff, d_model], got ", fc1_weight.sizes());
  MoeSizes s{x.size(0), x.size(1), fc1_weight.size(0), indices.dim() == 2 ? indices.size(1) : -1, 0, 0, false, false};
  check_shape(indices, {s.tokens, s.top_k}, "indices", "[tokens, top_k]");
  TORCH_CHECK(s.top_k >= 1, "lowrank_moe: indices must have top_k >= 1 columns, got ", s.top_k);
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "lowrank_moe: indices must be int64 or int32, got ", indices.scalar_type());
  check_shape(weights, {s.tokens, s.top_k}, "weights", "[tokens, top_k]");
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "lowrank_moe: weights must be floating point, got ",
              weights.scalar_type());
  for (const auto* t : {&indices, &weights}) {
    TORCH_CHECK(t->device() == x.device(), "lowrank_moe: indices and weights must be on ", x.device(), ", got ",
                t->device());
  }
  check_shape(fc1_weight, {s.d_ff, s.d_model}, "fc1_weight", "[d_ff, d_model]");
  check_shape(fc2_weight, {s.d_model, s.d_ff}, "fc2_weight", "[d_model, d_ff]");
  check_like(fc1_weight, x, "fc1_weight");
  check_like(fc2_weight, x, "fc2_weight");
  if (fc1_bias.has_value()) {
    check_shape(*fc1_bias, {s.d_ff}, "fc1_bias", "[d_ff]");
    check_like(*fc1_bias, x, "fc1_bias");
  }
  if (fc2_bias.has_value()) {
    check_shape(*fc2_bias, {s.d_model}, "fc2_bias", "[d_model]");
    check_like(*fc2_bias, x, "fc2_bias");
  }
  s.gated = gate_weight.has_value();
  TORCH_CHECK(s.gated || !(gate_bias.has_value() || gate_A.has_value() || gate_B.has_value()),
              "lowrank_moe: gate_bias, gate_A and gate_B belong to a gated FFN: they need gate_weight, got none");
  if (s.gated) {
    check_shape(*gate_weight, {s.d_ff, s.d_model}, "gate_weight", "[d_ff, d_model]");
    check_like(*gate_weight, x, "gate_weight");
  }
  if (gate_bias.has_value()) {
    check_shape(*gate_bias, {s.d_ff}, "gate_bias", "[d_ff]");
    check_like(*gate_bias, x, "gate_bias");
  }
  s.adapt_fc1 = check_lora(fc1_A, fc1_B, "fc1", x);
  s.adapt_fc2 = check_lora(fc2_A, fc2_B, "fc2", x);
  s.adapt_gate = check_lora(gate_A, gate_B, "gate", x);
  const auto& any_A = s.adapt_fc1 ? fc1_A : s.adapt_fc2 ? fc2_A : gate_A;
  if (any_A.has_value()) {
    s.experts = any_A->size(0);
    s.rank = any_A->size(1);
    TORCH_CHECK(s.experts >= 1 && s.rank >= 1, "lowrank_moe: lora factors need experts >= 1 and rank >= 1, got ",
                any_A->sizes());
  }
  if (s.adapt_fc1) {
    check_shape(*fc1_A, {s.experts, s.rank, s.d_model}, "fc1_A", "[experts, rank, d_model]");
    check_shape(*fc1_B, {s.experts, s.d_ff, s.rank}, "fc1_B", "[experts, d_ff, rank]");
  }
  if (s.adapt_fc2) {
    check_shape(*fc2_A, {s.experts, s.rank, s.d_ff}, "fc2_A", "[experts, rank, d_ff]");
    check_shape(*fc2_B, {s.experts, s.d_model, s.rank}, "fc2_B", "[experts, d_model, rank]");
  }
  if (s.adapt_gate) {
    check_shape(*gate_A, {s.experts, s.rank, s.d_model}, "gate_A", "[experts, rank, d_model]");
    check_shape(*gate_B, {s.experts, s.d_ff, s.rank}, "gate_B", "[experts, d_ff, rank]");
  }
  if (s.experts > 0 && s.tokens > 0) check_index_range(indices, s.experts);
  return s;
}

// The backward's inputs: the forward's, plus dL/dy and what the forward saved.
inline MoeSizes check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices,
                                      const at::Tensor& weights, const at::Tensor& fc1_weight,
                                      const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
                                      const c10::optional<at::Tensor>& fc1_A, const c10::optional<at::Tensor>& fc1_B,
                                      const c10::optional<at::Tensor>& fc2_A, const c10::optional<at::Tensor>& fc2_B,
                                      const at::Tensor& pre, const at::Tensor& U, const at::Tensor& V,
                                      const c10::optional<at::Tensor>& gate_weight = c10::nullopt,
                                      const c10::optional<at::Tensor>& gate_A = c10::nullopt,
                                      const c10::optional<at::Tensor>& gate_B = c10::nullopt) {
  const MoeSizes s = check_inputs(x, indices, weights, fc1_weight, c10::nullopt, fc2_weight, fc2_bias, fc1_A,
                                  fc1_B, fc2_A, fc2_B, gate_weight, c10::nullopt, gate_A, gate_B);
  check_shape(grad_y, {s.tokens, s.d_model}, "grad_y", "[tokens, d_model]");
  check_shape(pre, {s.tokens, s.pre_width()}, "pre", s.gated ? "[tokens, 2 * d_ff]" : "[tokens, d_ff]");
  if (s.u_width() > 0) check_shape(U, {s.tokens, s.u_width()}, "U", "[tokens, adapted inputs * experts * rank]");
  if (s.adapt_fc2) check_shape(V, {s.tokens, s.experts * s.rank}, "V", "[tokens, experts * rank]");
  return s;
}

// Held by every op implementation: the implementation's own ATen calls run as written, neither
// differentiated (the op has its own backward) nor autocast (they rely on the dtypes they chose; a
// backward runs under the caller's autocast).
struct KernelGuard {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// The dtype the fused passes compute in (and U, V are kept in): float for half types.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The experts' factors laid out for the fused passes, in `dtype`, with the scale s folded in where it
// belongs.  Undefined tensors for a projection that is not adapted.
struct Factors {
  at::Tensor A1s;      // [n·E·r, D]    all experts' down-projections of x, stacked: fc1's, then the gate's
  at::Tensor B1t;      // [E, r, F]     s · fc1_B transposed: row i of expert e is s·B1[e][:, i]
  at::Tensor Bgt;      // [E, r, F]     s · gate_B transposed, as B1t
  at::Tensor A2;       // [E, r, F]
  at::Tensor B2s;      // [D, E·r]      s · fc2_B side by side
};

// s · B [E, n, r] as [E, r, n], in dtype.
inline at::Tensor scaled_transposed(const at::Tensor& B, double scale, at::ScalarType dtype) {
  return (B.to(dtype).transpose(1, 2) * scale).contiguous();
}

inline Factors prepare_factors(const MoeSizes& s, const c10::optional<at::Tensor>& fc1_A,
                               const c10::optional<at::Tensor>& fc1_B, const c10::optional<at::Tensor>& fc2_A,
                               const c10::optional<at::Tensor>& fc2_B, double scale, at::ScalarType dtype,
                               const c10::optional<at::Tensor>& gate_A = c10::nullopt,
                               const c10::optional<at::Tensor>& gate_B = c10::nullopt) {
  Factors f;
  std::vector<at::Tensor> down;  // the factors applied to x
  if (s.adapt_fc1) {
    down.push_back(fc1_A->to(dtype).reshape({s.experts * s.rank, s.d_model}));
    f.B1t = scaled_transposed(*fc1_B, scale, dtype);
  }
  if (s.adapt_gate) {
    down.push_back(gate_A->to(dtype).reshape({s.experts * s.rank, s.d_model}));
    f.Bgt = scaled_transposed(*gate_B, scale, dtype);
  }
  if (!down.empty()) f.A1s = at::cat(down).contiguous();
  if (s.adapt_fc2) {
    f.A2 = fc2_A->to(dtype).contiguous();
    f.B2s = (fc2_B->to(dtype).permute({1, 0, 2}) * scale).reshape({s.d_model, s.experts * s.rank}).contiguous();
  }
  return f;
}

// [n, E, r] gradient of the stacked layout back to fc_B's [E, n, r].
inline at::Tensor unstack_up(const at::Tensor& stacked, const MoeSizes& s) {
  return stacked.view({stacked.size(0), s.experts, s.rank}).permute({1, 0, 2}).contiguous();
}

// t, or a fresh empty tensor standing for an output that was not computed (fresh: the outputs of
// an op must not alias one another).
inline at::Tensor or_empty(const at::Tensor& t, const at::TensorOptions& options) {
  return t.defined() ? t : at::empty({0}, options);
}

// t converted to `like`'s dtype, when both are there.
inline at::Tensor cast_like(const at::Tensor& t, const c10::optional<at::Tensor>& like) {
  return t.defined() && like.has_value() ? t.to(like->scalar_type()) : at::Tensor();
}

inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// The gradients (dA [E, r, D], dB [E, F, r]) of a pair adapting an input projection (fc1 or the gate),
// in the factors' dtype: grad_U = dL/d(x Aᵀ) [T, E·r], grad_Bt = the gradient of s·Bᵀ without s [E·r, F];
// dA = grad_Uᵀ x in x_products's dtype.
inline std::array<at::Tensor, 2> input_pair_grads(const MoeSizes& s, double scale, const at::Tensor& x_products,
                                                  const at::Tensor& grad_U, const at::Tensor& grad_Bt,
                                                  const c10::optional<at::Tensor>& A,
                                                  const c10::optional<at::Tensor>& B) {
  const at::Tensor dA = at::mm(grad_U.t().to(x_products.scalar_type()), x_products)
                            .to(grad_Bt.scalar_type())
                            .view({s.experts, s.rank, s.d_model});
  const at::Tensor dB = (grad_Bt.view({s.experts, s.rank, s.d_ff}) * scale).transpose(1, 2).contiguous();
  return {cast_like(dA, A), cast_like(dB, B)};
}

// The lora factors' gradients (dA1, dB1, dA2, dB2, dA_g, dB_g) in their own layouts and dtypes, from what
// the fused backward accumulated in the compute dtype: grad_U = dL/dU [T, u_width] (U's layout),
// grad_B1t / grad_Bgt = the gradients of B1t / Bgt without s [E·r, F], grad_A2 [E·r, F]; dB2 = s gᵀ V
// needs only g and the saved V.  The products with x and g run in g's dtype (the compute dtype, or bf16
// where the CPU kernel multiplies in bf16).  Fresh empty tensors (x's options) for a projection that is
// not adapted.
inline std::array<at::Tensor, 6> factor_grads(const MoeSizes& s, double scale, const at::Tensor& x,
                                              const at::Tensor& g, const at::Tensor& V, const at::Tensor& grad_U,
                                              const at::Tensor& grad_B1t, const at::Tensor& grad_A2,
                                              const c10::optional<at::Tensor>& fc1_A,
                                              const c10::optional<at::Tensor>& fc1_B,
                                              const c10::optional<at::Tensor>& fc2_A,
                                              const c10::optional<at::Tensor>& fc2_B,
                                              const at::Tensor& grad_Bgt = at::Tensor(),
                                              const c10::optional<at::Tensor>& gate_A = c10::nullopt,
                                              const c10::optional<at::Tensor>& gate_B = c10::nullopt) {
  const auto products = g.scalar_type(), compute = compute_dtype(products);
  const int64_t Er = s.experts * s.rank;
  std::array<at::Tensor, 6> grads;
  const at::Tensor xc = s.u_width() > 0 ? contiguous_as(x, products) : at::Tensor();
  if (s.adapt_fc1) {
    const auto pair = input_pair_grads(s, scale, xc, grad_U.narrow(1, 0, Er), grad_B1t, fc1_A, fc1_B);
    grads[0] = pair[0], grads[1] = pair[1];
  }
  if (s.adapt_fc2) {
    grads[2] = cast_like(grad_A2.view({s.experts, s.rank, s.d_ff}), fc2_A);
    grads[3] = cast_like(unstack_up(at::mm(g.t(), contiguous_as(V, products)).to(compute) * scale, s), fc2_B);
  }
  if (s.adapt_gate) {
    const auto pair = input_pair_grads(s, scale, xc, grad_U.narrow(1, s.gate_column(), Er), grad_Bgt, gate_A,
                                       gate_B);
    grads[4] = pair[0], grads[5] = pair[1];
  }
  for (auto& grad : grads) grad = or_empty(grad, x.options());
  return grads;
}

// ---- pieces both implementations build their ops from ----------------------------------------

// fn(std::integral_constant<bool, gated>{}): a kernel template instantiated for plain and gated FFNs.
template <typename Fn>
inline void with_gating(bool gated, Fn&& fn) {
  if (gated) fn(std::true_type{});
  else fn(std::false_type{});
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Where the columns of U (and of grad_U) of fc1 and of the gate start: {fc1's or null, the gate's or null}.
template <typename T>
std::array<T*, 2> input_columns(const MoeSizes& s, const at::Tensor& U) {
  T* const base = s.u_width() > 0 ? U.data_ptr<T>() : nullptr;
  return {s.adapt_fc1 ? base : nullptr, s.adapt_gate ? base + s.gate_column() : nullptr};
}

inline at::Tensor optional_as(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? contiguous_as(*t, dtype) : at::Tensor();
}

// The bias of a row of pre [P]: fc1's, gated followed by the gate's (zeros for a missing one), in
// `options`' dtype; undefined when there is no bias to add.
inline at::Tensor pre_bias(const MoeSizes& s, const c10::optional<at::Tensor>& fc1_bias,
                           const c10::optional<at::Tensor>& gate_bias, const at::TensorOptions& options) {
  if (!s.gated || !(fc1_bias.has_value() || gate_bias.has_value())) {
    return optional_as(fc1_bias, c10::typeMetaToScalarType(options.dtype()));
  }
  const auto half = [&](const c10::optional<at::Tensor>& b) {
    return b.has_value() ? b->to(options.dtype()) : at::zeros({s.d_ff}, options);
  };
  return at::cat({half(fc1_bias), half(gate_bias)}).contiguous();
}

// pre [n, F or 2F] = x_tile [W1; W_g]ᵀ: the gated FFN's two products of one x tile side by side, each
// GEMM writing its half in place (BLAS takes the row stride).  Without the biases: addmm_out would first
// copy them to every row (the CPU kernel adds them per token).
inline void input_products(at::Tensor& pre, const at::Tensor& x_tile, const at::Tensor& W1, const at::Tensor& Wg) {
  if (!Wg.defined()) {
    at::mm_out(pre, x_tile, W1.t());
    return;
  }
  const int64_t F = W1.size(0);
  at::Tensor fc1_half = pre.narrow(1, 0, F), gate_half = pre.narrow(1, F, F);
  at::mm_out(fc1_half, x_tile, W1.t());
  at::mm_out(gate_half, x_tile, Wg.t());
}

// gx = grad_pre [W1; W_g]: the gradient of x through the frozen products (gated: both halves of grad_pre).
inline void input_products_grad(at::Tensor& gx, const at::Tensor& grad_pre, const at::Tensor& W1,
                                const at::Tensor& Wg) {
  if (!Wg.defined()) {
    at::mm_out(gx, grad_pre, W1);
    return;
  }
  const int64_t F = W1.size(0);
  at::mm_out(gx, grad_pre.narrow(1, 0, F), W1);
  gx.addmm_(grad_pre.narrow(1, F, F), Wg);
}

}  // namespace dasam3
