// CPU functors: TensorFlow's worker threads, AVX-512 / AVX2+FMA / baseline chosen at run time,
// and several batch rows blocked against each weight row so that one load of W_j serves them all.
//
// Work is split over units: for unit j, the rows whose estimate selects it are gathered and
// x_i·W_j is computed for them only, several rows per load of W_j (RowTier).
// Every (row, unit) is summed in the same order whichever block it falls in, and by one
// thread, so results do not depend on the batch's composition or on scheduling.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>

#include "gated_dense.h"
#include "isa.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace lrc {
namespace {

// Rows computed per load of a weight row: 8 on AVX-512 (16 accumulators of its 32 registers),
// 4 elsewhere (8 of 16); leftovers go 4 at a time, then one by one.
constexpr int kMaxRowBlock = 8;
constexpr int64_t kFloatsPerLine = 64 / sizeof(float);  // one 64-byte cache line
// The selection reads 8 flag bytes as one word, flag k in its byte k.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the selection assumes little-endian words");

using DotRowsFn = void (*)(const float* w, const float* const* rows, int64_t n,
                           const float* ahead, float* out);

}  // namespace

// One copy of dot_rows_impl.h per instruction set, on that set's primitives (isa.h).
#define LRC_ISA_COPY "dot_rows_impl.h"
#include "isa_copies.h"

