// CUDA implementation of the dasam3 mixture-of-low-rank-experts ops (the schemas are defined once, in
// Python, by dasam3_kernels/cpp_ops.py: this library loads without the CPU one).
//
// The frozen W0 products go through cuBLAS (at::addmm / at::mm: tensor cores for fp16/bf16, TF32 for
// fp32 where torch allows it), and everything else runs in one fused epilogue kernel per direction
// that reads the [T, F] product once.  Why cuBLAS: our own 64 x 64 tile GEMM (scalar loads, no cp.async,
// no double buffering, a SIMT fp32 path with 16-way shared-memory bank conflicts) was far from cuBLAS
// speed, and the forward writes pre = x W1ᵀ + b1 for the backward anyway.
//
// Forward epilogue, per [64 tokens x 64 features] block: adds each slot's low-rank term s B1[e] u_e to
// pre, applies the activation, combines the slots into m = Σ_j p_j h_j and reduces h_j against its
// expert's A2 rows into V (a warp sum, then one atomic per token, slot and rank over the feature
// tiles).  cuBLAS then gives y = m W2ᵀ + V (s B2)ᵀ + (Σp) b2.
// Backward epilogue: from pre and gm = g W2 (cuBLAS), recomputes h_j, forms dL/dp_j, dL/dz_j, dL/du_j
// and accumulates the A2 and B1 gradients in shared memory before one atomic flush per block; cuBLAS
// finishes dL/dx and the gradients of A1 and B2.  [T, k, F] is never materialised.
// A gated FFN (kGated) is the same pair of kernels: pre holds [x W1ᵀ + b1 | x W_gᵀ + b_g] (two cuBLAS
// products of the same x, written side by side), each slot also adds the gate's low-rank term, and
// h_j = act(g_j) ⊙ z_j; the backward forms dL/dg_j beside dL/dz_j and the gate's factor gradients beside
// fc1's.
#include "damoe_common.h"
#include "damoe_cuda_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace dasam3 {
namespace {

// ---- host side ---------------------------------------------------------------------------------

dim3 tile_grid(const MoeSizes& s) {
  const auto tiles = [](int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); };
  return dim3(tiles(s.tokens), tiles(s.d_ff));  // tokens on x: up to 2^31 - 1 tiles
}

