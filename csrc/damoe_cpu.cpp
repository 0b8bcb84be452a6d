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

// The per-token passes take up to kGroup = 4 (token, k-slot) pairs routed to the same expert at once
// ("slots"): each of that expert's factor vectors (and each row of the per-thread gradient accumulators)
// is then read once, from L2, for all of them.  The helpers below take kN <= 4 rows that share the factor
// rows.  One thread, AVX512-BF16 EPYC: groups of 2 took the gated bf16 LLaMA-shape forward from 50.5 to
// 48.7 ms, groups of 4 then gained ~0.7 ms there and ~1 ms on the SAM3-shape bf16 training step.

// out[a][i] += coeff[a] · Σ_f x[a][f] rows[i][f] for i < kRows, a < kN: kRows·kN dot products sharing
// the loads of the rows and of the x[a].
template <int kRows, int kN, typename scalar_t>
void add_dots_of(const scalar_t* const* x, const scalar_t* rows, int64_t n, const scalar_t* coeff,
                 scalar_t* const* out) {
  using V = Vectorized<scalar_t>;
  V acc[kN][kRows];
  for (auto& of_x : acc) std::fill(of_x, of_x + kRows, V(0));
  for_each_vector<scalar_t>(n, [&](int64_t f, auto m) {
    V xv[kN];
    for (int a = 0; a < kN; ++a) xv[a] = V::loadu(x[a] + f, m);
    for (int i = 0; i < kRows; ++i) {
      const V row = V::loadu(rows + i * n + f, m);
      for (int a = 0; a < kN; ++a) acc[a][i] = at::vec::fmadd(xv[a], row, acc[a][i]);
    }
  });
  for (int a = 0; a < kN; ++a) {
    for (int i = 0; i < kRows; ++i) out[a][i] += coeff[a] * reduce_sum(acc[a][i]);
  }
}

// out[a][i] += coeff[a] · Σ_f x[a][f] rows[i][f] for the r rows of an expert, 8 / kN rows per pass over
// the x[a] (about 8 accumulators: with the loads they fit AVX2's 16 registers).
template <int kN, typename scalar_t>
void add_dots(const scalar_t* const* x, const scalar_t* rows, int64_t r, int64_t n, const scalar_t* coeff,
              scalar_t* const* out) {
  scalar_t* out_at[kN];
  const auto pass = [&](auto rows_per_pass, int64_t i) {
    for (int a = 0; a < kN; ++a) out_at[a] = out[a] + i;
    add_dots_of<decltype(rows_per_pass)::value, kN>(x, rows + i * n, n, coeff, out_at);
  };
  int64_t i = 0;
  for (; i + 8 / kN <= r; i += 8 / kN) pass(std::integral_constant<int, 8 / kN>{}, i);
  for (; i + 4 / kN <= r; i += 4 / kN) pass(std::integral_constant<int, 4 / kN>{}, i);
  for (; i < r; ++i) pass(std::integral_constant<int, 1>{}, i);
}

// rows[i][f] += Σ_a coeffs[a][i] · x[a][f] for i < r: kN rank-r outer-product updates, each row read
// and written once for all of them.
template <int kN, typename scalar_t>
void add_outer(const scalar_t* const* coeffs, const scalar_t* const* x, int64_t r, int64_t n, scalar_t* rows) {
  using V = Vectorized<scalar_t>;
  for (int64_t i = 0; i < r; ++i) {
    V c[kN];
    for (int a = 0; a < kN; ++a) c[a] = V(coeffs[a][i]);
    scalar_t* row = rows + i * n;
    for_each_vector<scalar_t>(n, [&](int64_t f, auto m) {
      V acc = V::loadu(row + f, m);
      for (int a = 0; a < kN; ++a) acc = at::vec::fmadd(c[a], V::loadu(x[a] + f, m), acc);
      acc.store(row + f, m);
    });
  }
}

