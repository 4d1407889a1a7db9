// CPU functor of LrcGatedDenseGrad: TensorFlow's worker threads, AVX-512 / AVX2+FMA / baseline
// chosen at run time (isa.h), the vector loops in gated_dense_grad_impl.h.
//
// 1. Lists. A pass over y (and skipped, in the sampled rows) marks the pairs that pass gradient
//    (PairPasses) in a bitmap, one bit a
//    (row, unit), counts them per unit and per row, and sums grad_bias. From the bitmap two
//    lists are filled, each entry with grad_y of its pair: per unit, its rows (for dW), and per
//    row, its units (for dx). Scratch from TensorFlow's allocator, so that its failure is an
//    error status: 16 bytes a pair, one bit a (row, unit), 8 bytes a row and a unit.
//    (PairGradient reads a pair's gradient in place: a branch a listed pair, not a pass.)
// 2. Products. Threads split the input dimension into chunks of 64 columns, so that no two
//    threads write the same element of grad_x or grad_kernel: no locks, no per-thread copies of
//    a gradient. For its chunk a thread copies x's columns into dense rows (batch × 64 floats,
//    32 KiB at batch 128: L1) and computes, each sum in registers and stored once,
//      dW_j = Σ_{rows i listed for unit j} g · x_i,  dx_i = Σ_{units j listed for row i} g · W_j,
//    the W_j read in place or, where the kernel's row stride would make them conflict in L2,
//    from a dense copy of the chunk (PackKernelChunks). A large dW is written past the caches.
//    Each worker thread's buffer for the copies, (batch + units) × 64 floats, is allocated the
//    first time the thread takes a chunk and freed when the op returns.
// Every element of a gradient is one sum in increasing row or unit order, by one thread: the
// results do not depend on the number of threads or on scheduling. The per-pair work is
// 2 multiply-adds a column (one each for dW and dx), as the dense GEMMs' on those pairs.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "gated_dense_grad.h"
#include "isa.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

constexpr int64_t kFloatsPerLine = 64 / sizeof(float);  // one 64-byte cache line
constexpr int64_t kUnitsPerWord = 64;                  // bits of one bitmap word

using GatherFn = void (*)(const int32_t* others, const float* grads, int64_t count,
                          const float* table, int64_t table_stride, float* out, int64_t columns,
                          bool stream);
using PackFn = void (*)(const float* source, int64_t rows, int64_t stride, int64_t columns,
                        int64_t packed, float* out);
using MarkFn = void (*)(const GatedDenseGradArgs& a, int64_t word, int64_t words, uint64_t* bitmap,
                        int64_t* unit_counts);

// One ISA's loops. gathers[k] works on rows of vectors[k] vectors: k = 0 on whole chunks, the
// narrower ones on the matrix's last chunk when it is narrower.
struct GradKernels {
  int64_t width;  // floats a vector
  int vectors[4];
  GatherFn gathers[4];
  PackFn pack;
  MarkFn mark;
  void (*fence)();
};

}  // namespace

// One copy of gated_dense_grad_impl.h per instruction set, on that set's primitives (isa.h).
#define LRC_ISA_COPY "gated_dense_grad_impl.h"
#include "isa_copies.h"