// pre [T, F or 2F] = x [W1; W_g]ᵀ + [b1 | b_g], both products on cuBLAS: a plain FFN's bias rides in
// the GEMM's epilogue, a gated FFN's two products write their halves in place and take the biases after.
at::Tensor frozen_input_products(const MoeSizes& s, const at::Tensor& x, const at::Tensor& W1,
                                 const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& Wg,
                                 const c10::optional<at::Tensor>& bg) {
  if (!s.gated) return b1.has_value() ? at::addmm(*b1, x, W1.t()) : at::mm(x, W1.t());
  at::Tensor pre = at::empty({s.tokens, s.pre_width()}, x.options());
  input_products(pre, x, W1, Wg->contiguous());
  const at::Tensor bias = pre_bias(s, b1, bg, x.options());
  if (bias.defined()) pre.add_(bias);
  return pre;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_moe_fwd_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& fc1_weight,
    const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
    const c10::optional<at::Tensor>& fc1_A, const c10::optional<at::Tensor>& fc1_B,
    const c10::optional<at::Tensor>& fc2_A, const c10::optional<at::Tensor>& fc2_B, double scale,
    c10::string_view activation, bool save_for_backward, const c10::optional<at::Tensor>& gate_weight,
    const c10::optional<at::Tensor>& gate_bias, const c10::optional<at::Tensor>& gate_A,
    const c10::optional<at::Tensor>& gate_B) {
  const KernelGuard guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  // V's sums over feature tiles are float atomics: the order, and so the last bits, vary run to run.
  at::globalContext().alertNotDeterministic("dasam3::lowrank_moe_fwd (CUDA)");
  const MoeSizes s = check_inputs(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B,
                                  fc2_A, fc2_B, gate_weight, gate_bias, gate_A, gate_B);
  const Activation act = parse_activation(activation);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const at::Tensor xc = x.contiguous(), W2 = fc2_weight.contiguous();
  const at::Tensor p = contiguous_as(weights, compute), idx = contiguous_as(indices, at::kLong);
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, compute, gate_A, gate_B);
  const int64_t Er = s.experts * s.rank;
  const at::Tensor U = s.u_width() > 0 ? at::mm(xc.to(compute), f.A1s.t()) : at::Tensor();
  const at::Tensor V = s.adapt_fc2 ? at::zeros({s.tokens, Er}, p.options()) : at::Tensor();
  const at::Tensor pre = frozen_input_products(s, xc, fc1_weight, fc1_bias, gate_weight, gate_bias);
  const at::Tensor mixed = at::empty({s.tokens, s.d_ff}, xc.options());

  if (s.tokens > 0 && s.d_ff > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_moe_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto [U1, Ug] = input_columns<acc_t>(s, U);
      const ForwardArgs<scalar_t, acc_t> args{
          s.tokens, s.d_ff, s.top_k, s.experts, s.rank, s.pre_width(), s.u_width(), pre.data_ptr<scalar_t>(),
          idx.data_ptr<int64_t>(), p.data_ptr<acc_t>(), U1, Ug, ptr_or_null<acc_t>(f.B1t),
          ptr_or_null<acc_t>(f.Bgt), ptr_or_null<acc_t>(f.A2), mixed.data_ptr<scalar_t>(),
          ptr_or_null<acc_t>(V)};
      with_activation(act, [&](auto a) {
        with_gating(s.gated, [&](auto gated) {
          forward_kernel<scalar_t, acc_t, decltype(a)::value, decltype(gated)::value>
              <<<tile_grid(s), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  at::Tensor y = at::mm(mixed, W2.t());
  if (s.adapt_fc2) y.addmm_(V.to(dtype), f.B2s.to(dtype).t());
  if (fc2_bias.has_value()) y.addr_(p.sum(1).to(dtype), *fc2_bias);
  if (!save_for_backward) return {y, at::empty({0}, x.options()), or_empty({}, p.options()), or_empty({}, p.options())};
  return {y, pre, or_empty(U, p.options()), or_empty(V, p.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
lowrank_moe_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices,
                     const at::Tensor& weights, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                     const c10::optional<at::Tensor>& fc2_bias, const c10::optional<at::Tensor>& fc1_A,
                     const c10::optional<at::Tensor>& fc1_B, const c10::optional<at::Tensor>& fc2_A,
                     const c10::optional<at::Tensor>& fc2_B, const at::Tensor& pre, const at::Tensor& U,
                     const at::Tensor& V, double scale, c10::string_view activation, bool need_grad_x,
                     bool need_fc_grads, const c10::optional<at::Tensor>& gate_weight,
                     const c10::optional<at::Tensor>& gate_A, const c10::optional<at::Tensor>& gate_B) {
  const KernelGuard guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::globalContext().alertNotDeterministic("dasam3::lowrank_moe_bwd (CUDA)");  // atomics, as the forward
  const MoeSizes s = check_backward_inputs(grad_y, x, indices, weights, fc1_weight, fc2_weight, fc2_bias, fc1_A,
                                           fc1_B, fc2_A, fc2_B, pre, U, V, gate_weight, gate_A, gate_B);
  const Activation act = parse_activation(activation);
  const int64_t Er = s.experts * s.rank;
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const at::Tensor g = contiguous_as(grad_y, dtype), prec = contiguous_as(pre, dtype);
  const at::Tensor gm = at::mm(g, fc2_weight);  // [T, F]: the frozen fc2 product, on cuBLAS
  const at::Tensor g_acc = g.to(compute);
  const at::Tensor p = contiguous_as(weights, compute), idx = contiguous_as(indices, at::kLong);
  const at::Tensor Uc = s.u_width() > 0 ? contiguous_as(U, compute) : at::Tensor();
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, compute, gate_A, gate_B);
  const auto acc_opts = p.options();
  const auto zeros_if = [&](bool wanted, int64_t rows, int64_t cols) {
    return wanted ? at::zeros({rows, cols}, acc_opts) : at::Tensor();
  };
  const at::Tensor g2 = s.adapt_fc2 ? at::mm(g_acc, f.B2s) : at::Tensor();
  at::Tensor grad_p = at::zeros({s.tokens, s.top_k}, acc_opts);
  const at::Tensor grad_U = zeros_if(s.u_width() > 0, s.tokens, s.u_width());
  const at::Tensor grad_B1t = zeros_if(s.adapt_fc1, Er, s.d_ff), grad_Bgt = zeros_if(s.adapt_gate, Er, s.d_ff);
  const at::Tensor grad_A2 = zeros_if(s.adapt_fc2, Er, s.d_ff);
  const at::Tensor grad_pre = at::empty({s.tokens, s.pre_width()}, g.options());
  const at::Tensor mixed = need_fc_grads ? at::empty({s.tokens, s.d_ff}, g.options()) : at::Tensor();

  if (s.tokens > 0 && s.d_ff > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_moe_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t adapted = int64_t(s.adapt_fc1) + int64_t(s.adapt_gate) + int64_t(s.adapt_fc2);
      const size_t accumulators = adapted * Er * kTile * sizeof(acc_t);
      const bool shared = accumulators <= kSmemLimit;
      const auto [U1, Ug] = input_columns<acc_t>(s, Uc);
      const auto [grad_U1, grad_Ug] = input_columns<acc_t>(s, grad_U);
      const BackwardArgs<scalar_t, acc_t> args{
          s.tokens, s.d_ff, s.top_k, s.experts, s.rank, s.pre_width(), s.u_width(), gm.data_ptr<scalar_t>(),
          prec.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), p.data_ptr<acc_t>(), U1, Ug,
          ptr_or_null<acc_t>(f.B1t), ptr_or_null<acc_t>(f.Bgt), ptr_or_null<acc_t>(f.A2),
          ptr_or_null<acc_t>(g2), grad_p.data_ptr<acc_t>(), grad_U1, grad_Ug, ptr_or_null<acc_t>(grad_B1t),
          ptr_or_null<acc_t>(grad_Bgt), ptr_or_null<acc_t>(grad_A2), grad_pre.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(mixed), shared};
      with_activation(act, [&](auto a) {
        with_gating(s.gated, [&](auto gated) {
          backward_kernel<scalar_t, acc_t, decltype(a)::value, decltype(gated)::value>
              <<<tile_grid(s), kThreads, shared ? accumulators : 0, at::cuda::getCurrentCUDAStream()>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  if (fc2_bias.has_value()) grad_p.add_(at::mv(g_acc, contiguous_as(*fc2_bias, compute)).unsqueeze(1));
  at::Tensor grad_x;
  if (need_grad_x) {
    grad_x = at::empty({s.tokens, s.d_model}, g.options());
    input_products_grad(grad_x, grad_pre, fc1_weight.contiguous(), optional_as(gate_weight, dtype));
    if (s.u_width() > 0) grad_x.add_(at::mm(grad_U, f.A1s).to(dtype));
  }
  const auto lora = factor_grads(s, scale, x, g_acc, V, grad_U, grad_B1t, grad_A2, fc1_A, fc1_B, fc2_A, fc2_B,
                                 grad_Bgt, gate_A, gate_B);
  return {or_empty(grad_x, x.options()), grad_p.to(weights.scalar_type()), lora[0], lora[1], lora[2], lora[3],
          or_empty(need_fc_grads ? grad_pre : at::Tensor(), x.options()), or_empty(mixed, x.options()), lora[4],
          lora[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dasam3, CUDA, m) {
  m.impl("lowrank_moe_fwd", &lowrank_moe_fwd_cuda);
  m.impl("lowrank_moe_bwd", &lowrank_moe_bwd_cuda);
}

}  // namespace dasam3