namespace {

struct RowTier {
  int rows;
  DotRowsFn dot;
};

// Widest first; the last tier has rows == 1.
struct DotKernels {
  RowTier tiers[3];
  int count;
};

DotKernels ChooseDotKernels() {
  switch (SelectedIsa()) {
    case Isa::kAvx512:
      return {{{8, avx512::DotRows<8>}, {4, avx512::DotRows<4>}, {1, avx512::DotRows<1>}}, 3};
    case Isa::kAvx2:
      return {{{4, avx2::DotRows<4>}, {1, avx2::DotRows<1>}}, 2};
    case Isa::kPortable:
      break;
  }
  return {{{4, portable::DotRows<4>}, {1, portable::DotRows<1>}}, 2};
}

const DotKernels& SelectedDotKernels() {
  static const DotKernels kernels = ChooseDotKernels();
  return kernels;
}

// Tiles of units × rows whose weights and inputs both stay in the L2 cache (1-2 MiB a core on
// current x86): a unit's weight row is read from memory once and reused for every row block, and
// a row block is read from L3 once per unit block. Without them, a batch whose rows outgrow L2
// (256 × 3072 floats) streams every selected row from L3 for every unit, at half the speed.
constexpr int64_t kTileBytes = 384 * 1024;
constexpr int64_t kMinRowBlock = 16;  // enough selected rows for the widest RowTier
// A tile's selection list holds up to units × rows indices. Narrow inputs would make both blocks
// above huge (98 304 of each at input_dim 1, 77 GB of indices): capped, the list stays within
// 512 KiB whatever the batch, and for input_dim >= 384 the cap changes nothing.
constexpr int64_t kMaxTileSide = 256;

// The tile shape for units [begin, end): at most kMaxTileSide units and rows, fewer where the
// weights or rows of a block would outgrow kTileBytes, the shard has fewer units, or the batch
// fewer rows.
struct TileShape {
  int64_t units;
  int64_t rows;
};

TileShape ChooseTileShape(const GatedDenseArgs& a, int64_t begin, int64_t end) {
  const int64_t row_bytes = std::max<int64_t>(a.input_dim, 1) * sizeof(float);
  const int64_t block = std::min(kMaxTileSide, kTileBytes / row_bytes);
  return {std::min(std::max<int64_t>(1, block), end - begin),
          std::min(std::max(kMinRowBlock, block), a.batch)};
}

// Scratch of one tile, sized by what the tile can hold: per unit, how many rows select it
// (counts[units]), which rows (selected_rows[units * rows], unit u's from u * rows on), and one
// flag byte a unit for the row being scanned (padded to whole 8-byte words). Written before read:
// no zero-fill beyond the counts and the padding. Each shard allocates its own, where its tile's
// size is known: at most ~520 KiB, which glibc serves from its heap again after the first call,
// and nothing stays held between calls.
struct TileScratch {
  explicit TileScratch(TileShape tile)
      : rows(tile.rows),
        counts(new int64_t[tile.units]),
        selected_rows(new int64_t[tile.units * tile.rows]),
        flags(new uint8_t[FlagBytes(tile)]) {}
  static int64_t FlagBytes(TileShape tile) { return (tile.units + 7) / 8 * 8; }
  static int64_t Bytes(TileShape tile) {
    return tile.units * (tile.rows + 1) * sizeof(int64_t) + FlagBytes(tile);
  }
  int64_t rows;
  std::unique_ptr<int64_t[]> counts;
  std::unique_ptr<int64_t[]> selected_rows;
  std::unique_ptr<uint8_t[]> flags;
};

// Units [unit_begin, unit_end) × rows [row_begin, row_end): select the rows, compute only the
// selected dot products, and return how many there were.
int64_t ComputeTile(const GatedDenseArgs& a, int64_t unit_begin, int64_t unit_end, int64_t row_begin,
                    int64_t row_end, TileScratch& scratch) {
  const DotKernels& dot = SelectedDotKernels();
  // Locals, not a.*: a store through y could otherwise alias a.margin and block optimisation.
  // y may be product's own buffer (forwarded): each element is read before it is written.
  int64_t* counts = scratch.counts.get();
  int64_t* selected_rows = scratch.selected_rows.get();
  uint8_t* flags = scratch.flags.get();
  const int64_t capacity = scratch.rows;  // a unit's list never outgrows the tile's rows
  const float* product = a.product;
  const float* bias = a.bias + unit_begin;
  float* y = a.y;
  const float margin = a.margin;
  const int64_t units = a.units;
  const int64_t tile_units = unit_end - unit_begin;
  // Selection, row by row: product and y are read and written contiguously (the compiler
  // vectorises the flags and the zeros), then the flags are read 8 at a time, so that the runs of
  // unselected units low densities are made of cost one test a word. Rows join their units' lists
  // in increasing order.
  std::fill(counts, counts + tile_units, int64_t{0});
  const int64_t words = (tile_units + 7) / 8;
  std::fill(flags + tile_units, flags + words * 8, uint8_t{0});
  int64_t count = 0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* estimates = product + i * units + unit_begin;
    float* out = y + i * units + unit_begin;
    for (int64_t u = 0; u < tile_units; ++u) {
      flags[u] = UnitIsComputed(estimates[u] + bias[u], margin);
      out[u] = 0.f;
    }
    for (int64_t word = 0; word < words; ++word) {
      uint64_t bits;
      std::memcpy(&bits, flags + word * 8, sizeof(bits));
      for (; bits != 0; bits &= bits - 1) {  // each flag byte is 0 or 1: one bit a selected unit
        const int64_t u = word * 8 + __builtin_ctzll(bits) / 8;
        selected_rows[u * capacity + counts[u]++] = i;
        ++count;
      }
    }
  }
  const float* rows[kMaxRowBlock];
  float dots[kMaxRowBlock];
  int64_t next = 0;  // the next unit with selected rows, whose weights are prefetched
  for (int64_t u = 0; u < tile_units; ++u) {
    if (counts[u] == 0) continue;
    for (next = std::max(next, u + 1); next < tile_units && counts[next] == 0;) ++next;
    const float* w = a.kernel + (unit_begin + u) * a.input_dim;
    const float* ahead = next < tile_units ? a.kernel + (unit_begin + next) * a.input_dim : w;
    const float b = bias[u];
    const int64_t* selected = selected_rows + u * capacity;
    int64_t s = 0;
    const int64_t stop = counts[u];
    for (int t = 0; t < dot.count; ++t) {
      const RowTier& tier = dot.tiers[t];
      for (; s + tier.rows <= stop; s += tier.rows, ahead = w) {
        for (int r = 0; r < tier.rows; ++r) rows[r] = a.x + selected[s + r] * a.input_dim;
        tier.dot(w, rows, a.input_dim, ahead, dots);
        for (int r = 0; r < tier.rows; ++r) {
          y[selected[s + r] * units + unit_begin + u] = MaskedRelu(dots[r] + b, true);
        }
      }
    }
  }
  return count;
}