namespace {

const GradKernels& SelectedGradKernels() {
  static const GradKernels kernels = [] {
    switch (SelectedIsa()) {
      case Isa::kAvx512:
        return avx512::MakeGradKernels();
      case Isa::kAvx2:
        return avx2::MakeGradKernels();
      case Isa::kPortable:
        break;
    }
    return portable::MakeGradKernels();
  }();
  return kernels;
}

// Pairs listed per owner (a unit or a row): owner o's are entries [first[o], first[o + 1]) of
// `others` (the row or unit at the other end, increasing) and `grads` (grad_y of the pair).
struct PairLists {
  const int64_t* first;
  int32_t* others;
  float* grads;
};

// Unit lists of word `word`'s units, rows in increasing order.
void ListUnitPairs(const GatedDenseGradArgs& a, int64_t word, int64_t words,
                   const uint64_t* bitmap, const PairLists& units) {
  const int64_t unit = word * kUnitsPerWord;
  const int64_t width = std::min(kUnitsPerWord, a.units - unit);
  int64_t next[kUnitsPerWord];
  for (int64_t u = 0; u < width; ++u) next[u] = units.first[unit + u];
  for (int64_t i = 0; i < a.batch; ++i) {
    for (uint64_t bits = bitmap[i * words + word]; bits != 0; bits &= bits - 1) {
      const int u = __builtin_ctzll(bits);
      units.others[next[u]] = static_cast<int32_t>(i);
      units.grads[next[u]++] = PairGradient(a, i, unit + u);
    }
  }
}

// Row i's list, units in increasing order.
void ListRowPairs(const GatedDenseGradArgs& a, int64_t i, int64_t words, const uint64_t* bitmap,
                  const PairLists& rows) {
  int64_t next = rows.first[i];
  for (int64_t word = 0; word < words; ++word) {
    for (uint64_t bits = bitmap[i * words + word]; bits != 0; bits &= bits - 1) {
      const int64_t j = word * kUnitsPerWord + __builtin_ctzll(bits);
      rows.others[next] = static_cast<int32_t>(j);
      rows.grads[next++] = PairGradient(a, i, j);
    }
  }
}

// first[1..owners] hold counts: make first[o] the start of owner o's list.
void PlaceLists(int64_t* first, int64_t owners) {
  first[0] = 0;
  for (int64_t o = 0; o < owners; ++o) first[o + 1] += first[o];
}

// A grad_kernel at least this large is written past the caches: the optimiser reads it next,
// from memory either way, and the stores stop pushing x's and W's chunks out of L2.
constexpr int64_t kStreamBytes = 8 << 20;

// Whether the kernel's chunks are copied into dense rows before the dx gathers read them. Rows
// d floats apart start in the same L2 set every 1024 / gcd(d / 16, 1024) rows: when d is a
// multiple of 256 (a 1 KiB stride) a chunk of 4000 units has 64 sets or fewer to itself and
// conflicts out of L2 (3072 -> 4000: 12.3 ms in place, 9.3 ms packed, at 6.6% of pairs), while
// for other d packing only adds a copy of W (784 -> 1000: 5-25% slower packed).
bool PackKernelChunks(int64_t input_dim) { return input_dim % 256 == 0; }

// The narrowest of the ISA's gathers that covers `columns` (at most one chunk).
int PieceFor(const GradKernels& kernels, int64_t columns) {
  int piece = 0;
  while (piece < 3 && kernels.vectors[piece + 1] < kernels.vectors[piece] &&
         kernels.vectors[piece + 1] * kernels.width >= columns) {
    ++piece;
  }
  return piece;
}

// Columns [column, column + columns) of dW and dx (columns <= one chunk), through `buffer`:
// (batch + units) rows of the gather's width.
void ComputeChunk(const GatedDenseGradArgs& a, const PairLists& units, const PairLists& rows,
                  int64_t column, int64_t columns, float* buffer) {
  const GradKernels& kernels = SelectedGradKernels();
  const int piece = PieceFor(kernels, columns);
  const GatherFn gather = kernels.gathers[piece];
  const int64_t packed = kernels.vectors[piece] * kernels.width;
  float* packed_x = buffer;
  kernels.pack(a.x + column, a.batch, a.input_dim, columns, packed, packed_x);
  const bool stream = a.units * a.input_dim * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  for (int64_t j = 0; j < a.units; ++j) {
    const int64_t first = units.first[j];
    gather(units.others + first, units.grads + first, units.first[j + 1] - first, packed_x, packed,
           a.grad_kernel + j * a.input_dim + column, columns, stream);
  }
  const float* table = a.kernel + column;
  int64_t table_stride = a.input_dim;
  if (PackKernelChunks(a.input_dim) || columns < packed) {
    float* packed_kernel = buffer + a.batch * packed;
    kernels.pack(a.kernel + column, a.units, a.input_dim, columns, packed, packed_kernel);
    table = packed_kernel;
    table_stride = packed;
  }
  for (int64_t i = 0; i < a.batch; ++i) {
    const int64_t first = rows.first[i];
    gather(rows.others + first, rows.grads + first, rows.first[i + 1] - first, table, table_stride,
           a.grad_x + i * a.input_dim + column, columns, false);
  }
}

// The entries of a list set whose `first` is placed.
absl::Status AllocateLists(tensorflow::OpKernelContext* ctx, const GatedDenseGradArgs& a,
                           int64_t pairs, tensorflow::Tensor tensors[2], PairLists* lists) {
  if (!ctx->allocate_temp(tensorflow::DT_INT32, {pairs}, &tensors[0]).ok() ||
      !ctx->allocate_temp(tensorflow::DT_FLOAT, {pairs}, &tensors[1]).ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "LrcGatedDenseGrad: out of memory allocating the lists of the ", pairs,
        " pairs with y > 0 (", 16 * pairs, " bytes) for batch ", a.batch, ", units ", a.units));
  }
  lists->others = tensors[0].flat<int32_t>().data();
  lists->grads = tensors[1].flat<float>().data();
  return absl::OkStatus();
}

}  // namespace

