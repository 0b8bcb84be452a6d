// CPU implementation of the dasam3 mixture-of-low-rank-experts ops (forward and backward).
//
// Tokens are processed in tiles of a few hundred rows: per tile, one BLAS GEMM computes x W1ᵀ, a
// vectorised per-token pass adds b1 and each slot's low-rank term, applies the activation, combines
// the k slots into m = Σ_j p_j h_j and shrinks h_j through its expert's A2, and a second GEMM gives m W2ᵀ.
// [T, k, d_ff] is never materialised; the backward recomputes h_j from the saved pre-activation.
// Tiles run in parallel (at::parallel_for, OpenMP in PyTorch's builds) and the GEMMs inside a
// parallel region run single-threaded, so a tile never leaves its core.
//
// Half types (bf16, fp16): the tile GEMMs run in the half type with fp32 accumulation (oneDNN; AMX or
// AVX512-BF16/FP16 where the CPU has them, see gemm_dtype), everything per token (low-rank terms, bias,
// activation, the k-slot combination) in fp32 on rows converted on the fly, and each [tile, d_ff]
// row is rounded to the half type once, where a GEMM reads it.
//
// This file is compiled once per instruction set (setup.py: DEFAULT, AVX2, AVX512, as ATen compiles
// its own kernels); the Python loader picks the variant the CPU supports, and at::vec::Vectorized
// maps to that instruction set.
#include "damoe_common.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace dasam3 {
namespace {

using at::vec::Vectorized;

// Elements of one [tile, d_ff] tile: 2^19 (256 rows at d_ff = 2048).  Tall tiles keep the tile GEMMs
// efficient, which matters more than keeping a tile in L2 (the per-token passes work on one row at a
// time): on an AVX512-BF16 EPYC, one thread, SAM3 shape, 16 / 64 / 128 / 256 rows gave a bf16 forward
// of 52 / 37 / 33 / 32 ms (fp32: 108 / 95 / 90 / 89 ms); 512 rows gained nothing more.
constexpr int64_t kTileElements = int64_t(1) << 19;

// Rows per tile: as many as fit kTileElements, but few enough that every thread gets a tile.
int64_t tile_rows(int64_t tokens, int64_t d_ff) {
  const int64_t per_thread = (tokens + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>(8, std::min(kTileElements / std::max<int64_t>(d_ff, 1), per_thread));
}

// ---- activations on a vector of pre-activations ----------------------------------------------

template <Activation A>
struct Act;

// Φ(z) and e^(-z²/2) for the exact-erf gelu.  For float, erf(z/√2) by Abramowitz & Stegun 7.1.26
// (the formula of ATen's vectorised erf, |error| < 1.5e-7) with ATen's fast exp, the exponential
// shared with φ(z) = e^(-z²/2)/√(2π); for double, the accurate erf and exp.
template <typename V>
C10_ALWAYS_INLINE void normal_cdf_and_exp(V z, V& cdf, V& e) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    e = (z * z * V(-0.5f)).exp_u20();
    const V t = V(1.f) / at::vec::fmadd(V(0.3275911f * float(M_SQRT1_2)), z.abs(), V(1.f));
    V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    poly = at::vec::fmadd(poly, t, V(1.421413741f));
    poly = at::vec::fmadd(poly, t, V(-0.284496736f));
    poly = at::vec::fmadd(poly, t, V(0.254829592f));
    const V tail = V(0.5f) * poly * t * e;  // Φ(-|z|)
    cdf = V::blendv(V(1.f) - tail, tail, z < V(0.f));
  } else {
    e = (z * z * V(-0.5)).exp();
    cdf = (V(1) + (z * V(M_SQRT1_2)).erf()) * V(0.5);
  }
}

template <>
struct Act<Activation::kGelu> {  // z Φ(z), the exact erf form
  template <typename V>
  C10_ALWAYS_INLINE static V value(V z) {
    V cdf, e;
    normal_cdf_and_exp(z, cdf, e);
    return z * cdf;
  }
  template <typename V>
  C10_ALWAYS_INLINE static void value_and_grad(V z, V& h, V& d) {
    V cdf, e;
    normal_cdf_and_exp(z, cdf, e);
    h = z * cdf;
    d = at::vec::fmadd(z * V(0.5 * M_2_SQRTPI * M_SQRT1_2), e, cdf);  // Φ(z) + z φ(z)
  }
};

template <>
struct Act<Activation::kGeluTanh> {  // 0.5 z (1 + tanh(√(2/π)(z + 0.044715 z³)))
  static constexpr double kC = 0.7978845608028654;
  static constexpr double kA = 0.044715;
  template <typename V>
  C10_ALWAYS_INLINE static V value(V z) {
    const V tanh = (V(kC) * at::vec::fmadd(V(kA) * z * z, z, z)).tanh();
    return V(0.5) * z * (V(1) + tanh);
  }
  template <typename V>
  C10_ALWAYS_INLINE static void value_and_grad(V z, V& h, V& d) {
    const V z2 = z * z;
    const V tanh = (V(kC) * at::vec::fmadd(V(kA) * z2, z, z)).tanh();
    const V dinner = V(kC) * at::vec::fmadd(V(3 * kA), z2, V(1));
    h = V(0.5) * z * (V(1) + tanh);
    d = V(0.5) * (V(1) + tanh) + V(0.5) * z * (V(1) - tanh * tanh) * dinner;
  }
};