// out[a] = base[a][f..f+m) + Σ_i coeffs[a][i] · rows[i][f..f+m) for a < kN: the low-rank corrections of
// one vector of kN rows by the same factor rows.  4 / kN partial sums per row: one chain of r dependent
// FMAs would make the per-token loops wait on FMA latency.  coeffs may be null when r = 0.
template <int kN, typename scalar_t>
C10_ALWAYS_INLINE void low_rank_add(const scalar_t* const* base, const scalar_t* const* coeffs, const scalar_t* rows,
                                    int64_t r, int64_t n, int64_t f, int64_t m, Vectorized<scalar_t>* out) {
  using V = Vectorized<scalar_t>;
  constexpr int kChains = 4 / kN;
  V acc[kN][kChains];
  for (int a = 0; a < kN; ++a) {
    acc[a][0] = V::loadu(base[a] + f, m);
    for (int c = 1; c < kChains; ++c) acc[a][c] = V(0);
  }
  const auto add_factor_row = [&](int64_t i, int c) {
    const V row = V::loadu(rows + i * n + f, m);
    for (int a = 0; a < kN; ++a) acc[a][c] = at::vec::fmadd(V(coeffs[a][i]), row, acc[a][c]);
  };
  int64_t i = 0;
  for (; i + kChains <= r; i += kChains) {
    for (int c = 0; c < kChains; ++c) add_factor_row(i + c, c);
  }
  for (; i < r; ++i) add_factor_row(i, 0);
  for (int a = 0; a < kN; ++a) {
    if constexpr (kChains == 4) out[a] = (acc[a][0] + acc[a][1]) + (acc[a][2] + acc[a][3]);
    else if constexpr (kChains == 2) out[a] = acc[a][0] + acc[a][1];
    else out[a] = acc[a][0];
  }
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

// Copies a token's pre-activation, b1 included, to its saved row `saved`: from its storage row `row` when
// that holds it already (no b1, or b1 added in place because the types agree), else from the compute-type
// row `with_b1`, rounded once.
template <typename acc_t, typename scalar_t>
void save_pre_row(const scalar_t* row, const acc_t* with_b1, bool has_b1, scalar_t* saved, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) {
    if (has_b1) {
      store_row(with_b1, saved, n);
      return;
    }
  }
  std::copy(row, row + n, saved);
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
  // Ranks of the projections' low-rank terms (0: not adapted) and their per-expert rows (null then).
  int64_t fc1_rank() const { return U ? rank : 0; }
  int64_t gate_rank() const { return Ug ? rank : 0; }
  int64_t fc2_rank() const { return A2 ? rank : 0; }
  const scalar_t* u(int64_t t, int64_t e) const { return U ? U + t * u_stride + e * rank : nullptr; }
  const scalar_t* ug(int64_t t, int64_t e) const { return Ug ? Ug + t * u_stride + e * rank : nullptr; }
  const scalar_t* B1t_of(int64_t e) const { return U ? B1t + e * rank * d_ff : nullptr; }
  const scalar_t* Bgt_of(int64_t e) const { return Ug ? Bgt + e * rank * d_ff : nullptr; }
  const scalar_t* A2_of(int64_t e) const { return A2 ? A2 + e * rank * d_ff : nullptr; }
};

// Tokens the per-token passes take together: kGroup consecutive ones in tokens_by_experts' order.
constexpr int kGroup = 4;

// A slot of the per-token passes as the grouping below hands it over: which of the group's tokens, its
// k-slot j, and whether that token's output rows already hold an earlier slot's terms.
struct SlotRef {
  int which;
  int64_t j;
  bool accumulate;
};

