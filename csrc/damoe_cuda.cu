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
#include "damoe_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace dasam3 {
namespace {

constexpr int kTile = 64;                  // tokens and features per block
constexpr int kThreads = 256;              // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr size_t kSmemLimit = 48 * 1024;   // without opting in to more

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- activations -------------------------------------------------------------------------------

template <Activation A, typename T>
__device__ T act_value(T z) {
  if constexpr (A == Activation::kGelu) {
    return z * T(0.5) * (T(1) + ::erf(z * T(M_SQRT1_2)));
  } else if constexpr (A == Activation::kGeluTanh) {
    return T(0.5) * z * (T(1) + ::tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z)));
  } else if constexpr (A == Activation::kRelu) {
    return z < T(0) ? T(0) : z;  // NaN propagates, as in torch
  } else if constexpr (A == Activation::kQuickGelu) {
    return z / (T(1) + ::exp(T(-1.702) * z));
  } else {
    return z / (T(1) + ::exp(-z));
  }
}

template <Activation A, typename T>
__device__ void act_value_grad(T z, T& h, T& d) {
  if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + ::erf(z * T(M_SQRT1_2)));
    h = z * cdf;
    d = cdf + z * ::exp(T(-0.5) * z * z) * T(0.3989422804014327);  // Φ(z) + z φ(z)
  } else if constexpr (A == Activation::kGeluTanh) {
    const T c = T(0.7978845608028654), a = T(0.044715);
    const T tanh = ::tanh(c * (z + a * z * z * z));
    h = T(0.5) * z * (T(1) + tanh);
    d = T(0.5) * (T(1) + tanh) + T(0.5) * z * (T(1) - tanh * tanh) * c * (T(1) + T(3) * a * z * z);
  } else if constexpr (A == Activation::kRelu) {
    h = z < T(0) ? T(0) : z;
    d = z > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kQuickGelu) {
    const T sig = T(1) / (T(1) + ::exp(T(-1.702) * z));
    h = z * sig;
    d = sig * (T(1) + T(1.702) * z * (T(1) - sig));
  } else {
    const T sig = T(1) / (T(1) + ::exp(-z));
    h = z * sig;
    d = sig * (T(1) + z * (T(1) - sig));
  }
}

// ---- forward -----------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  int64_t tokens, d_ff, top_k, experts, rank;
  const scalar_t* pre;     // [T, F] = x W1ᵀ + b1 (cuBLAS)
  const int64_t* indices;  // [T, k]
  const acc_t* p;          // [T, k]
  const acc_t* U;          // [T, E·r] = x A1ᵀ, or null (fc1 not adapted)
  const acc_t* B1t;        // [E, r, F], s folded in
  const acc_t* A2;         // [E, r, F], or null (fc2 not adapted)
  scalar_t* mixed;         // [T, F] out: Σ_j p_j h_j
  acc_t* V;                // [T, E·r] out (zeroed): Σ_j p_j A2[e_j] h_j in expert e_j's columns
};