template <>
struct Act<Activation::kRelu> {
  template <typename V>
  C10_ALWAYS_INLINE static V value(V z) {
    return at::vec::clamp_min(z, V(0));
  }
  template <typename V>
  C10_ALWAYS_INLINE static void value_and_grad(V z, V& h, V& d) {
    h = at::vec::clamp_min(z, V(0));
    d = z.gt(V(0));  // 1 where z > 0, else 0: torch's relu gradient at 0
  }
};

// silu and quick_gelu take ATen's inlined exp_u20 (float: a polynomial within a few ulp; double: exp),
// not Sleef's exp: a call inside the per-token loops spills every vector register on each iteration.
template <>
struct Act<Activation::kSilu> {  // z σ(z)
  template <typename V>
  C10_ALWAYS_INLINE static V value(V z) {
    return z / (V(1) + z.neg().exp_u20());
  }
  template <typename V>
  C10_ALWAYS_INLINE static void value_and_grad(V z, V& h, V& d) {
    const V sig = V(1) / (V(1) + z.neg().exp_u20());
    h = z * sig;
    d = sig * at::vec::fmadd(z, V(1) - sig, V(1));
  }
};

template <>
struct Act<Activation::kQuickGelu> {  // z σ(1.702 z), CLIP's GELU approximation
  static constexpr double kC = 1.702;
  template <typename V>
  C10_ALWAYS_INLINE static V value(V z) {
    return z / (V(1) + (z * V(-kC)).exp_u20());
  }
  template <typename V>
  C10_ALWAYS_INLINE static void value_and_grad(V z, V& h, V& d) {
    const V sig = V(1) / (V(1) + (z * V(-kC)).exp_u20());
    h = z * sig;
    d = sig * at::vec::fmadd(V(kC) * z, V(1) - sig, V(1));  // σ(cz) (1 + c z (1 − σ(cz)))
  }
};

// ---- vector helpers over rows of length n --------------------------------------------------------

template <typename scalar_t>
scalar_t reduce_sum(Vectorized<scalar_t> v) {
  return at::vec::vec_reduce_all<scalar_t>([](auto a, auto b) { return a + b; }, v);
}

// fn(f, m) on the vectors of a row of n elements: m = V::size() as a compile-time constant on the full
// vectors (their loads and stores compile to plain vector moves), the remaining count on the tail.
template <typename scalar_t, typename Fn>
inline void for_each_vector(int64_t n, const Fn& fn) {
  constexpr int64_t kSize = Vectorized<scalar_t>::size();
  int64_t f = 0;
  for (; f + kSize <= n; f += kSize) fn(f, std::integral_constant<int64_t, kSize>{});
  if (f < n) fn(f, n - f);
}

// out[i] += coeff · Σ_f a[f] rows[i][f] for i < kRows: kRows dot products sharing the loads of a.
template <int kRows, typename scalar_t>
void add_dots_of(const scalar_t* a, const scalar_t* rows, int64_t n, scalar_t coeff, scalar_t* out) {
  using V = Vectorized<scalar_t>;
  V acc[kRows];
  std::fill(acc, acc + kRows, V(0));
  for_each_vector<scalar_t>(n, [&](int64_t f, auto m) {
    const V av = V::loadu(a + f, m);
    for (int i = 0; i < kRows; ++i) acc[i] = at::vec::fmadd(av, V::loadu(rows + i * n + f, m), acc[i]);
  });
  for (int i = 0; i < kRows; ++i) out[i] += coeff * reduce_sum(acc[i]);
}

// out[i] += coeff · Σ_f a[f] rows[i][f] for the r rows of an expert, up to 8 rows per pass over a.
template <typename scalar_t>
void add_dots(const scalar_t* a, const scalar_t* rows, int64_t r, int64_t n, scalar_t coeff, scalar_t* out) {
  int64_t i = 0;
  for (; i + 8 <= r; i += 8) add_dots_of<8>(a, rows + i * n, n, coeff, out + i);
  for (; i + 4 <= r; i += 4) add_dots_of<4>(a, rows + i * n, n, coeff, out + i);
  for (; i < r; ++i) add_dots_of<1>(a, rows + i * n, n, coeff, out + i);
}

// rows[i][f] += coeffs[i] · a[f] for i < r: one token's rank-r outer-product update.
template <typename scalar_t>
void add_outer(const scalar_t* coeffs, const scalar_t* a, int64_t r, int64_t n, scalar_t* rows) {
  using V = Vectorized<scalar_t>;
  for (int64_t i = 0; i < r; ++i) {
    const V c(coeffs[i]);
    scalar_t* row = rows + i * n;
    for_each_vector<scalar_t>(n, [&](int64_t f, auto m) {
      at::vec::fmadd(c, V::loadu(a + f, m), V::loadu(row + f, m)).store(row + f, m);
    });
  }
}

// base[f..f+m) + Σ_i coeffs[i] · rows[i][f..f+m): a low-rank correction of one vector of a row.  Four
// partial sums: one chain of r dependent FMAs would make the per-token loops wait on FMA latency.
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<scalar_t> low_rank_add(const scalar_t* base, const scalar_t* coeffs,
                                                    const scalar_t* rows, int64_t r, int64_t n, int64_t f, int64_t m) {
  using V = Vectorized<scalar_t>;
  const auto term = [&](int64_t i, V acc) { return at::vec::fmadd(V(coeffs[i]), V::loadu(rows + i * n + f, m), acc); };
  V z0 = V::loadu(base + f, m), z1(0), z2(0), z3(0);
  int64_t i = 0;
  for (; i + 4 <= r; i += 4) {
    z0 = term(i, z0);
    z1 = term(i + 1, z1);
    z2 = term(i + 2, z2);
    z3 = term(i + 3, z3);
  }
  for (; i < r; ++i) z0 = term(i, z0);
  return (z0 + z1) + (z2 + z3);
}