// slots(e, SlotRef...) on the k-slots of `count` <= kGroup tokens, 1 to count slots routed to the same
// expert e per call: each slot not yet done together with, from each later token, a slot not yet done
// that is routed to the same expert, where it has one.  A token's first slot comes with accumulate =
// false.  (Above 64 slots per token, each slot alone.)
template <typename scalar_t, typename Fn>
void for_each_expert_group(const Experts<scalar_t>& X, const int64_t* tokens, int count, const Fn& slots) {
  static_assert(kGroup == 4, "the dispatch below passes up to 4 slots");
  const int64_t k = X.top_k;
  const bool grouped = k <= 64;
  bool started[kGroup] = {};
  uint64_t done[kGroup] = {};  // bit j: the token's slot j is done
  for (int a = 0; a < count; ++a) {
    for (int64_t ja = 0; ja < k; ++ja) {
      if (grouped && (done[a] >> ja & 1)) continue;
      const int64_t e = X.expert(tokens[a], ja);
      SlotRef group[kGroup];
      int size = 0;
      const auto take = [&](int which, int64_t j) {
        group[size++] = SlotRef{which, j, started[which]};
        started[which] = true;
        if (grouped) done[which] |= uint64_t(1) << j;
      };
      take(a, ja);
      for (int b = a + 1; grouped && b < count; ++b) {
        int64_t jb = 0;
        while (jb < k && ((done[b] >> jb & 1) || X.expert(tokens[b], jb) != e)) ++jb;
        if (jb < k) take(b, jb);
      }
      switch (size) {
        case 1: slots(e, group[0]); break;
        case 2: slots(e, group[0], group[1]); break;
        case 3: slots(e, group[0], group[1], group[2]); break;
        default: slots(e, group[0], group[1], group[2], group[3]);
      }
    }
  }
}

// ---- the per-token passes --------------------------------------------------------------------------

// One slot of the forward pass: its token's rows and its routing weight p.
template <typename scalar_t>
struct ForwardSlot {
  int64_t t;
  scalar_t p;
  const scalar_t* pre;  // [P]: the pre-activation, b1 included (gated: fc1's, then the gate's)
  scalar_t* mixed;      // [F]: Σ_j p_j h_j (=, or += when accumulate)
  scalar_t* v_row;      // [E·r]: p_j A2[e_j] h_j accumulated
  scalar_t* h_row;      // [F] scratch
  bool accumulate;
};