template <typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs<scalar_t, acc_t> a) {
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t F = a.d_ff, r = a.rank, Er = a.experts * a.rank;

  // Warp w takes rows 8w..8w+7 of the tile; lane l takes columns l and l + 32.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp * (kTile / kWarps); row < (warp + 1) * (kTile / kWarps); ++row) {
    const int64_t t = m0 + row;
    if (t >= a.tokens) break;  // uniform across the warp
    acc_t base[2], mixed[2] = {acc_t(0), acc_t(0)};
    for (int c = 0; c < 2; ++c) {
      const int64_t f = n0 + lane + 32 * c;
      base[c] = f < F ? static_cast<acc_t>(a.pre[t * F + f]) : acc_t(0);
    }
    for (int64_t j = 0; j < a.top_k; ++j) {
      const int64_t e = a.indices[t * a.top_k + j];
      const acc_t pj = a.p[t * a.top_k + j];
      acc_t h[2];
      for (int c = 0; c < 2; ++c) {
        const int64_t f = n0 + lane + 32 * c;
        if (f >= F) {
          h[c] = acc_t(0);
          continue;
        }
        acc_t z = base[c];
        for (int64_t i = 0; a.U && i < r; ++i) z += a.U[t * Er + e * r + i] * a.B1t[(e * r + i) * F + f];
        h[c] = act_value<A>(z);
        mixed[c] += pj * h[c];
      }
      for (int64_t i = 0; a.A2 && i < r; ++i) {
        const acc_t* A2_row = a.A2 + (e * r + i) * F;
        acc_t part = acc_t(0);
        for (int c = 0; c < 2; ++c) {
          const int64_t f = n0 + lane + 32 * c;
          if (f < F) part += h[c] * A2_row[f];
        }
        part = warp_sum(part);
        if (lane == 0) atomicAdd(a.V + t * Er + e * r + i, pj * part);
      }
    }
    for (int c = 0; c < 2; ++c) {
      const int64_t f = n0 + lane + 32 * c;
      if (f < F) a.mixed[t * F + f] = static_cast<scalar_t>(mixed[c]);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  int64_t tokens, d_ff, top_k, experts, rank;
  const scalar_t* gm;      // [T, F] = g W2 (cuBLAS), g = dL/dy
  const scalar_t* pre;     // [T, F] saved x W1ᵀ + b1
  const int64_t* indices;  // [T, k]
  const acc_t* p;          // [T, k]
  const acc_t* U;          // [T, E·r], or null
  const acc_t* B1t;        // [E, r, F], s folded in
  const acc_t* A2;         // [E, r, F], or null
  const acc_t* g2;         // [T, E·r] = g (s B2s), or null
  acc_t* grad_p;           // [T, k] out (zeroed; <g, b2> added afterwards)
  acc_t* grad_U;           // [T, E·r] out (zeroed), or null
  acc_t* grad_B1t;         // [E·r, F] out (zeroed; without s), or null
  acc_t* grad_A2;          // [E·r, F] out (zeroed), or null
  scalar_t* grad_pre;      // [T, F] out: Σ_j dL/dz_j
  scalar_t* mixed;         // [T, F] out, or null when not wanted
  bool shared_accumulators;  // accumulate the factor gradients in shared memory first
};

template <typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t F = a.d_ff, r = a.rank, Er = a.experts * a.rank;

  // Factor-gradient accumulators: [E·r][64] per block in shared memory, or the global [E·r][F].
  acc_t* acc_B1 = a.grad_B1t;
  acc_t* acc_A2 = a.grad_A2;
  int64_t acc_ld = F, acc_col0 = n0;
  if (a.shared_accumulators) {
    acc_t* region = reinterpret_cast<acc_t*>(smem);
    acc_B1 = a.grad_B1t ? region : nullptr;
    acc_A2 = a.grad_A2 ? region + (a.grad_B1t ? Er * kTile : 0) : nullptr;
    acc_ld = kTile;
    acc_col0 = 0;
    const int64_t count = ((a.grad_B1t ? 1 : 0) + (a.grad_A2 ? 1 : 0)) * Er * kTile;
    for (int64_t i = threadIdx.x; i < count; i += kThreads) region[i] = acc_t(0);
  }
  __syncthreads();  // the accumulators are zero before any warp adds to them

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp * (kTile / kWarps); row < (warp + 1) * (kTile / kWarps); ++row) {
    const int64_t t = m0 + row;
    if (t >= a.tokens) break;  // uniform across the warp
    acc_t pre[2], gm[2], grad_pre[2] = {acc_t(0), acc_t(0)}, mixed[2] = {acc_t(0), acc_t(0)};
    for (int c = 0; c < 2; ++c) {
      const int64_t f = n0 + lane + 32 * c;
      pre[c] = f < F ? static_cast<acc_t>(a.pre[t * F + f]) : acc_t(0);
      gm[c] = f < F ? static_cast<acc_t>(a.gm[t * F + f]) : acc_t(0);
    }
    for (int64_t j = 0; j < a.top_k; ++j) {
      const int64_t e = a.indices[t * a.top_k + j];
      const acc_t pj = a.p[t * a.top_k + j];
      const acc_t* u = a.U ? a.U + t * Er + e * r : nullptr;
      const acc_t* g2 = a.A2 ? a.g2 + t * Er + e * r : nullptr;
      acc_t h[2], gz[2], grad_p = acc_t(0);
      for (int c = 0; c < 2; ++c) {
        const int64_t f = n0 + lane + 32 * c;
        h[c] = gz[c] = acc_t(0);
        if (f >= F) continue;
        acc_t z = pre[c], q = gm[c], d;
        for (int64_t i = 0; u && i < r; ++i) z += u[i] * a.B1t[(e * r + i) * F + f];
        for (int64_t i = 0; g2 && i < r; ++i) q += g2[i] * a.A2[(e * r + i) * F + f];
        act_value_grad<A>(z, h[c], d);
        grad_p += h[c] * q;  // dL/dp_j = <h_j, q_j> (+ <g, b2>)
        gz[c] = pj * q * d;  // dL/dz_j
        grad_pre[c] += gz[c];
        mixed[c] += pj * h[c];
      }
      grad_p = warp_sum(grad_p);
      if (lane == 0) atomicAdd(a.grad_p + t * a.top_k + j, grad_p);
      for (int64_t i = 0; u && i < r; ++i) {
        acc_t part = acc_t(0);
        for (int c = 0; c < 2; ++c) {
          const int64_t f = n0 + lane + 32 * c;
          if (f >= F) continue;
          part += gz[c] * a.B1t[(e * r + i) * F + f];
          atomicAdd(acc_B1 + (e * r + i) * acc_ld + acc_col0 + lane + 32 * c, u[i] * gz[c]);
        }
        part = warp_sum(part);
        if (lane == 0) atomicAdd(a.grad_U + t * Er + e * r + i, part);
      }
      for (int64_t i = 0; g2 && i < r; ++i) {
        for (int c = 0; c < 2; ++c) {
          if (n0 + lane + 32 * c >= F) continue;
          atomicAdd(acc_A2 + (e * r + i) * acc_ld + acc_col0 + lane + 32 * c, pj * g2[i] * h[c]);
        }
      }
    }
    for (int c = 0; c < 2; ++c) {
      const int64_t f = n0 + lane + 32 * c;
      if (f >= F) continue;
      a.grad_pre[t * F + f] = static_cast<scalar_t>(grad_pre[c]);
      if (a.mixed) a.mixed[t * F + f] = static_cast<scalar_t>(mixed[c]);
    }
  }
  if (a.shared_accumulators) {  // one global atomic per non-zero accumulator entry of the block
    __syncthreads();
    for (int which = 0; which < 2; ++which) {
      const acc_t* src = which == 0 ? acc_B1 : acc_A2;
      acc_t* dst = which == 0 ? a.grad_B1t : a.grad_A2;
      for (int64_t i = threadIdx.x; src && i < Er * kTile; i += kThreads) {
        const int64_t f = n0 + i % kTile;
        if (f < F && src[i] != acc_t(0)) atomicAdd(dst + (i / kTile) * F + f, src[i]);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

dim3 tile_grid(const MoeSizes& s) {
  const auto tiles = [](int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); };
  return dim3(tiles(s.tokens), tiles(s.d_ff));  // tokens on x: up to 2^31 - 1 tiles
}

// The CUDA kernels compute the plain FFN only (the ops' gate arguments exist for the CPU library).
void refuse_gate(const c10::optional<at::Tensor>& gate_weight) {
  TORCH_CHECK(!gate_weight.has_value(), "lowrank_moe: the CUDA kernels have no gated FFN (SwiGLU/GeGLU) path: "
              "expected gate_weight=None, got a tensor of shape ", gate_weight->sizes(),
              "; a gated layer runs on backend='triton' or 'torch' (backend='auto' picks one that can)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_moe_fwd_cuda(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& fc1_weight,
    const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
    const c10::optional<at::Tensor>& fc1_A, const c10::optional<at::Tensor>& fc1_B,
    const c10::optional<at::Tensor>& fc2_A, const c10::optional<at::Tensor>& fc2_B, double scale,
    c10::string_view activation, bool save_for_backward, const c10::optional<at::Tensor>& gate_weight,
    const c10::optional<at::Tensor>& /*gate_bias*/, const c10::optional<at::Tensor>& /*gate_A*/,
    const c10::optional<at::Tensor>& /*gate_B*/) {
  refuse_gate(gate_weight);
  const KernelGuard guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  // V's sums over feature tiles are float atomics: the order, and so the last bits, vary run to run.
  at::globalContext().alertNotDeterministic("dasam3::lowrank_moe_fwd (CUDA)");
  const MoeSizes s = check_inputs(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B,
                                  fc2_A, fc2_B);
  const Activation act = parse_activation(activation);
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const at::Tensor xc = x.contiguous(), W2 = fc2_weight.contiguous();
  const at::Tensor p = contiguous_as(weights, compute), idx = contiguous_as(indices, at::kLong);
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, compute);
  const int64_t Er = s.experts * s.rank;
  const at::Tensor U = s.adapt_fc1 ? at::mm(xc.to(compute), f.A1s.t()) : at::Tensor();
  const at::Tensor V = s.adapt_fc2 ? at::zeros({s.tokens, Er}, p.options()) : at::Tensor();
  const at::Tensor pre = fc1_bias.has_value() ? at::addmm(*fc1_bias, xc, fc1_weight.t()) : at::mm(xc, fc1_weight.t());
  const at::Tensor mixed = at::empty({s.tokens, s.d_ff}, xc.options());

  if (s.tokens > 0 && s.d_ff > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_moe_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ForwardArgs<scalar_t, acc_t> args{
          s.tokens, s.d_ff, s.top_k, s.experts, s.rank, pre.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          p.data_ptr<acc_t>(), data_or_null<acc_t>(U), data_or_null<acc_t>(f.B1t), data_or_null<acc_t>(f.A2),
          mixed.data_ptr<scalar_t>(), mutable_or_null<acc_t>(V)};
      with_activation(act, [&](auto a) {
        forward_kernel<scalar_t, acc_t, decltype(a)::value>
            <<<tile_grid(s), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
                     const c10::optional<at::Tensor>& /*gate_A*/, const c10::optional<at::Tensor>& /*gate_B*/) {
  refuse_gate(gate_weight);
  const KernelGuard guard;
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::globalContext().alertNotDeterministic("dasam3::lowrank_moe_bwd (CUDA)");  // atomics, as the forward
  const MoeSizes s = check_backward_inputs(grad_y, x, indices, weights, fc1_weight, fc2_weight, fc2_bias, fc1_A,
                                           fc1_B, fc2_A, fc2_B, pre, U, V);
  const Activation act = parse_activation(activation);
  const int64_t Er = s.experts * s.rank;
  const auto dtype = x.scalar_type(), compute = compute_dtype(dtype);
  const at::Tensor g = contiguous_as(grad_y, dtype), prec = contiguous_as(pre, dtype);
  const at::Tensor gm = at::mm(g, fc2_weight);  // [T, F]: the frozen fc2 product, on cuBLAS
  const at::Tensor g_acc = g.to(compute);
  const at::Tensor p = contiguous_as(weights, compute), idx = contiguous_as(indices, at::kLong);
  const at::Tensor Uc = s.adapt_fc1 ? contiguous_as(U, compute) : at::Tensor();
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, compute);
  const auto acc_opts = p.options();
  const at::Tensor g2 = s.adapt_fc2 ? at::mm(g_acc, f.B2s) : at::Tensor();
  at::Tensor grad_p = at::zeros({s.tokens, s.top_k}, acc_opts);
  const at::Tensor grad_U = s.adapt_fc1 ? at::zeros({s.tokens, Er}, acc_opts) : at::Tensor();
  const at::Tensor grad_B1t = s.adapt_fc1 ? at::zeros({Er, s.d_ff}, acc_opts) : at::Tensor();
  const at::Tensor grad_A2 = s.adapt_fc2 ? at::zeros({Er, s.d_ff}, acc_opts) : at::Tensor();
  const at::Tensor grad_pre = at::empty({s.tokens, s.d_ff}, g.options());
  const at::Tensor mixed = need_fc_grads ? at::empty({s.tokens, s.d_ff}, g.options()) : at::Tensor();

  if (s.tokens > 0 && s.d_ff > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_moe_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t accumulators = ((s.adapt_fc1 ? 1 : 0) + (s.adapt_fc2 ? 1 : 0)) * Er * kTile * sizeof(acc_t);
      const bool shared = accumulators <= kSmemLimit;
      const BackwardArgs<scalar_t, acc_t> args{
          s.tokens, s.d_ff, s.top_k, s.experts, s.rank, gm.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(),
          idx.data_ptr<int64_t>(), p.data_ptr<acc_t>(), data_or_null<acc_t>(Uc),
          data_or_null<acc_t>(f.B1t), data_or_null<acc_t>(f.A2), data_or_null<acc_t>(g2), grad_p.data_ptr<acc_t>(),
          mutable_or_null<acc_t>(grad_U), mutable_or_null<acc_t>(grad_B1t), mutable_or_null<acc_t>(grad_A2),
          grad_pre.data_ptr<scalar_t>(), mutable_or_null<scalar_t>(mixed), shared};
      with_activation(act, [&](auto a) {
        backward_kernel<scalar_t, acc_t, decltype(a)::value>
            <<<tile_grid(s), kThreads, shared ? accumulators : 0, at::cuda::getCurrentCUDAStream()>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  if (fc2_bias.has_value()) grad_p.add_(at::mv(g_acc, contiguous_as(*fc2_bias, compute)).unsqueeze(1));
  at::Tensor grad_x;
  if (need_grad_x) {
    grad_x = at::mm(grad_pre, fc1_weight.contiguous());
    if (s.adapt_fc1) grad_x.add_(at::mm(grad_U, f.A1s).to(dtype));
  }
  const auto lora = factor_grads(s, scale, x, g_acc, V, grad_U, grad_B1t, grad_A2, fc1_A, fc1_B, fc2_A, fc2_B);
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