// row (=, or += when accumulate) v on m elements at f.
template <typename scalar_t>
void store_or_add(Vectorized<scalar_t> v, scalar_t* row, int64_t f, int64_t m, bool accumulate) {
  using V = Vectorized<scalar_t>;
  (accumulate ? v + V::loadu(row + f, m) : v).store(row + f, m);
}

// ---- rows in the storage type (the tile GEMMs' dtype) and in the compute type ----------------------

// row[i] += add[i] for i < n.
template <typename scalar_t>
void add_row(const scalar_t* add, scalar_t* row, int64_t n) {
  using V = Vectorized<scalar_t>;
  for_each_vector<scalar_t>(n, [&](int64_t f, auto m) {
    (V::loadu(row + f, m) + V::loadu(add + f, m)).store(row + f, m);
  });
}

// Row `src` of n storage elements as compute-type values: the row itself when the types agree, else
// converted into `scratch` (one pass over a row that stays in L1).
template <typename acc_t, typename scalar_t>
const acc_t* compute_row(const scalar_t* src, acc_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    using H = Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + H::size() <= n; i += H::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(H::loadu(src + i));
      lo.store(scratch + i);
      hi.store(scratch + i + Vectorized<float>::size());
    }
    for (; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

// Where a row that ends up in storage row `dst` is accumulated in the compute type: `dst` itself when
// the types agree, else `scratch` (then written back once by store_row).
template <typename acc_t, typename scalar_t>
acc_t* accumulator_row(scalar_t* dst, acc_t* scratch) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return dst;
  else return scratch;
}

