// The CUDA kernels of the dasam3 ops (the forward and backward epilogues; csrc/damoe_cuda.cu launches
// them around the cuBLAS products, and its opening comment says what they compute).  Device code only,
// with no ATen: tests/kernels/emulated_cuda.cpp compiles this same file as host code, one std::thread
// per CUDA thread, to test the kernels on machines without a GPU.
#pragma once

#include "damoe_activation.h"

#include <cmath>
#include <cstddef>
#include <cstdint>

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

// z + Σ_i u_i Bt[i][f]: one slot's low-rank term at feature f, with u the slot's r columns of U and Bt
// its expert's r rows of s·Bᵀ (nothing added when the projection is not adapted: u null).
template <typename acc_t>
__device__ acc_t add_low_rank(acc_t z, const acc_t* u, const acc_t* Bt, int64_t r, int64_t F, int64_t f) {
  for (int64_t i = 0; u && i < r; ++i) z += u[i] * Bt[i * F + f];
  return z;
}

// A pointer to row `row` of a [rows, width] array, or null for an absent one.
template <typename T>
__device__ T* row_or_null(T* base, int64_t row, int64_t width) {
  return base ? base + row * width : nullptr;
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  int64_t tokens, d_ff, top_k, experts, rank;
  int64_t pre_ld, u_ld;    // row widths of pre (F, gated 2F) and of U
  const scalar_t* pre;     // [T, pre_ld] = x W1ᵀ + b1 (gated: then x W_gᵀ + b_g), cuBLAS
  const int64_t* indices;  // [T, k]
  const acc_t* p;          // [T, k]
  const acc_t* U1;         // fc1's E·r columns of U = x [A1; A_g]ᵀ [T, u_ld], or null (fc1 not adapted)
  const acc_t* Ug;         // the gate's E·r columns of U, or null (plain, or the gate not adapted)
  const acc_t* B1t;        // [E, r, F], s folded in
  const acc_t* Bgt;        // [E, r, F], s folded in, or null
  const acc_t* A2;         // [E, r, F], or null (fc2 not adapted)
  scalar_t* mixed;         // [T, F] out: Σ_j p_j h_j
  acc_t* V;                // [T, E·r] out (zeroed): Σ_j p_j A2[e_j] h_j in expert e_j's columns
};