// The forward of kN slots routed to expert e: h = act(z) (gated: act(g) ⊙ z) with z = pre + U[e] (s B1ᵀ)[e]
// (and g from the gate's half alike), mixed += p h, v_row[e·r..] += p A2[e] h.
template <typename scalar_t, Activation A, bool kGated, int kN>
void forward_slots(const Experts<scalar_t>& X, int64_t e, const ForwardSlot<scalar_t> (&s)[kN]) {
  using V = Vectorized<scalar_t>;
  const int64_t F = X.d_ff, r = X.rank;
  const scalar_t *pre[kN], *pre_gate[kN], *u[kN], *ug[kN], *h_rows[kN];
  scalar_t p[kN], *v_rows[kN];
  for (int a = 0; a < kN; ++a) {
    pre[a] = s[a].pre;
    pre_gate[a] = s[a].pre + F;
    u[a] = X.u(s[a].t, e);
    ug[a] = X.ug(s[a].t, e);
    h_rows[a] = s[a].h_row;
    p[a] = s[a].p;
    v_rows[a] = s[a].v_row + e * r;
  }
  for_each_vector<scalar_t>(F, [&](int64_t f, auto m) {
    V z[kN], g[kN];
    low_rank_add<kN>(pre, u, X.B1t_of(e), X.fc1_rank(), F, f, m, z);
    if constexpr (kGated) low_rank_add<kN>(pre_gate, ug, X.Bgt_of(e), X.gate_rank(), F, f, m, g);
    for (int a = 0; a < kN; ++a) {
      V h;
      if constexpr (kGated) h = Act<A>::value(g[a]) * z[a];
      else h = Act<A>::value(z[a]);
      store_or_add(V(p[a]) * h, s[a].mixed, f, m, s[a].accumulate);
      if (X.A2) h.store(s[a].h_row + f, m);
    }
  });
  if (X.A2) add_dots<kN>(h_rows, X.A2_of(e), r, F, p, v_rows);
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

// One slot of the backward pass: its token's rows, k-slot j and routing weight p.
template <typename scalar_t>
struct BackwardSlot {
  const TokenGrads<scalar_t>* G;
  int64_t t, j;
  scalar_t p;
  bool accumulate;  // the token's grad_pre and mixed rows hold an earlier slot's terms
};

// The gradients of one input projection's low-rank term (factor rows `rows` = (s Bᵀ)[e], rank r) from the
// slots' dL/dz rows gz: dL/dU[e] += gz (s Bᵀ)ᵀ and the gradient of s·Bᵀ (without s) += U[e] ⊗ gz.
template <int kN, typename scalar_t>
void input_term_grads(const scalar_t* rows, int64_t r, const scalar_t* const* u, const scalar_t* const* gz,
                      int64_t F, scalar_t* const* grad_u, scalar_t* grad_Bt) {
  if (r == 0) return;
  scalar_t ones[kN];
  std::fill(ones, ones + kN, scalar_t(1));  // s is in the rows
  add_dots<kN>(gz, rows, r, F, ones, grad_u);
  add_outer<kN>(u, gz, r, F, grad_Bt);
}

// The backward of kN slots routed to expert e: with q = W2ᵀg + A2[e]ᵀ g2_e (the gradient of h per unit
// p), dL/dp = <h, q> + <g, b2> and dL/dz = p q act'(z); gated (h = act(g) ⊙ z), dL/dz = p q act(g) and
// dL/dg = p q z act'(g).  The factor gradients go to the thread's accumulators, shared by the slots.
template <typename scalar_t, Activation A, bool kGated, int kN>
void backward_slots(const Experts<scalar_t>& X, int64_t e, const BackwardSlot<scalar_t> (&s)[kN]) {
  using V = Vectorized<scalar_t>;
  const int64_t F = X.d_ff, r = X.rank, r1 = X.fc1_rank(), rg = X.gate_rank(), r2 = X.fc2_rank();
  const scalar_t *pre[kN], *pre_gate[kN], *u[kN], *ug[kN], *grad_mixed[kN], *g2[kN];
  const scalar_t *gz_rows[kN], *gg_rows[kN], *h_rows[kN];
  scalar_t *grad_u[kN], *grad_ug[kN];
  for (int a = 0; a < kN; ++a) {
    const TokenGrads<scalar_t>& G = *s[a].G;
    pre[a] = G.pre;
    pre_gate[a] = G.pre + F;
    u[a] = X.u(s[a].t, e);
    ug[a] = X.ug(s[a].t, e);
    grad_mixed[a] = G.grad_mixed;
    g2[a] = r2 ? G.g2 + e * r : nullptr;
    gz_rows[a] = G.gz_row;
    gg_rows[a] = G.gg_row;
    h_rows[a] = G.h_row;
    grad_u[a] = r1 ? G.grad_u + e * r : nullptr;
    grad_ug[a] = rg ? G.grad_ug + e * r : nullptr;
  }
  V grad_p[kN];
  std::fill(grad_p, grad_p + kN, V(0));
  for_each_vector<scalar_t>(F, [&](int64_t f, auto m) {
    V z[kN], q[kN], g[kN];
    low_rank_add<kN>(pre, u, X.B1t_of(e), r1, F, f, m, z);
    low_rank_add<kN>(grad_mixed, g2, X.A2_of(e), r2, F, f, m, q);
    if constexpr (kGated) low_rank_add<kN>(pre_gate, ug, X.Bgt_of(e), rg, F, f, m, g);
    for (int a = 0; a < kN; ++a) {
      const TokenGrads<scalar_t>& G = *s[a].G;
      const V grad_h = V(s[a].p) * q[a];
      V h, gz;
      if constexpr (kGated) {
        V act, d;
        Act<A>::value_and_grad(g[a], act, d);
        h = act * z[a];
        gz = grad_h * act;
        const V gg = grad_h * z[a] * d;
        store_or_add(gg, G.grad_pre + F, f, m, s[a].accumulate);
        if (rg) gg.store(G.gg_row + f, m);
      } else {
        V d;
        Act<A>::value_and_grad(z[a], h, d);
        gz = grad_h * d;
      }
      grad_p[a] = at::vec::fmadd(h, q[a], grad_p[a]);
      store_or_add(gz, G.grad_pre, f, m, s[a].accumulate);
      if (r1) gz.store(G.gz_row + f, m);
      if (r2) h.store(G.h_row + f, m);
      if (G.mixed) store_or_add(V(s[a].p) * h, G.mixed, f, m, s[a].accumulate);
    }
  });
  for (int a = 0; a < kN; ++a) s[a].G->grad_p[s[a].j] = reduce_sum(grad_p[a]) + s[a].G->g_dot_b2;
  const TokenGrads<scalar_t>& shared = *s[0].G;
  input_term_grads<kN>(X.B1t_of(e), r1, u, gz_rows, F, grad_u, r1 ? shared.grad_B1t + e * r * F : nullptr);
  if constexpr (kGated) {
    input_term_grads<kN>(X.Bgt_of(e), rg, ug, gg_rows, F, grad_ug, rg ? shared.grad_Bgt + e * r * F : nullptr);
  }
  for (int64_t i0 = 0; i0 < r2; i0 += 64) {  // dA2[e] += Σ_a p_a g2_a ⊗ h_a, in chunks of 64 ranks
    const int64_t count = std::min<int64_t>(64, r2 - i0);
    scalar_t coeffs[kN][64];
    const scalar_t* coeff_rows[kN];
    for (int a = 0; a < kN; ++a) {
      for (int64_t i = 0; i < count; ++i) coeffs[a][i] = s[a].p * g2[a][i0 + i];
      coeff_rows[a] = coeffs[a];
    }
    add_outer<kN>(coeff_rows, h_rows, count, F, shared.grad_A2 + (e * r + i0) * F);
  }
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

// The dtype of the small products with the lora factors (x A1ᵀ, V B2sᵀ, g B2s, the factor gradients):
// bf16 where the tile GEMMs run in bf16 (the factors and the fp32 U, V, dL/dU rounded to bf16 once, fp32
// accumulation inside oneDNN; at one thread, SAM3 shape, an fp32 one with its input's conversion took
// ~1.4 ms, the bf16 one ~0.2 ms), else the compute dtype: fp16's range could overflow in the sums over tokens.
at::ScalarType factor_gemm_dtype(at::ScalarType gemm) {
  return gemm == at::kBFloat16 ? gemm : compute_dtype(gemm);
}

// The dtype of U = x A1ᵀ: factor_gemm_dtype (bf16: rounded once, as x W1ᵀ is), except for relu, whose
// derivative jumps at z = 0: there U stays exact in the compute dtype, so that only the frozen product's
// rounding moves z (a bf16 U flipped one kink in the bf16 relu test: dx off by 16 % of its scale).
at::ScalarType u_gemm_dtype(at::ScalarType gemm, Activation act) {
  return act == Activation::kRelu ? compute_dtype(gemm) : factor_gemm_dtype(gemm);
}

// a b with both in `dtype`, returned in `out`.
at::Tensor mm_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype, at::ScalarType out) {
  return at::mm(a.to(dtype), b.to(dtype)).to(out);
}

// fn() with scalar_t = the GEMM (storage) dtype and acc_t = the dtype the per-token passes compute in.
#define DASAM3_DISPATCH_GEMM_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__();                                                           \
  })