// Writes an accumulator_row back to its storage row, rounding once (a no-op when the types agree).
template <typename acc_t, typename scalar_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    using H = Vectorized<scalar_t>;
    constexpr int64_t kHalf = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + H::size() <= n; i += H::size()) {
      const auto lo = Vectorized<float>::loadu(src + i), hi = Vectorized<float>::loadu(src + i + kHalf);
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Routing and factors of one call, as raw row-major pointers in scalar_t.
template <typename scalar_t>
struct Experts {
  int64_t d_ff, top_k, experts, rank;
  const int64_t* indices;  // [T, k]
  const scalar_t* p;       // [T, k]
  const scalar_t* U;       // [T, u_stride]: x A1ᵀ in its first E·r columns, or null when fc1 is not adapted
  const scalar_t* Ug;      // x A_gᵀ, the E·r columns of U after fc1's, or null when the gate is not adapted
  int64_t u_stride;        // elements per row of U
  const scalar_t* B1t;     // [E, r, F], s folded in, or null
  const scalar_t* Bgt;     // [E, r, F], s folded in, or null
  const scalar_t* A2;      // [E, r, F], or null when fc2 is not adapted

  int64_t expert(int64_t t, int64_t j) const { return indices[t * top_k + j]; }
  scalar_t weight(int64_t t, int64_t j) const { return p[t * top_k + j]; }
  const scalar_t* u(int64_t t, int64_t e) const { return U + t * u_stride + e * rank; }
  const scalar_t* ug(int64_t t, int64_t e) const { return Ug + t * u_stride + e * rank; }
  const scalar_t* B1t_of(int64_t e) const { return B1t + e * rank * d_ff; }
  const scalar_t* Bgt_of(int64_t e) const { return Bgt + e * rank * d_ff; }
  const scalar_t* A2_of(int64_t e) const { return A2 + e * rank * d_ff; }
};

// One slot's low-rank correction of an input projection (fc1 or the gate): the token's U columns of its
// expert and that expert's s·Bᵀ rows; rank 0 when the projection is not adapted.
template <typename scalar_t>
struct InputTerm {
  const scalar_t* coeffs = nullptr;
  const scalar_t* rows = nullptr;
  int64_t rank = 0;

  Vectorized<scalar_t> add_to(const scalar_t* base, int64_t n, int64_t f, int64_t m) const {
    return low_rank_add(base, coeffs, rows, rank, n, f, m);
  }
};

template <typename scalar_t>
InputTerm<scalar_t> fc1_term(const Experts<scalar_t>& X, int64_t t, int64_t e) {
  return X.U ? InputTerm<scalar_t>{X.u(t, e), X.B1t_of(e), X.rank} : InputTerm<scalar_t>{};
}

template <typename scalar_t>
InputTerm<scalar_t> gate_term(const Experts<scalar_t>& X, int64_t t, int64_t e) {
  return X.Ug ? InputTerm<scalar_t>{X.ug(t, e), X.Bgt_of(e), X.rank} : InputTerm<scalar_t>{};
}

// Token t's forward from its pre-activation row (gated: [fc1's | the gate's], 2F long):
// mixed = Σ_j p_j h_j; v_row[e_j·r..] += p_j A2[e_j] h_j.  h_row: [F] scratch.
template <typename scalar_t, Activation A, bool kGated>
void forward_token(const Experts<scalar_t>& X, int64_t t, const scalar_t* pre, scalar_t* mixed, scalar_t* v_row,
                   scalar_t* h_row) {
  using V = Vectorized<scalar_t>;
  const int64_t F = X.d_ff;
  for (int64_t j = 0; j < X.top_k; ++j) {
    const int64_t e = X.expert(t, j);
    const scalar_t pj = X.weight(t, j);
    const InputTerm<scalar_t> fc1 = fc1_term(X, t, e), gate = gate_term(X, t, e);
    for_each_vector<scalar_t>(F, [&](int64_t f, auto m) {
      const V z = fc1.add_to(pre, F, f, m);
      V h;
      if constexpr (kGated) h = Act<A>::value(gate.add_to(pre + F, F, f, m)) * z;
      else h = Act<A>::value(z);
      store_or_add(V(pj) * h, mixed, f, m, j > 0);
      if (X.A2) h.store(h_row + f, m);
    });
    if (X.A2) add_dots(h_row, X.A2_of(e), X.rank, F, pj, v_row + e * X.rank);
  }
}

// Per-token inputs and outputs of the backward pass (rows of length F unless noted; pre and grad_pre
// are 2F long for a gated FFN, the gate's half second).
template <typename scalar_t>
struct TokenGrads {
  const scalar_t* pre;
  const scalar_t* grad_mixed;  // W2ᵀ g
  const scalar_t* g2;          // [E·r] g (s B2s), or null when fc2 is not adapted
  scalar_t g_dot_b2;           // <g, b2>
  scalar_t* grad_pre;          // Σ_j dL/dz_j (gated: then Σ_j dL/dg_j)
  scalar_t* grad_p;            // [k]
  scalar_t* grad_u;            // [E·r] of fc1 accumulated, or null
  scalar_t* grad_B1t;          // [E, r, F] accumulated (without s), or null
  scalar_t* grad_A2;           // [E, r, F] accumulated, or null
  scalar_t* mixed;             // Σ_j p_j h_j, or null when not wanted
  scalar_t* h_row;             // scratch
  scalar_t* gz_row;            // scratch
  scalar_t* grad_ug;           // [E·r] of the gate accumulated, or null
  scalar_t* grad_Bgt;          // [E, r, F] accumulated (without s), or null
  scalar_t* gg_row;            // scratch (gated)
};

// The gradients of one input projection's low-rank term from dL/dz of a slot (gz): dL/dU[e] += gz (s Bᵀ)ᵀ
// and the gradient of s·Bᵀ (without s) += U[e] ⊗ gz.
template <typename scalar_t>
void input_term_grads(const InputTerm<scalar_t>& term, const scalar_t* gz, int64_t e, int64_t F, scalar_t* grad_u,
                      scalar_t* grad_Bt) {
  if (term.rank == 0) return;
  add_dots(gz, term.rows, term.rank, F, scalar_t(1), grad_u + e * term.rank);  // s is in the rows
  add_outer(term.coeffs, gz, term.rank, F, grad_Bt + e * term.rank * F);
}

// Token t's backward: with q_j = W2ᵀg + A2[e]ᵀ g2_e (the gradient of h_j per unit p_j),
// dL/dp_j = <h_j, q_j> + <g, b2> and dL/dz_j = p_j q_j act'(z_j); gated (h_j = act(g_j) ⊙ z_j),
// dL/dz_j = p_j q_j act(g_j) and dL/dg_j = p_j q_j z_j act'(g_j).
template <typename scalar_t, Activation A, bool kGated>
void backward_token(const Experts<scalar_t>& X, int64_t t, const TokenGrads<scalar_t>& G) {
  using V = Vectorized<scalar_t>;
  const int64_t F = X.d_ff, r = X.rank;
  const bool fc2 = X.A2 != nullptr;
  scalar_t coeffs[64];
  for (int64_t j = 0; j < X.top_k; ++j) {
    const int64_t e = X.expert(t, j);
    const scalar_t pj = X.weight(t, j);
    const InputTerm<scalar_t> fc1 = fc1_term(X, t, e), gate = gate_term(X, t, e);
    const scalar_t* A2_e = fc2 ? X.A2_of(e) : nullptr;
    const scalar_t* g2 = fc2 ? G.g2 + e * r : nullptr;
    V grad_p(0);
    for_each_vector<scalar_t>(F, [&](int64_t f, auto m) {
      V h, gz;
      const V z = fc1.add_to(G.pre, F, f, m);
      const V q = low_rank_add(G.grad_mixed, g2, A2_e, fc2 ? r : 0, F, f, m);
      const V grad_h = V(pj) * q;
      if constexpr (kGated) {
        V a, d;
        Act<A>::value_and_grad(gate.add_to(G.pre + F, F, f, m), a, d);
        h = a * z;
        gz = grad_h * a;
        const V gg = grad_h * z * d;
        store_or_add(gg, G.grad_pre + F, f, m, j > 0);
        if (gate.rank) gg.store(G.gg_row + f, m);
      } else {
        V d;
        Act<A>::value_and_grad(z, h, d);
        gz = grad_h * d;
      }
      grad_p = at::vec::fmadd(h, q, grad_p);
      store_or_add(gz, G.grad_pre, f, m, j > 0);
      if (fc1.rank) gz.store(G.gz_row + f, m);
      if (fc2) h.store(G.h_row + f, m);
      if (G.mixed) store_or_add(V(pj) * h, G.mixed, f, m, j > 0);
    });
    G.grad_p[j] = reduce_sum(grad_p) + G.g_dot_b2;
    input_term_grads(fc1, G.gz_row, e, F, G.grad_u, G.grad_B1t);
    if constexpr (kGated) input_term_grads(gate, G.gg_row, e, F, G.grad_ug, G.grad_Bgt);
    for (int64_t i0 = 0; fc2 && i0 < r; i0 += 64) {  // dA2[e] += p_j g2_e ⊗ h_j, in chunks of 64 ranks
      const int64_t count = std::min<int64_t>(64, r - i0);
      for (int64_t i = 0; i < count; ++i) coeffs[i] = pj * g2[i0 + i];
      add_outer(coeffs, G.h_row, count, F, G.grad_A2 + (e * r + i0) * F);
    }
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Row `row` of a row-major tensor with rows of `width` elements; null for an undefined tensor.
template <typename T>
T* row_of(const at::Tensor& t, int64_t row, int64_t width) {
  return t.defined() ? t.data_ptr<T>() + row * width : nullptr;
}

// fn(first_tile, end_tile) on the tiles of `tokens` rows, in parallel.  The worker threads get the
// caller's thread-local state (the KernelGuard that keeps the tile GEMMs out of autograd and autocast).
template <typename Fn>
void parallel_tiles(int64_t tokens, int64_t rows, const Fn& fn) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, (tokens + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    fn(begin, end);
  });
}

// ---- the dtype of the tile GEMMs ----------------------------------------------------------------

// Half inputs run their tile GEMMs in the half type (fp32 accumulation inside oneDNN) where the CPU
// multiplies that type natively: AVX512-BF16 or AMX-BF16 for bf16, AVX512-FP16 or AMX-FP16 for fp16.
// Elsewhere oneDNN emulates the half type slower than an fp32 GEMM (fp16 on an AVX512 CPU without
// AVX512-FP16: ~4x slower than fp32), so those GEMMs run in fp32.  DASAM3_CPU_HALF_GEMM=1 / 0 forces
// one way (to test both paths on any CPU); everything else (low-rank terms, bias, activation, the
// k-slot combination) is fp32 either way.
bool cpu_multiplies_natively(at::ScalarType half) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* name) {
    const auto it = caps.find(name);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  return half == at::kBFloat16 ? has("avx512_bf16") || has("amx_bf16") : has("avx512_fp16") || has("amx_fp16");
}

