// csrc/damoe_cuda_kernels.cuh compiled as host code: an emulated GPU for the tests on machines without
// one.  Each CUDA thread of a block is a std::thread; __syncthreads is a barrier of the block, a warp
// shuffle a barrier of the warp's 32 threads around an exchange slot, atomicAdd an atomic_ref.  Blocks
// run one after another (CUDA promises no order).  The kernels run in float only: the half types
// differ only in the loads and stores.  Built by tests/kernels/emulated_cuda.py with the system's g++.
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

namespace {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Index3 threadIdx, blockIdx;

struct Warp {
  std::barrier<> sync{32};
  double slot[32];
};
std::barrier<>* block_barrier = nullptr;  // of the block that runs now
Warp* block_warps = nullptr;

void __syncthreads() { block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask: all lanes, as in the kernels*/, T value, int offset) {
  Warp& warp = block_warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  warp.slot[lane] = static_cast<double>(value);
  warp.sync.arrive_and_wait();
  const T other = static_cast<T>(warp.slot[lane ^ offset]);
  warp.sync.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return other;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

}  // namespace

namespace dasam3 {
namespace {
alignas(16) unsigned char smem[64 * 1024];  // the block's dynamic shared memory
}  // namespace
}  // namespace dasam3

#include "damoe_cuda_kernels.cuh"

namespace {

using namespace dasam3;

// kernel(args) on a grid of blocks x blocks_y blocks of kThreads threads.
template <typename Kernel, typename Args>
void launch(Kernel kernel, const Args& args, unsigned blocks_x, unsigned blocks_y) {
  for (unsigned by = 0; by < blocks_y; ++by) {
    for (unsigned bx = 0; bx < blocks_x; ++bx) {
      std::barrier<> barrier(kThreads);
      std::vector<Warp> warps(kWarps);
      block_barrier = &barrier;
      block_warps = warps.data();
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < unsigned(kThreads); ++t) {
        threads.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          blockIdx = {bx, by, 0};
          kernel(args);
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
}

unsigned tiles(int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); }

}  // namespace

extern "C" {

// The kernels' argument structs, filled field by field from Python (ctypes), in their declared order.
void emulated_forward(int activation, int gated, const ForwardArgs<float, float>* args) {
  with_activation(static_cast<Activation>(activation), [&](auto a) {
    const auto run = [&](auto kernel) { launch(kernel, *args, tiles(args->tokens), tiles(args->d_ff)); };
    if (gated) run(forward_kernel<float, float, decltype(a)::value, true>);
    else run(forward_kernel<float, float, decltype(a)::value, false>);
  });
}

void emulated_backward(int activation, int gated, const BackwardArgs<float, float>* args) {
  with_activation(static_cast<Activation>(activation), [&](auto a) {
    const auto run = [&](auto kernel) { launch(kernel, *args, tiles(args->tokens), tiles(args->d_ff)); };
    if (gated) run(backward_kernel<float, float, decltype(a)::value, true>);
    else run(backward_kernel<float, float, decltype(a)::value, false>);
  });
}

int shared_memory_limit() { return static_cast<int>(kSmemLimit); }

}  // extern "C"
