// The summation orders of the patch embedding's parameter gradients, shared by the CUDA kernels
// (patch_embed_cuda.cu) and the CPU implementation (patch_embed.cpp), so the CPU tests measure the
// accuracy of the orders the GPU uses. Every order depends only on the problem's shape, never on
// the device (SM count) or the launch: results are reproducible bit for bit on a given GPU model
// and summed the same way everywhere.
//
// Plain C++ (no torch, no CUDA headers), like patch_embed_index.h.
//
// A column sum out[j] = sum_{r < rows} x(r, j) is a fixed two-level tree:
//   level 1: partial[c][j] = x(16 c, j) + x(16 c + 1, j) + ... (chunk c: rows [16 c, 16 c + 16)),
//            left to right from zero;
//   level 2: out[j] = partial[0][j] + partial[1][j] + ... left to right from zero.
// On the GPU, level 1 is one thread per (chunk, column) over a (columns, chunks) grid (so a batch
// of 128 gives 8 chunks, 8x the blocks of one pass per column) and level 2 one thread per column;
// the CPU evaluates the same two levels in the same order (no multiplications: equal results).
//
// Accuracy (fp32 sums of n values): the rounding error of this order grows with
// chunk + n / chunk additions (32 for n = 256) instead of n for one serial sum; for inputs of
// random sign the expected error is about sqrt(chunk + n / chunk) ulps of the sum of magnitudes.
#pragma once

#include <cstdint>

#include "patch_embed_index.h"

namespace vit_fast {

// Rows per level-1 chunk. 16 keeps level 2 short (8 partials for a CIFAR batch of 128) while a
// batch of 128 still splits into enough chunks to fill a GPU (65 x 192 columns x 8 chunks).
constexpr int kSumChunkRows = 16;

VIT_FAST_HOST_DEVICE int64_t num_sum_chunks(int64_t rows) { return (rows + kSumChunkRows - 1) / kSumChunkRows; }

// Level 1: the sum of x(r) over the rows r of chunk `chunk`, in row order. x(r) returns Acc.
template <typename Acc, class X>
VIT_FAST_HOST_DEVICE Acc chunk_sum(const X& x, int64_t chunk, int64_t rows) {
  const int64_t begin = chunk * kSumChunkRows;
  const int64_t end = begin + kSumChunkRows < rows ? begin + kSumChunkRows : rows;
  Acc acc = 0;
  for (int64_t r = begin; r < end; ++r) acc += x(r);
  return acc;
}

// Level 2: the sum of the chunk partials partial(c), in chunk order.
template <typename Acc, class Partial>
VIT_FAST_HOST_DEVICE Acc sum_of_partials(const Partial& partial, int64_t chunks) {
  Acc acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial(c);
  return acc;
}

// Both levels in one call (the CPU's way to run the GPU's order).
template <typename Acc, class X>
VIT_FAST_HOST_DEVICE Acc two_level_sum(const X& x, int64_t rows) {
  return sum_of_partials<Acc>([&](int64_t c) { return chunk_sum<Acc>(x, c, rows); }, num_sum_chunks(rows));
}

// The weight gradient grad_W[d, k] = sum_m grad_patches[m, d] * patches[m, k] over the B * N patch
// rows is split into `splits` slices of consecutive rows: each slice is accumulated in row order
// (one fp32 partial per slice: a CUDA block per (64 x 64 output tile, slice)), then the partials
// are summed in slice order. The split comes from the shape alone: enough slices for
// kWeightGradTargetBlocks blocks (two per SM of a 132-SM H100; fixed rather than read from the
// device so that every GPU and the CPU sum in one order), at least kWeightGradMinRows rows per
// slice, at most kWeightGradMaxSplits slices (the partials take splits * D * K fp32 values).
constexpr int kWeightGradTile = 64;  // the CUDA kernel's output tile, D x K (BLOCK_M = BLOCK_N)
constexpr int64_t kWeightGradTargetBlocks = 264;
constexpr int64_t kWeightGradMinRows = 128;
constexpr int64_t kWeightGradMaxSplits = 64;

inline int64_t weight_grad_splits(const PatchEmbedShape& s) {
  const int64_t tiles = ((s.dim + kWeightGradTile - 1) / kWeightGradTile) *
                        ((s.inner + kWeightGradTile - 1) / kWeightGradTile);
  const int64_t wanted = tiles > 0 ? (kWeightGradTargetBlocks + tiles - 1) / tiles : 1;
  int64_t most = num_patch_rows(s) / kWeightGradMinRows;
  most = most < kWeightGradMaxSplits ? most : kWeightGradMaxSplits;
  const int64_t splits = wanted < most ? wanted : most;
  return splits > 1 ? splits : 1;
}

// Patch rows per slice (the last slice may be shorter; none is empty: splits <= rows / 128 <= 64).
inline int64_t weight_grad_rows_per_split(const PatchEmbedShape& s, int64_t splits) {
  return (num_patch_rows(s) + splits - 1) / splits;
}

}  // namespace vit_fast