// y += [V | p_sum] [B2s | b2]ᵀ for one tile: the fc2 low-rank term V B2sᵀ and the bias term p_sum ⊗ b2 in
// one product (either part may be absent; fc2_right undefined: neither), in fc2_right's dtype
// (factor_gemm_dtype), added in place when that is y's dtype.  (A separate bf16 addr_ for the bias took
// ~0.7 ms per SAM3-shape forward.)
void add_fc2_terms(at::Tensor& y, const at::Tensor& V, const at::Tensor& p_sum, const at::Tensor& fc2_right) {
  if (!fc2_right.defined()) return;
  std::vector<at::Tensor> left;
  if (V.defined()) left.push_back(V);
  if (p_sum.defined()) left.push_back(p_sum.unsqueeze(1));
  const at::Tensor l = (left.size() == 1 ? left[0] : at::cat(left, 1)).to(fc2_right.scalar_type());
  if (y.scalar_type() == l.scalar_type()) y.addmm_(l, fc2_right.t());
  else y.add_(at::mm(l, fc2_right.t()));
}

// ---- forward ---------------------------------------------------------------------------------------

struct ForwardTensors {
  at::Tensor x, W1, Wg, W2;      // contiguous, in the GEMM dtype; Wg undefined for a plain FFN
  at::Tensor b1;                  // [pre width] (gated: b1 then b_g), contiguous, in the compute dtype
  at::Tensor p_sum;               // [T] Σ_j p_j in the compute dtype; undefined without b2
  at::Tensor fc2_right;           // [D, E·r (+1)] = [B2s | b2] in factor_gemm_dtype; undefined: neither
  at::Tensor y, pre;          // outputs in the GEMM dtype; pre undefined when not saved
  at::Tensor V;               // output in the compute dtype; undefined when fc2 is not adapted
};

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
    // The tile GEMM writes a scratch tile that stays in cache, and the per-token pass copies each row, b1
    // added, to the saved pre-activation: a GEMM writing straight into the [T, P] output, memory not in
    // cache, ran ~35% slower (SAM3 shape, bf16, one thread: 0.74 vs 0.55 ms per tile).
    at::Tensor pre_scratch = at::empty({rows, P}, opts);
    at::Tensor mixed = at::empty({rows, F}, opts);
    // per token of a group: h [F], mixed [F], pre [P] in the compute dtype
    const int64_t per_token = 2 * F + P;
    at::Tensor rows_acc = at::empty({kGroup * per_token}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    const acc_t* b1 = ptr_or_null<acc_t>(ts.b1);
    std::vector<int64_t> order;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * rows, n = std::min(rows, T - t0);
      at::Tensor pre = pre_scratch.narrow(0, 0, n);
      at::Tensor x_tile = ts.x.narrow(0, t0, n), y = ts.y.narrow(0, t0, n), m = mixed.narrow(0, 0, n);
      input_products(pre, x_tile, ts.W1, ts.Wg);
      tokens_by_experts(X, t0, n, order);
      for (int64_t i = 0; i < n; i += kGroup) {
        const int64_t* group = order.data() + i;
        const int count = static_cast<int>(std::min<int64_t>(kGroup, n - i));
        scalar_t* m_rows[kGroup];
        acc_t *h_rows[kGroup], *mixed_acc[kGroup], *pre_acc[kGroup];
        for (int a = 0; a < count; ++a) {
          m_rows[a] = row_of<scalar_t>(m, group[a] - t0, F);
          scalar_t* pre_row = row_of<scalar_t>(pre, group[a] - t0, P);
          h_rows[a] = rows_acc.data_ptr<acc_t>() + a * per_token;
          mixed_acc[a] = accumulator_row(m_rows[a], h_rows[a] + F);
          pre_acc[a] = accumulator_row(pre_row, h_rows[a] + 2 * F);
          compute_row(pre_row, pre_acc[a], P);
          if (b1) add_row(b1, pre_acc[a], P);
          if (ts.pre.defined()) {
            save_pre_row(pre_row, pre_acc[a], b1 != nullptr, row_of<scalar_t>(ts.pre, group[a], P), P);
          }
        }
        const auto slot = [&](const SlotRef& ref) {
          const int64_t t = group[ref.which];
          return ForwardSlot<acc_t>{t, X.weight(t, ref.j), pre_acc[ref.which], mixed_acc[ref.which],
                                    row_of<acc_t>(ts.V, t, X.experts * X.rank), h_rows[ref.which], ref.accumulate};
        };
        for_each_expert_group(X, group, count, [&](int64_t e, const auto&... refs) {
          const ForwardSlot<acc_t> slots[] = {slot(refs)...};
          forward_slots<acc_t, A, kGated, sizeof...(refs)>(X, e, slots);
        });
        for (int a = 0; a < count; ++a) store_row(mixed_acc[a], m_rows[a], F);
      }
      at::mm_out(y, m, ts.W2.t());
      add_fc2_terms(y, X.A2 ? ts.V.narrow(0, t0, n) : at::Tensor(),
                    ts.p_sum.defined() ? ts.p_sum.narrow(0, t0, n) : at::Tensor(), ts.fc2_right);
    }
  });
}

