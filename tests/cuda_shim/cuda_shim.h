// Enough of CUDA to run this project's kernels on the CPU with g++, faithfully enough that a
// test means something: the threads of a block run concurrently (one std::thread each), and
// warp shuffles exchange values through a per-warp barrier, so a lane reads what the other
// lanes of its warp really passed at that step. Blocks of a grid run one after another.
#ifndef LRC_KERAS_TESTS_CUDA_SHIM_H_
#define LRC_KERAS_TESTS_CUDA_SHIM_H_

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

template <typename T>
T Exchange(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int lane = threadIdx.x % kWarpSize;
  std::memcpy(&current_warp->slots[lane], &value, sizeof(T));
  current_warp->barrier.arrive_and_wait();  // every lane has written
  T result = value;
  if (source_lane >= 0 && source_lane < kWarpSize) {
    std::memcpy(&result, &current_warp->slots[source_lane], sizeof(T));
  }
  current_warp->barrier.arrive_and_wait();  // every lane has read before the next exchange
  return result;
}

// Runs kernel<<<grid, block>>>(args...): each block's threads concurrently, blocks in turn.
template <typename Kernel, typename... Args>
void Launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned first = 0; first < block; first += kWarpSize) {
      warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min<unsigned>(kWarpSize, block - first))));
    }
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = dim3{t, 1, 1};
        blockIdx = dim3{b, 1, 1};
        current_warp = warps[t / kWarpSize].get();
        kernel(args...);
        current_warp->barrier.arrive_and_drop();  // lanes still shuffling no longer wait for it
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace cuda_shim

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return cuda_shim::Exchange(value, source_lane);
}

template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  // Out of range: the lane keeps its own value, as on the GPU.
  return cuda_shim::Exchange(value, static_cast<int>(threadIdx.x % cuda_shim::kWarpSize) + offset);
}

// Bit l set where lane l's predicate is true; every lane of the warp takes part.
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned bits = 0;
  for (int lane = 0; lane < cuda_shim::kWarpSize; ++lane) {
    bits |= static_cast<unsigned>(cuda_shim::Exchange(predicate != 0, lane)) << lane;
  }
  return bits;
}

// 1 + the index of the least significant set bit, 0 for none.
inline int __ffs(int value) { return __builtin_ffs(value); }

template <typename T>
T __ldg(const T* pointer) {
  return *pointer;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}

#endif  // LRC_KERAS_TESTS_CUDA_SHIM_H_