at::ScalarType gemm_dtype(at::ScalarType input) {
  if (input != at::kHalf && input != at::kBFloat16) return input;
  const char* forced = std::getenv("DASAM3_CPU_HALF_GEMM");
  const bool half = forced != nullptr && *forced != '\0' ? std::string(forced) != "0" : cpu_multiplies_natively(input);
  return half ? input : at::kFloat;
}

// fn() with scalar_t = the GEMM (storage) dtype and acc_t = the dtype the per-token passes compute in.
#define DASAM3_DISPATCH_GEMM_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__();                                                           \
  })

// y += V B2sᵀ + p_sum ⊗ b2 for one tile, the terms in the compute dtype and added to y once.
void add_low_rank_and_bias(at::Tensor& y, const at::Tensor& V, const at::Tensor& B2s, const at::Tensor& p_sum,
                           const at::Tensor& b2) {
  if (!V.defined() && !b2.defined()) return;
  const auto compute = (V.defined() ? V : b2).scalar_type();
  const bool same = y.scalar_type() == compute;
  at::Tensor terms = same ? y : at::zeros(y.sizes(), y.options().dtype(compute));
  if (V.defined()) terms.addmm_(V, B2s.t());
  if (b2.defined()) terms.addr_(p_sum, b2);
  if (!same) y.add_(terms);
}

// ---- forward ---------------------------------------------------------------------------------------

struct ForwardTensors {
  at::Tensor x, W1, Wg, W2;      // contiguous, in the GEMM dtype; Wg undefined for a plain FFN
  at::Tensor b1, b2, p_sum, B2s;  // contiguous, in the compute dtype; b1 [pre width]: gated, b1 then b_g
  at::Tensor y, pre;          // outputs in the GEMM dtype; pre undefined when not saved
  at::Tensor V;               // output in the compute dtype; undefined when fc2 is not adapted
};

// pre [n, F or 2F] = x_tile [W1; W_g]ᵀ: the gated FFN's two products of one x tile side by side, each
// GEMM writing its half in place (BLAS takes the row stride).  The biases are added per token:
// addmm_out would first copy them to every row.
void input_products(at::Tensor& pre, const at::Tensor& x_tile, const at::Tensor& W1, const at::Tensor& Wg) {
  if (!Wg.defined()) {
    at::mm_out(pre, x_tile, W1.t());
    return;
  }
  const int64_t F = W1.size(0);
  at::Tensor fc1_half = pre.narrow(1, 0, F), gate_half = pre.narrow(1, F, F);
  at::mm_out(fc1_half, x_tile, W1.t());
  at::mm_out(gate_half, x_tile, Wg.t());
}

// The tokens t0..t0+n of a tile in the order the per-token pass takes them: grouped by their first two
// experts (as a set), so consecutive tokens read the same experts' factor rows from L2.  The per-token
// pass reads r rows of F floats per slot and adapted projection (3·E·r·F floats for all experts: 1 MiB
// at E = 4, r = 8, F = 2816, L2's size on this EPYC); one pair's rows fit.  Gated bf16 forward at that
// shape: the kernel's own per-token work 7.3 -> 6.6 ms (torch.profiler, 3 alternated runs).
template <typename scalar_t>
void tokens_by_experts(const Experts<scalar_t>& X, int64_t t0, int64_t n, std::vector<int64_t>& order) {
  const auto pair = [&](int64_t t) {
    const int64_t a = X.expert(t, 0), b = X.top_k > 1 ? X.expert(t, 1) : a;
    return std::min(a, b) * X.experts + std::max(a, b);
  };
  order.resize(n);
  std::iota(order.begin(), order.end(), t0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t s, int64_t t) { return pair(s) < pair(t); });
}

