// Enough of CUDA to run this project's kernels on the CPU with g++, faithfully enough that a
// test means something: the threads of a block run concurrently (one std::thread each), and
// warp shuffles exchange values through a per-warp barrier, so a lane reads what the other
// lanes of its warp really passed at that step. Blocks of a grid run one after another, so a
// kernel's __shared__ arrays are its static locals (one copy, the running block's), and
// __syncthreads is a barrier of the block's threads.
#ifndef LRC_KERAS_TESTS_CUDA_SHIM_H_
#define LRC_KERAS_TESTS_CUDA_SHIM_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_shim {

constexpr int kWarpSize = 32;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  uint64_t slots[kWarpSize] = {};
};

inline thread_local Warp* current_warp = nullptr;
inline thread_local std::barrier<>* current_block = nullptr;  // its threads' __syncthreads

// Every lane's value at this step, as passed by the lanes of the current warp.
template <typename T>
std::array<T, kWarpSize> Exchange(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int lane = threadIdx.x % kWarpSize;
  std::memcpy(&current_warp->slots[lane], &value, sizeof(T));
  current_warp->barrier.arrive_and_wait();  // every lane has written
  std::array<T, kWarpSize> values;
  for (int source = 0; source < kWarpSize; ++source) {
    std::memcpy(&values[source], &current_warp->slots[source], sizeof(T));
  }
  current_warp->barrier.arrive_and_wait();  // every lane has read before the next exchange
  return values;
}

// The value of `source_lane`; out of range, the lane keeps its own value, as on the GPU.
template <typename T>
T Shuffle(T value, int source_lane) {
  const std::array<T, kWarpSize> values = Exchange(value);
  return source_lane >= 0 && source_lane < kWarpSize ? values[source_lane] : value;
}

// Runs kernel<<<dim3(grid, grid_y), block>>>(args...): each block's threads concurrently,
// blocks in turn.
template <typename Kernel, typename... Args>
void Launch(unsigned grid, unsigned grid_y, unsigned block, Kernel kernel, Args... args) {
  gridDim = dim3{grid, grid_y, 1};
  blockDim = dim3{block, 1, 1};
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid; ++bx) {
      std::barrier<> block_barrier(block);
      std::vector<std::unique_ptr<Warp>> warps;
      for (unsigned first = 0; first < block; first += kWarpSize) {
        warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min<unsigned>(kWarpSize, block - first))));
      }
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
          threadIdx = dim3{t, 1, 1};
          blockIdx = dim3{bx, by, 1};
          current_warp = warps[t / kWarpSize].get();
          current_block = &block_barrier;
          kernel(args...);
          current_warp->barrier.arrive_and_drop();  // lanes still shuffling no longer wait for it
          block_barrier.arrive_and_drop();          // nor do threads at a __syncthreads
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
}

// What launch(kernel, geometry, args...) of custom_ops/gated_dense_gpu_kernels.cu.h does on
// the GPU: kernel<<<dim3(geometry.grid, geometry.grid_y), geometry.block>>>(args...).
constexpr auto kLaunchOnCpu = [](auto kernel, auto geometry, auto... args) {
  Launch(geometry.grid, geometry.grid_y, geometry.block, kernel, args...);
};

}  // namespace cuda_shim

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return cuda_shim::Shuffle(value, source_lane);
}

template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  return cuda_shim::Shuffle(value, static_cast<int>(threadIdx.x % cuda_shim::kWarpSize) + offset);
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return cuda_shim::Shuffle(value, static_cast<int>(threadIdx.x % cuda_shim::kWarpSize) ^ lane_mask);
}

inline unsigned __ballot_sync(unsigned, bool predicate) {
  const std::array<bool, cuda_shim::kWarpSize> predicates = cuda_shim::Exchange(predicate);
  unsigned bits = 0;
  for (int lane = 0; lane < cuda_shim::kWarpSize; ++lane) bits |= static_cast<unsigned>(predicates[lane]) << lane;
  return bits;
}

inline void __syncthreads() { cuda_shim::current_block->arrive_and_wait(); }

inline int __popc(unsigned bits) { return __builtin_popcount(bits); }
inline int __ffs(unsigned bits) { return __builtin_ffs(static_cast<int>(bits)); }

template <typename T>
T __ldg(const T* pointer) {
  return *pointer;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}

#endif  // LRC_KERAS_TESTS_CUDA_SHIM_H_