// The lane's two features (n0 + lane, n0 + lane + 32) of a row of F values, in acc_t (0 past F).
template <typename scalar_t, typename acc_t>
__device__ void load_features(const scalar_t* row, int64_t F, int64_t n0, int lane, acc_t (&out)[2]) {
  for (int c = 0; c < 2; ++c) {
    const int64_t f = n0 + lane + 32 * c;
    out[c] = f < F ? static_cast<acc_t>(row[f]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, Activation A, bool kGated>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs<scalar_t, acc_t> a) {
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t F = a.d_ff, r = a.rank, Er = a.experts * a.rank;

  // Warp w takes rows 8w..8w+7 of the tile; lane l takes columns l and l + 32.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp * (kTile / kWarps); row < (warp + 1) * (kTile / kWarps); ++row) {
    const int64_t t = m0 + row;
    if (t >= a.tokens) break;  // uniform across the warp
    acc_t base[2], base_gate[2], mixed[2] = {acc_t(0), acc_t(0)};
    load_features(a.pre + t * a.pre_ld, F, n0, lane, base);
    if constexpr (kGated) load_features(a.pre + t * a.pre_ld + F, F, n0, lane, base_gate);
    for (int64_t j = 0; j < a.top_k; ++j) {
      const int64_t e = a.indices[t * a.top_k + j], u_col = t * a.u_ld + e * r;
      const acc_t pj = a.p[t * a.top_k + j];
      const acc_t *u1 = a.U1 ? a.U1 + u_col : nullptr, *B1 = row_or_null(a.B1t, e * r, F);
      const acc_t *ug = a.Ug ? a.Ug + u_col : nullptr, *Bg = row_or_null(a.Bgt, e * r, F);
      acc_t h[2];
      for (int c = 0; c < 2; ++c) {
        const int64_t f = n0 + lane + 32 * c;
        if (f >= F) {
          h[c] = acc_t(0);
          continue;
        }
        const acc_t z = add_low_rank(base[c], u1, B1, r, F, f);
        if constexpr (kGated) h[c] = act_value<A>(add_low_rank(base_gate[c], ug, Bg, r, F, f)) * z;
        else h[c] = act_value<A>(z);
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
  int64_t pre_ld, u_ld;    // row widths of pre and grad_pre (F, gated 2F) and of U and grad_U
  const scalar_t* gm;      // [T, F] = g W2 (cuBLAS), g = dL/dy
  const scalar_t* pre;     // [T, pre_ld] saved x W1ᵀ + b1 (gated: then x W_gᵀ + b_g)
  const int64_t* indices;  // [T, k]
  const acc_t* p;          // [T, k]
  const acc_t* U1;         // fc1's columns of U [T, u_ld], or null
  const acc_t* Ug;         // the gate's columns of U, or null
  const acc_t* B1t;        // [E, r, F], s folded in
  const acc_t* Bgt;        // [E, r, F], s folded in, or null
  const acc_t* A2;         // [E, r, F], or null
  const acc_t* g2;         // [T, E·r] = g (s B2s), or null
  acc_t* grad_p;           // [T, k] out (zeroed; <g, b2> added afterwards)
  acc_t* grad_U1;          // fc1's columns of grad_U [T, u_ld] out (zeroed), or null
  acc_t* grad_Ug;          // the gate's columns of grad_U, or null
  acc_t* grad_B1t;         // [E·r, F] out (zeroed; without s), or null
  acc_t* grad_Bgt;         // [E·r, F] out (zeroed; without s), or null
  acc_t* grad_A2;          // [E·r, F] out (zeroed), or null
  scalar_t* grad_pre;      // [T, pre_ld] out: Σ_j dL/dz_j (gated: then Σ_j dL/dg_j)
  scalar_t* mixed;         // [T, F] out, or null when not wanted
  bool shared_accumulators;  // accumulate the factor gradients in shared memory first
};

// One slot's gradients through the low-rank term of an adapted input projection (fc1 or the gate), with
// gz = dL/dz at the lane's two features: grad_u[i] += Σ_f gz_f Bt[i][f] (a warp sum, one atomic per
// rank) and acc[i][col] += u_i gz_f (the gradient of s·Bᵀ without s).
template <typename acc_t>
__device__ void slot_input_grads(const acc_t* u, const acc_t* Bt, const acc_t (&gz)[2], int64_t r, int64_t F,
                                 int64_t n0, int lane, acc_t* acc, int64_t acc_ld, int64_t acc_col0, acc_t* grad_u) {
  for (int64_t i = 0; u && i < r; ++i) {
    acc_t part = acc_t(0);
    for (int c = 0; c < 2; ++c) {
      const int64_t f = n0 + lane + 32 * c;
      if (f >= F) continue;
      part += gz[c] * Bt[i * F + f];
      atomicAdd(acc + i * acc_ld + acc_col0 + lane + 32 * c, u[i] * gz[c]);
    }
    part = warp_sum(part);
    if (lane == 0) atomicAdd(grad_u + i, part);
  }
}

// A block's shared [rows][64] accumulator added to the global [rows][F] one at columns n0..: one global
// atomic per non-zero entry (nothing for an absent accumulator).
template <typename acc_t>
__device__ void flush_accumulator(const acc_t* block, acc_t* global, int64_t rows, int64_t F, int64_t n0) {
  for (int64_t i = threadIdx.x; block && i < rows * kTile; i += kThreads) {
    const int64_t f = n0 + i % kTile;
    if (f < F && block[i] != acc_t(0)) atomicAdd(global + (i / kTile) * F + f, block[i]);
  }
}

template <typename scalar_t, typename acc_t, Activation A, bool kGated>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const int64_t F = a.d_ff, r = a.rank, Er = a.experts * a.rank;

  // Factor-gradient accumulators (B1, B_g, A2: those present): [E·r][64] per block in shared memory,
  // or the global [E·r][F].  Named pointers, not an array: a pointer array indexed in a loop went to
  // local memory (a 16-byte stack frame on sm_80).
  acc_t *acc_B1 = a.grad_B1t, *acc_Bg = a.grad_Bgt, *acc_A2 = a.grad_A2;
  int64_t acc_ld = F, acc_col0 = n0;
  if (a.shared_accumulators) {
    acc_t* const region = reinterpret_cast<acc_t*>(smem);
    acc_t* next = region;
    const auto carve = [&](acc_t*& acc) {
      if (acc) acc = next, next += Er * kTile;
    };
    carve(acc_B1), carve(acc_Bg), carve(acc_A2);
    acc_ld = kTile;
    acc_col0 = 0;
    for (int64_t i = threadIdx.x; i < next - region; i += kThreads) region[i] = acc_t(0);
  }
  __syncthreads();  // the accumulators are zero before any warp adds to them

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp * (kTile / kWarps); row < (warp + 1) * (kTile / kWarps); ++row) {
    const int64_t t = m0 + row;
    if (t >= a.tokens) break;  // uniform across the warp
    acc_t pre[2], pre_gate[2], gm[2];
    acc_t grad_pre[2] = {acc_t(0), acc_t(0)}, grad_pre_gate[2] = {acc_t(0), acc_t(0)}, mixed[2] = {acc_t(0), acc_t(0)};
    load_features(a.pre + t * a.pre_ld, F, n0, lane, pre);
    if constexpr (kGated) load_features(a.pre + t * a.pre_ld + F, F, n0, lane, pre_gate);
    load_features(a.gm + t * F, F, n0, lane, gm);
    for (int64_t j = 0; j < a.top_k; ++j) {
      const int64_t e = a.indices[t * a.top_k + j], u_col = t * a.u_ld + e * r;
      const acc_t pj = a.p[t * a.top_k + j];
      const acc_t *u1 = a.U1 ? a.U1 + u_col : nullptr, *B1 = row_or_null(a.B1t, e * r, F);
      const acc_t *ug = a.Ug ? a.Ug + u_col : nullptr, *Bg = row_or_null(a.Bgt, e * r, F);
      const acc_t *g2 = a.A2 ? a.g2 + t * Er + e * r : nullptr, *A2 = row_or_null(a.A2, e * r, F);
      acc_t h[2], gz[2], gg[2], grad_p = acc_t(0);
      for (int c = 0; c < 2; ++c) {
        const int64_t f = n0 + lane + 32 * c;
        h[c] = gz[c] = gg[c] = acc_t(0);
        if (f >= F) continue;
        const acc_t z = add_low_rank(pre[c], u1, B1, r, F, f);
        const acc_t q = add_low_rank(gm[c], g2, A2, r, F, f);  // dL/dh_j / p_j
        if constexpr (kGated) {  // h = act(g) z: dL/dz = p q act(g), dL/dg = p q z act'(g)
          acc_t act, d;
          act_value_grad<A>(add_low_rank(pre_gate[c], ug, Bg, r, F, f), act, d);
          h[c] = act * z;
          gz[c] = pj * q * act;
          gg[c] = pj * q * z * d;
          grad_pre_gate[c] += gg[c];
        } else {
          acc_t d;
          act_value_grad<A>(z, h[c], d);
          gz[c] = pj * q * d;  // dL/dz_j
        }
        grad_p += h[c] * q;  // dL/dp_j = <h_j, q_j> (+ <g, b2>)
        grad_pre[c] += gz[c];
        mixed[c] += pj * h[c];
      }
      grad_p = warp_sum(grad_p);
      if (lane == 0) atomicAdd(a.grad_p + t * a.top_k + j, grad_p);
      slot_input_grads(u1, B1, gz, r, F, n0, lane, row_or_null(acc_B1, e * r, acc_ld), acc_ld, acc_col0,
                       a.grad_U1 ? a.grad_U1 + u_col : nullptr);
      if constexpr (kGated) {
        slot_input_grads(ug, Bg, gg, r, F, n0, lane, row_or_null(acc_Bg, e * r, acc_ld), acc_ld, acc_col0,
                         a.grad_Ug ? a.grad_Ug + u_col : nullptr);
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
      a.grad_pre[t * a.pre_ld + f] = static_cast<scalar_t>(grad_pre[c]);
      if constexpr (kGated) a.grad_pre[t * a.pre_ld + F + f] = static_cast<scalar_t>(grad_pre_gate[c]);
      if (a.mixed) a.mixed[t * F + f] = static_cast<scalar_t>(mixed[c]);
    }
  }
  if (a.shared_accumulators) {
    __syncthreads();
    flush_accumulator(acc_B1, a.grad_B1t, Er, F, n0);
    flush_accumulator(acc_Bg, a.grad_Bgt, Er, F, n0);
    flush_accumulator(acc_A2, a.grad_A2, Er, F, n0);
  }
}

}  // namespace
}  // namespace dasam3