template <typename scalar_t, typename acc_t, Activation A, bool kGated>
void forward_tiles(const Experts<acc_t>& X, ForwardTensors& ts) {
  const int64_t T = ts.x.size(0), F = X.d_ff, P = kGated ? 2 * F : F, rows = tile_rows(T, F);
  parallel_tiles(T, rows, [&](int64_t begin, int64_t end) {
    const auto opts = ts.x.options();
    at::Tensor pre_scratch = ts.pre.defined() ? at::Tensor() : at::empty({rows, P}, opts);
    at::Tensor mixed = at::empty({rows, F}, opts);
    // h [F], mixed [F], pre [P] in the compute dtype
    at::Tensor rows_acc = at::empty({2 * F + P}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* h_row = rows_acc.data_ptr<acc_t>();
    const acc_t* b1 = ptr_or_null<acc_t>(ts.b1);
    std::vector<int64_t> order;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * rows, n = std::min(rows, T - t0);
      at::Tensor pre = ts.pre.defined() ? ts.pre.narrow(0, t0, n) : pre_scratch.narrow(0, 0, n);
      at::Tensor x_tile = ts.x.narrow(0, t0, n), y = ts.y.narrow(0, t0, n), m = mixed.narrow(0, 0, n);
      input_products(pre, x_tile, ts.W1, ts.Wg);
      tokens_by_experts(X, t0, n, order);
      for (const int64_t token : order) {
        const int64_t t = token - t0;
        scalar_t* m_row = row_of<scalar_t>(m, t, F);
        scalar_t* pre_row = row_of<scalar_t>(pre, t, P);
        acc_t* mixed_acc = accumulator_row(m_row, h_row + F);
        acc_t* pre_acc = accumulator_row(pre_row, h_row + 2 * F);
        compute_row(pre_row, pre_acc, P);
        if (b1) {
          add_row(b1, pre_acc, P);
          if (ts.pre.defined()) store_row(pre_acc, pre_row, P);  // the saved pre-activation includes b1
        }
        forward_token<acc_t, A, kGated>(X, token, pre_acc, mixed_acc,
                                        row_of<acc_t>(ts.V, token, X.experts * X.rank), h_row);
        store_row(mixed_acc, m_row, F);
      }
      at::mm_out(y, m, ts.W2.t());
      add_low_rank_and_bias(y, X.A2 ? ts.V.narrow(0, t0, n) : at::Tensor(), ts.B2s,
                            ts.b2.defined() ? ts.p_sum.narrow(0, t0, n) : at::Tensor(), ts.b2);
    }
  });
}

at::Tensor optional_as(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? contiguous_as(*t, dtype) : at::Tensor();
}

// b1 [P] for the per-token pass: fc1's bias, gated followed by the gate's (zeros for a missing one);
// undefined when there is no bias to add.
at::Tensor pre_bias(const MoeSizes& s, const c10::optional<at::Tensor>& fc1_bias,
                    const c10::optional<at::Tensor>& gate_bias, const at::TensorOptions& compute) {
  if (!s.gated || !(fc1_bias.has_value() || gate_bias.has_value())) {
    return optional_as(fc1_bias, c10::typeMetaToScalarType(compute.dtype()));
  }
  const auto half = [&](const c10::optional<at::Tensor>& b) {
    return b.has_value() ? b->to(compute.dtype()) : at::zeros({s.d_ff}, compute);
  };
  return at::cat({half(fc1_bias), half(gate_bias)}).contiguous();
}

template <typename scalar_t>
Experts<scalar_t> experts_view(const MoeSizes& s, const at::Tensor& indices, const at::Tensor& p,
                               const at::Tensor& U, const Factors& f) {
  scalar_t* const u = s.u_width() > 0 ? U.data_ptr<scalar_t>() : nullptr;
  return Experts<scalar_t>{s.d_ff,
                           s.top_k,
                           s.experts,
                           s.rank,
                           indices.data_ptr<int64_t>(),
                           p.data_ptr<scalar_t>(),
                           s.adapt_fc1 ? u : nullptr,
                           s.adapt_gate ? u + (s.adapt_fc1 ? s.experts * s.rank : 0) : nullptr,
                           s.u_width(),
                           ptr_or_null<scalar_t>(f.B1t),
                           ptr_or_null<scalar_t>(f.Bgt),
                           ptr_or_null<scalar_t>(f.A2)};
}