template <typename scalar_t>
Experts<scalar_t> experts_view(const MoeSizes& s, const at::Tensor& indices, const at::Tensor& p,
                               const at::Tensor& U, const Factors& f) {
  const auto [u1, ug] = input_columns<scalar_t>(s, U);
  return Experts<scalar_t>{s.d_ff,
                           s.top_k,
                           s.experts,
                           s.rank,
                           indices.data_ptr<int64_t>(),
                           p.data_ptr<scalar_t>(),
                           u1,
                           ug,
                           s.u_width(),
                           ptr_or_null<scalar_t>(f.B1t),
                           ptr_or_null<scalar_t>(f.Bgt),
                           ptr_or_null<scalar_t>(f.A2)};
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
  const auto factor_gemm = factor_gemm_dtype(gemm);
  const int64_t Er = s.experts * s.rank;
  ForwardTensors ts;
  ts.x = contiguous_as(x, gemm);
  ts.W1 = contiguous_as(fc1_weight, gemm);
  ts.Wg = optional_as(gate_weight, gemm);
  ts.b1 = pre_bias(s, fc1_bias, gate_bias, x.options().dtype(dtype));
  ts.W2 = contiguous_as(fc2_weight, gemm);
  const at::Tensor p = contiguous_as(weights, dtype), idx = contiguous_as(indices, at::kLong);
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, dtype, gate_A, gate_B);
  std::vector<at::Tensor> fc2_right;
  if (f.B2s.defined()) fc2_right.push_back(f.B2s);
  if (fc2_bias.has_value()) {
    ts.p_sum = p.sum(1);
    fc2_right.push_back(fc2_bias->to(dtype).unsqueeze(1));
  }
  if (!fc2_right.empty()) ts.fc2_right = at::cat(fc2_right, 1).to(factor_gemm).contiguous();
  const at::Tensor U = s.u_width() > 0 ? mm_as(ts.x, f.A1s.t(), u_gemm_dtype(gemm, act), dtype) : at::Tensor();
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
  at::Tensor A1s;                             // contiguous, in factor_gemm_dtype
  at::Tensor g2, g_dot_b2;                    // contiguous, in the compute dtype
  at::Tensor grad_x, grad_pre, mixed;         // outputs in the GEMM dtype; undefined if unwanted
  at::Tensor grad_p, grad_U;                  // outputs in the compute dtype
  at::Tensor grad_B1t, grad_Bgt, grad_A2;     // [threads, E, r, F] per-thread accumulators, compute dtype
};

