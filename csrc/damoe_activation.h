// The activations of the dasam3 ops, without ATen: the CUDA kernels' header (damoe_cuda_kernels.cuh)
// includes only this, so the kernels also compile as host code for the tests' emulated GPU.
#pragma once

#include <type_traits>

namespace dasam3 {

enum class Activation { kGelu, kGeluTanh, kRelu, kSilu, kQuickGelu };

// fn(std::integral_constant<Activation, act>{}): a kernel template instantiated per activation.
template <typename Fn>
void with_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kQuickGelu: return fn(std::integral_constant<Activation, Activation::kQuickGelu>{});
  }
}

}  // namespace dasam3