// fn(std::integral_constant<bool, gated>{}): a kernel template instantiated for plain and gated FFNs.
template <typename Fn>
void with_gating(bool gated, Fn&& fn) {
  if (gated) fn(std::true_type{});
  else fn(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_moe_fwd_cpu(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& fc1_weight,
    const c10::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
    const c10::optional<at::Tensor>& fc1_A, const c10::optional<at::Tensor>& fc1_B,
    const c10::optional<at::Tensor>& fc2_A, const c10::optional<at::Tensor>& fc2_B, double scale,
    c10::string_view activation, bool save_for_backward, const c10::optional<at::Tensor>& gate_weight,
    const c10::optional<at::Tensor>& gate_bias, const c10::optional<at::Tensor>& gate_A,
    const c10::optional<at::Tensor>& gate_B) {
  const KernelGuard guard;
  const MoeSizes s = check_inputs(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B,
                                  fc2_A, fc2_B, gate_weight, gate_bias, gate_A, gate_B);
  const Activation act = parse_activation(activation);
  const auto gemm = gemm_dtype(x.scalar_type()), dtype = compute_dtype(x.scalar_type());
  const int64_t Er = s.experts * s.rank;
  ForwardTensors ts;
  ts.x = contiguous_as(x, gemm);
  ts.W1 = contiguous_as(fc1_weight, gemm);
  ts.Wg = optional_as(gate_weight, gemm);
  ts.b1 = pre_bias(s, fc1_bias, gate_bias, x.options().dtype(dtype));
  ts.W2 = contiguous_as(fc2_weight, gemm);
  ts.b2 = optional_as(fc2_bias, dtype);
  const at::Tensor p = contiguous_as(weights, dtype), idx = contiguous_as(indices, at::kLong);
  if (ts.b2.defined()) ts.p_sum = p.sum(1);
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, dtype, gate_A, gate_B);
  ts.B2s = f.B2s;
  const at::Tensor U = s.u_width() > 0 ? at::mm(contiguous_as(x, dtype), f.A1s.t()) : at::Tensor();
  ts.V = s.adapt_fc2 ? at::zeros({s.tokens, Er}, p.options()) : at::Tensor();
  ts.y = at::empty({s.tokens, s.d_model}, ts.x.options());
  if (save_for_backward) ts.pre = at::empty({s.tokens, s.pre_width()}, ts.x.options());

  DASAM3_DISPATCH_GEMM_TYPES(gemm, "lowrank_moe_fwd_cpu", [&] {
    const auto X = experts_view<acc_t>(s, idx, p, U, f);
    with_activation(act, [&](auto a) {
      with_gating(s.gated, [&](auto gated) { forward_tiles<scalar_t, acc_t, decltype(a)::value, gated>(X, ts); });
    });
  });

  const at::Tensor y = ts.y.to(x.scalar_type());
  if (!save_for_backward) return {y, at::empty({0}, x.options()), or_empty({}, p.options()), or_empty({}, p.options())};
  return {y, ts.pre.to(x.scalar_type()), or_empty(U, p.options()), or_empty(ts.V, p.options())};
}

// ---- backward --------------------------------------------------------------------------------------

struct BackwardTensors {
  at::Tensor g, W1, Wg, W2, pre;              // contiguous, in the GEMM dtype; Wg undefined for a plain FFN
  at::Tensor A1s, g2, g_dot_b2;               // contiguous, in the compute dtype
  at::Tensor grad_x, grad_pre, mixed;         // outputs in the GEMM dtype; undefined if unwanted
  at::Tensor grad_p, grad_U;                  // outputs in the compute dtype
  at::Tensor grad_B1t, grad_Bgt, grad_A2;     // [threads, E, r, F] per-thread accumulators, compute dtype
};

// gx = grad_pre [W1; W_g]: the gradient of x through the frozen products (gated: both halves of grad_pre).
void input_products_grad(at::Tensor& gx, const at::Tensor& grad_pre, const at::Tensor& W1, const at::Tensor& Wg) {
  if (!Wg.defined()) {
    at::mm_out(gx, grad_pre, W1);
    return;
  }
  const int64_t F = W1.size(0);
  at::mm_out(gx, grad_pre.narrow(1, 0, F), W1);
  gx.addmm_(grad_pre.narrow(1, F, F), Wg);
}

template <typename scalar_t, typename acc_t, Activation A, bool kGated>
void backward_tiles(const Experts<acc_t>& X, BackwardTensors& ts) {
  const int64_t T = ts.g.size(0), F = X.d_ff, P = kGated ? 2 * F : F, Er = X.experts * X.rank;
  const int64_t Uw = X.u_stride, rows = tile_rows(T, F);
  parallel_tiles(T, rows, [&](int64_t begin, int64_t end) {
    const auto opts = ts.g.options();
    const int64_t thread = at::get_thread_num();  // owns slice `thread` of the [threads, E, r, F] accumulators
    at::Tensor grad_mixed = at::empty({rows, F}, opts);
    // h, gz, gg and the compute-dtype copies of grad_mixed, mixed [F each], pre and grad_pre [P each]
    at::Tensor scratch = at::empty({5 * F + 2 * P}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    at::Tensor grad_pre_scratch = ts.grad_pre.defined() ? at::Tensor() : at::empty({rows, P}, opts);
    acc_t* const row = scratch.data_ptr<acc_t>();
    acc_t* const pre_scratch = row + 5 * F;
    acc_t* const grad_pre_scratch_row = pre_scratch + P;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * rows, n = std::min(rows, T - t0);
      at::Tensor gm = grad_mixed.narrow(0, 0, n), g = ts.g.narrow(0, t0, n);
      at::Tensor grad_pre = ts.grad_pre.defined() ? ts.grad_pre.narrow(0, t0, n) : grad_pre_scratch.narrow(0, 0, n);
      at::mm_out(gm, g, ts.W2);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t token = t0 + t;
        scalar_t* grad_pre_row = row_of<scalar_t>(grad_pre, t, P);
        scalar_t* mixed_row = row_of<scalar_t>(ts.mixed, token, F);
        acc_t* grad_pre_acc = accumulator_row(grad_pre_row, grad_pre_scratch_row);
        acc_t* mixed_acc = mixed_row ? accumulator_row(mixed_row, row + 4 * F) : nullptr;
        acc_t* grad_u_row = row_of<acc_t>(ts.grad_U, token, Uw);
        TokenGrads<acc_t> G{compute_row(row_of<scalar_t>(ts.pre, token, P), pre_scratch, P),
                            compute_row(row_of<scalar_t>(gm, t, F), row + 3 * F, F),
                            row_of<acc_t>(ts.g2, token, Er),
                            ts.g_dot_b2.defined() ? ts.g_dot_b2.data_ptr<acc_t>()[token] : acc_t(0),
                            grad_pre_acc,
                            row_of<acc_t>(ts.grad_p, token, X.top_k),
                            X.U ? grad_u_row : nullptr,
                            row_of<acc_t>(ts.grad_B1t, thread, Er * F),
                            row_of<acc_t>(ts.grad_A2, thread, Er * F),
                            mixed_acc,
                            row,
                            row + F,
                            X.Ug ? grad_u_row + (X.U ? Er : 0) : nullptr,
                            row_of<acc_t>(ts.grad_Bgt, thread, Er * F),
                            row + 2 * F};
        backward_token<acc_t, A, kGated>(X, token, G);
        store_row(grad_pre_acc, grad_pre_row, P);
        if (mixed_row) store_row(mixed_acc, mixed_row, F);
      }
      if (ts.grad_x.defined()) {
        at::Tensor gx = ts.grad_x.narrow(0, t0, n);
        input_products_grad(gx, grad_pre, ts.W1, ts.Wg);
        if (Uw > 0) {
          const at::Tensor grad_U = ts.grad_U.narrow(0, t0, n);
          if (gx.scalar_type() == grad_U.scalar_type()) gx.addmm_(grad_U, ts.A1s);
          else gx.add_(at::mm(grad_U, ts.A1s));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
lowrank_moe_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& indices,
                    const at::Tensor& weights, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                    const c10::optional<at::Tensor>& fc2_bias, const c10::optional<at::Tensor>& fc1_A,
                    const c10::optional<at::Tensor>& fc1_B, const c10::optional<at::Tensor>& fc2_A,
                    const c10::optional<at::Tensor>& fc2_B, const at::Tensor& pre, const at::Tensor& U,
                    const at::Tensor& V, double scale, c10::string_view activation, bool need_grad_x,
                    bool need_fc_grads, const c10::optional<at::Tensor>& gate_weight,
                    const c10::optional<at::Tensor>& gate_A, const c10::optional<at::Tensor>& gate_B) {
  const KernelGuard guard;
  const MoeSizes s = check_backward_inputs(grad_y, x, indices, weights, fc1_weight, fc2_weight, fc2_bias, fc1_A,
                                           fc1_B, fc2_A, fc2_B, pre, U, V, gate_weight, gate_A, gate_B);
  const Activation act = parse_activation(activation);
  const auto gemm = gemm_dtype(x.scalar_type()), dtype = compute_dtype(x.scalar_type());

  BackwardTensors ts;
  ts.g = contiguous_as(grad_y, gemm);
  ts.W1 = contiguous_as(fc1_weight, gemm);
  ts.Wg = optional_as(gate_weight, gemm);
  ts.W2 = contiguous_as(fc2_weight, gemm);
  ts.pre = contiguous_as(pre, gemm);
  const at::Tensor g = contiguous_as(grad_y, dtype);  // the low-rank and bias terms' gradients, in fp32
  const at::Tensor p = contiguous_as(weights, dtype), idx = contiguous_as(indices, at::kLong);
  const at::Tensor Uc = s.u_width() > 0 ? contiguous_as(U, dtype) : at::Tensor();
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, dtype, gate_A, gate_B);
  ts.A1s = f.A1s;
  if (s.adapt_fc2) ts.g2 = at::mm(g, f.B2s);
  if (fc2_bias.has_value()) ts.g_dot_b2 = at::mv(g, contiguous_as(*fc2_bias, dtype));
  const auto opts = g.options(), gemm_opts = ts.g.options();
  ts.grad_p = at::empty({s.tokens, s.top_k}, opts);
  const int64_t threads = at::get_num_threads();
  const auto accumulator = [&](bool adapted) {
    return adapted ? at::zeros({threads, s.experts, s.rank, s.d_ff}, opts) : at::Tensor();
  };
  if (s.u_width() > 0) ts.grad_U = at::zeros({s.tokens, s.u_width()}, opts);
  ts.grad_B1t = accumulator(s.adapt_fc1);
  ts.grad_Bgt = accumulator(s.adapt_gate);
  ts.grad_A2 = accumulator(s.adapt_fc2);
  if (need_grad_x) ts.grad_x = at::empty({s.tokens, s.d_model}, gemm_opts);
  if (need_fc_grads) {
    ts.grad_pre = at::empty({s.tokens, s.pre_width()}, gemm_opts);
    ts.mixed = at::empty({s.tokens, s.d_ff}, gemm_opts);
  }

  DASAM3_DISPATCH_GEMM_TYPES(gemm, "lowrank_moe_bwd_cpu", [&] {
    const auto X = experts_view<acc_t>(s, idx, p, Uc, f);
    with_activation(act, [&](auto a) {
      with_gating(s.gated, [&](auto gated) { backward_tiles<scalar_t, acc_t, decltype(a)::value, gated>(X, ts); });
    });
  });

  const auto sum_threads = [](const at::Tensor& t) { return t.defined() ? t.sum(0) : t; };
  const auto lora = factor_grads(s, scale, x, g, V, ts.grad_U, sum_threads(ts.grad_B1t), sum_threads(ts.grad_A2),
                                 fc1_A, fc1_B, fc2_A, fc2_B, sum_threads(ts.grad_Bgt), gate_A, gate_B);
  const auto in_x_dtype = [&](const at::Tensor& t) {
    return or_empty(t.defined() ? t.to(x.scalar_type()) : t, x.options());
  };
  return {in_x_dtype(ts.grad_x), ts.grad_p.to(weights.scalar_type()), lora[0], lora[1], lora[2], lora[3],
          in_x_dtype(ts.grad_pre), in_x_dtype(ts.mixed), lora[4], lora[5]};
}

}  // namespace

// The schemas are defined in Python (cpp_ops.py), once for this library and the CUDA one.
TORCH_LIBRARY_IMPL(dasam3, CPU, m) {
  m.impl("lowrank_moe_fwd", &lowrank_moe_fwd_cpu);
  m.impl("lowrank_moe_bwd", &lowrank_moe_bwd_cpu);
}

}  // namespace dasam3