template <typename scalar_t, typename acc_t, Activation A, bool kGated>
void backward_tiles(const Experts<acc_t>& X, BackwardTensors& ts) {
  const int64_t T = ts.g.size(0), F = X.d_ff, P = kGated ? 2 * F : F, Er = X.experts * X.rank;
  const int64_t Uw = X.u_stride, rows = tile_rows(T, F);
  parallel_tiles(T, rows, [&](int64_t begin, int64_t end) {
    const auto opts = ts.g.options();
    const int64_t thread = at::get_thread_num();  // owns slice `thread` of the [threads, E, r, F] accumulators
    at::Tensor grad_mixed = at::empty({rows, F}, opts);
    // per token of a group: h, gz, gg and the compute-dtype copies of grad_mixed, mixed [F each], pre and
    // grad_pre [P each]
    const int64_t per_token = 5 * F + 2 * P;
    at::Tensor scratch = at::empty({kGroup * per_token}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    at::Tensor grad_pre_scratch = ts.grad_pre.defined() ? at::Tensor() : at::empty({rows, P}, opts);
    std::vector<int64_t> order;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * rows, n = std::min(rows, T - t0);
      at::Tensor gm = grad_mixed.narrow(0, 0, n), g = ts.g.narrow(0, t0, n);
      at::Tensor grad_pre = ts.grad_pre.defined() ? ts.grad_pre.narrow(0, t0, n) : grad_pre_scratch.narrow(0, 0, n);
      at::mm_out(gm, g, ts.W2);
      tokens_by_experts(X, t0, n, order);
      for (int64_t i = 0; i < n; i += kGroup) {
        const int64_t* group = order.data() + i;
        const int count = static_cast<int>(std::min<int64_t>(kGroup, n - i));
        TokenGrads<acc_t> G[kGroup];
        scalar_t *grad_pre_rows[kGroup], *mixed_rows[kGroup];
        for (int a = 0; a < count; ++a) {
          const int64_t token = group[a], t = token - t0;
          acc_t* const row = scratch.data_ptr<acc_t>() + a * per_token;
          acc_t* const pre_scratch = row + 5 * F;
          grad_pre_rows[a] = row_of<scalar_t>(grad_pre, t, P);
          mixed_rows[a] = row_of<scalar_t>(ts.mixed, token, F);
          acc_t* grad_u_row = row_of<acc_t>(ts.grad_U, token, Uw);
          G[a] = TokenGrads<acc_t>{compute_row(row_of<scalar_t>(ts.pre, token, P), pre_scratch, P),
                                   compute_row(row_of<scalar_t>(gm, t, F), row + 3 * F, F),
                                   row_of<acc_t>(ts.g2, token, Er),
                                   ts.g_dot_b2.defined() ? ts.g_dot_b2.data_ptr<acc_t>()[token] : acc_t(0),
                                   accumulator_row(grad_pre_rows[a], pre_scratch + P),
                                   row_of<acc_t>(ts.grad_p, token, X.top_k),
                                   X.U ? grad_u_row : nullptr,
                                   row_of<acc_t>(ts.grad_B1t, thread, Er * F),
                                   row_of<acc_t>(ts.grad_A2, thread, Er * F),
                                   mixed_rows[a] ? accumulator_row(mixed_rows[a], row + 4 * F) : nullptr,
                                   row,
                                   row + F,
                                   X.Ug ? grad_u_row + (X.U ? Er : 0) : nullptr,
                                   row_of<acc_t>(ts.grad_Bgt, thread, Er * F),
                                   row + 2 * F};
        }
        const auto slot = [&](const SlotRef& ref) {
          const int64_t t = group[ref.which];
          return BackwardSlot<acc_t>{&G[ref.which], t, ref.j, X.weight(t, ref.j), ref.accumulate};
        };
        for_each_expert_group(X, group, count, [&](int64_t e, const auto&... refs) {
          const BackwardSlot<acc_t> slots[] = {slot(refs)...};
          backward_slots<acc_t, A, kGated, sizeof...(refs)>(X, e, slots);
        });
        for (int a = 0; a < count; ++a) {
          store_row(G[a].grad_pre, grad_pre_rows[a], P);
          if (mixed_rows[a]) store_row(G[a].mixed, mixed_rows[a], F);
        }
      }
      if (ts.grad_x.defined()) {
        at::Tensor gx = ts.grad_x.narrow(0, t0, n);
        input_products_grad(gx, grad_pre, ts.W1, ts.Wg);
        if (Uw > 0) {
          const at::Tensor grad_U = ts.grad_U.narrow(0, t0, n).to(ts.A1s.scalar_type());
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
  const auto factor_gemm = factor_gemm_dtype(gemm);

  BackwardTensors ts;
  ts.g = contiguous_as(grad_y, gemm);
  ts.W1 = contiguous_as(fc1_weight, gemm);
  ts.Wg = optional_as(gate_weight, gemm);
  ts.W2 = contiguous_as(fc2_weight, gemm);
  ts.pre = contiguous_as(pre, gemm);
  const at::Tensor g = contiguous_as(grad_y, factor_gemm);  // for the low-rank and bias terms' gradients
  const at::Tensor p = contiguous_as(weights, dtype), idx = contiguous_as(indices, at::kLong);
  const at::Tensor Uc = s.u_width() > 0 ? contiguous_as(U, dtype) : at::Tensor();
  const Factors f = prepare_factors(s, fc1_A, fc1_B, fc2_A, fc2_B, scale, dtype, gate_A, gate_B);
  if (f.A1s.defined()) ts.A1s = f.A1s.to(factor_gemm);
  if (s.adapt_fc2) ts.g2 = mm_as(g, f.B2s, factor_gemm, dtype);
  if (fc2_bias.has_value()) ts.g_dot_b2 = at::mv(g, contiguous_as(*fc2_bias, factor_gemm)).to(dtype);
  const auto opts = ts.g.options().dtype(dtype), gemm_opts = ts.g.options();
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