template <>
void GatedDenseGradFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                                 const GatedDenseGradArgs& a) {
  using Scheduling = tsl::thread::ThreadPool::SchedulingParams;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const GradKernels& kernels = SelectedGradKernels();

  // 1. The bitmap and counts, then the lists.
  const int64_t words = (a.units + kUnitsPerWord - 1) / kUnitsPerWord;
  tensorflow::Tensor bitmap_tensor, count_tensors[2];
  OP_REQUIRES_OK(ctx,
                 ctx->allocate_temp(tensorflow::DT_UINT64, {a.batch * words}, &bitmap_tensor));
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, {a.units + 1}, &count_tensors[0]));
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, {a.batch + 1}, &count_tensors[1]));
  uint64_t* bitmap = bitmap_tensor.flat<uint64_t>().data();
  int64_t* unit_first = count_tensors[0].flat<int64_t>().data();
  int64_t* row_first = count_tensors[1].flat<int64_t>().data();
  std::memset(row_first, 0, (a.batch + 1) * sizeof(int64_t));
  const auto mark = [&](int64_t begin, int64_t end) {
    for (int64_t word = begin; word < end; ++word) kernels.mark(a, word, words, bitmap, unit_first + 1);
    // Row counts: this shard's words' share, added once a row.
    for (int64_t i = 0; i < a.batch; ++i) {
      int64_t count = 0;
      for (int64_t word = begin; word < end; ++word) {
        count += __builtin_popcountll(bitmap[i * words + word]);
      }
      if (count) __atomic_fetch_add(&row_first[i + 1], count, __ATOMIC_RELAXED);
    }
  };
  workers->ParallelFor(words, Scheduling::Adaptive(3 * a.batch * kUnitsPerWord), mark);
  PlaceLists(unit_first, a.units);
  PlaceLists(row_first, a.batch);
  const int64_t pairs = unit_first[a.units];
  tensorflow::Tensor unit_tensors[2], row_tensors[2];
  PairLists units{unit_first}, rows{row_first};
  OP_REQUIRES_OK(ctx, AllocateLists(ctx, a, pairs, unit_tensors, &units));
  OP_REQUIRES_OK(ctx, AllocateLists(ctx, a, pairs, row_tensors, &rows));
  // Items [0, words) fill the lists of a word's units, [words, words + batch) a row's list.
  // Cycles an item: a scan of `batch` (or `words`) bitmap words, and ~4 a listed pair.
  const double density = static_cast<double>(pairs) / std::max<int64_t>(1, a.batch * a.units);
  const int64_t fill_cost =
      static_cast<int64_t>(2 * a.batch * words * (1 + 4 * kUnitsPerWord * density)) /
      std::max<int64_t>(1, words + a.batch);
  const auto fill = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      if (item < words) {
        ListUnitPairs(a, item, words, bitmap, units);
      } else {
        ListRowPairs(a, item - words, words, bitmap, rows);
      }
    }
  };
  workers->ParallelFor(words + a.batch, Scheduling::Adaptive(fill_cost), fill);

  // 2. Both products, chunk by chunk of columns.
  const int64_t chunk = kernels.vectors[0] * kernels.width;
  const int64_t chunks = (a.input_dim + chunk - 1) / chunk;
  // As wide as the widest gather used: narrower than a chunk when the input is.
  const int64_t buffer_width =
      kernels.vectors[PieceFor(kernels, std::min(chunk, a.input_dim))] * kernels.width;
  const int64_t buffer_floats = (a.batch + a.units) * buffer_width;
  const absl::Status no_buffer = absl::ResourceExhaustedError(absl::StrCat(
      "LrcGatedDenseGrad: out of memory allocating a thread's packing buffer of (batch ", a.batch,
      " + units ", a.units, ") x ", buffer_width, " floats"));
  const int buffer_count = workers->NumThreads() + 1;  // worker ids run to NumThreads() inclusive
  std::unique_ptr<std::unique_ptr<float[]>[]> buffers(
      new (std::nothrow) std::unique_ptr<float[]>[buffer_count]);
  OP_REQUIRES(ctx, buffers != nullptr, no_buffer);
  std::atomic<bool> out_of_memory{false};
  // Cycles a chunk: ~1 a vector of each pair in each product, and its packing.
  const int64_t chunk_cost = kernels.vectors[0] * (2 * pairs + 2 * (a.batch + a.units));
  const auto compute = [&](int64_t begin, int64_t end, int worker) {
    // An exception escaping a worker thread would abort the process: a failed allocation is
    // recorded instead, and the op fails with an error Python can catch.
    std::unique_ptr<float[]>& buffer = buffers[worker];
    if (buffer == nullptr) buffer.reset(new (std::nothrow) float[buffer_floats]);
    if (buffer == nullptr) {
      out_of_memory = true;
      return;
    }
    for (int64_t c = begin; c < end; ++c) {
      const int64_t column = c * chunk;
      ComputeChunk(a, units, rows, column, std::min(chunk, a.input_dim - column), buffer.get());
    }
    kernels.fence();
  };
  workers->ParallelForWithWorkerId(chunks, Scheduling::Adaptive(chunk_cost), compute);
  OP_REQUIRES(ctx, !out_of_memory.load(), no_buffer);
}

}  // namespace lrc