// Units [begin, end) for all rows, tile by tile; returns the number of computed dot products.
// Throws std::bad_alloc when the scratch cannot be allocated.
int64_t ComputeUnits(const GatedDenseArgs& a, int64_t begin, int64_t end) {
  const TileShape tile = ChooseTileShape(a, begin, end);
  TileScratch scratch(tile);
  int64_t computed = 0;
  for (int64_t unit_begin = begin; unit_begin < end; unit_begin += tile.units) {
    const int64_t unit_end = std::min(end, unit_begin + tile.units);
    for (int64_t row_begin = 0; row_begin < a.batch; row_begin += tile.rows) {
      const int64_t row_end = std::min(a.batch, row_begin + tile.rows);
      computed += ComputeTile(a, unit_begin, unit_end, row_begin, row_end, scratch);
    }
  }
  return computed;
}

// The density of a sample of the estimates: enough to tell the thread pool how much work a
// unit is, so that small jobs stay on one thread (waking another costs tens of microseconds).
double SampledDensity(const float* product, const float* bias, int64_t batch, int64_t units,
                      float margin) {
  // Whole rows from the start of the batch, at least one and about 4096 estimates in all.
  const int64_t rows = std::min<int64_t>(batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(units, 1)));
  int64_t selected = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < units; ++j) selected += UnitIsComputed(product[i * units + j] + bias[j], margin);
  }
  return rows > 0 && units > 0 ? static_cast<double>(selected) / (rows * units) : 0.0;
}

// The error when a shard could not allocate its scratch, with the largest tile any shard uses.
absl::Status ScratchExhausted(const GatedDenseArgs& a) {
  const TileShape tile = ChooseTileShape(a, 0, a.units);
  return absl::ResourceExhaustedError(absl::StrCat(
      "LrcGatedDense: out of memory allocating the scratch of a tile of up to ", tile.units,
      " units x ", tile.rows, " rows (", TileScratch::Bytes(tile), " bytes a thread) for batch ",
      a.batch, ", input_dim ", a.input_dim, ", units ", a.units));
}

float Fraction(int64_t count, int64_t batch, int64_t units) {
  return static_cast<float>(static_cast<double>(count) / (static_cast<double>(batch) * units));
}

}  // namespace

template <>
void GatedDenseFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const GatedDenseArgs& a) {
  *a.active_fraction = 0.f;
  if (a.batch == 0 || a.units == 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const double density = SampledDensity(a.product, a.bias, a.batch, a.units, a.margin);
  // Cycles per unit: the scan of its estimates, and ~4 multiply-adds a cycle for its rows.
  const int64_t unit_cost = a.batch * (2 + static_cast<int64_t>(density * a.input_dim / 4));
  std::atomic<int64_t> computed{0};
  // An exception escaping a worker thread would abort the process: a shard whose scratch cannot
  // be allocated records it instead, and the op fails with an error Python can catch.
  std::atomic<bool> out_of_memory{false};
  workers->ParallelFor(a.units, unit_cost, [&](int64_t begin, int64_t end) {
    try {
      computed += ComputeUnits(a, begin, end);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  });
  OP_REQUIRES(ctx, !out_of_memory.load(), ScratchExhausted(a));
  *a.active_fraction = Fraction(computed.load(), a.batch, a.units);
}

template <>
void MaskedReluFunctor<Eigen::ThreadPoolDevice>::operator()(tensorflow::OpKernelContext* ctx,
                                                             const MaskedReluArgs& a) {
  *a.active_fraction = 0.f;
  if (a.batch == 0 || a.units == 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  std::atomic<int64_t> computed{0};
  workers->ParallelFor(a.batch, 4 * a.units, [&](int64_t begin, int64_t end) {
    // Locals, not a.*: a store through y could otherwise alias a.margin and block vectorising.
    // y may be z's or product's buffer (forwarded): element k is read before it is written.
    const float* z = a.z;
    const float* product = a.product;
    const float* bias = a.bias;
    float* y = a.y;
    const float margin = a.margin;
    const int64_t units = a.units;
    int64_t count = 0;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < units; ++j) {
        const bool selected = UnitIsComputed(product[i * units + j] + bias[j], margin);
        y[i * units + j] = MaskedRelu(z[i * units + j] + bias[j], selected);
        count += selected;
      }
    }
    computed += count;
  });
  *a.active_fraction = Fraction(computed.load(), a.batch, a.units);
}

}  // namespace lrc
