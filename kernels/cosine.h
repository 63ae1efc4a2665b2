#pragma once
// The similarity analysis' CPU kernels: cosines between the columns of
// attention maps and between block outputs, on raw float32 memory.
//
// Why: DeepViT's cross-layer similarity needs, per column of every map, the
// cosines between all pairs of blocks (and of heads). As LibTorch ops that
// is a transposed copy of the maps and [L, T] x [T, L] Gram matrices by
// bmm, which LibTorch 1.13's CPU build took 2.5 times as long over; here a
// 3x3 tile of dot products over 8 columns at a time stays in registers, and
// the maps are read in column blocks (the packed layout below) once per
// image (docs/BENCHMARKS.md). GCC/Clang vector types (kernels/simd.h),
// compiled for AVX2+FMA and for the baseline.
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>

namespace vitlab {

// Attention maps packed by column blocks, the layout in which these kernels
// read columns: an N x N map (N >= 8) as [packed_blocks(N), N, 8], block i
// holding columns packed_column_start(i, N) to + 8 of every row; the last
// block overlaps the one before when 8 does not divide N. A block's maps
// come as [B, H, packed_blocks(N), N, 8] (analysis/map_packing.h packs them
// as the attention kernel hands them over, from cache).
constexpr int64_t kPackedWidth = 8;
inline int64_t packed_blocks(int64_t N) { return (N + kPackedWidth - 1) / kPackedWidth; }
inline int64_t packed_column_start(int64_t i, int64_t N) { return std::min(i * kPackedWidth, N - kPackedWidth); }
void pack_map_columns(const float* map, int64_t N, float* packed);
// Where column t of a packed map lies among its blocks' lanes, flattened
// ([blocks * 8]), for every t < N.
torch::Tensor packed_column_index(int64_t N);
// Whether t is a block's packed maps [B, H, blocks, N, 8].
bool is_packed_maps(const torch::Tensor& t);
// Packed maps [..., blocks, N, 8] back as [..., N, N]; other tensors as they are.
torch::Tensor unpack_maps(const torch::Tensor& maps);

// dots[p][q][w] = Σ_r columns[p][r * 8 + w] · columns[q][r * 8 + w] for
// every p, q < K (both halves): the lane-wise dot products of K blocks of
// 8 columns of `rows` rows each. Unless `next` is null, prefetches the K
// column blocks next[0..K) (as many rows) meanwhile.
void column_dots(const float* const* columns, int64_t K, int64_t rows, float* dots, const float* const* next);

// The cosines of one block of 8 columns from their dot products (as
// column_dots writes them), for every pair p <= q, added to
// sum[pair * 8 + w] (pairs in row-major order); the lanes before `skip`
// (columns the previous block already had) add 0. Those >= tau are counted
// in above[pair * 8 + w] when above is not null, and the columns' squared
// norms added to squares[p * 8 + w] when squares is not null. Norms below
// eps count as eps. inv: scratch of K * 8 floats. False when a norm is not
// finite.
bool add_block_cosines(const float* dots, int64_t K, int64_t skip, float eps, float tau, float* sum, int32_t* above,
                       float* squares, float* inv);

// dots[p * K + q] = features[p] · features[q] for every p, q < K (both
// halves), for vectors of length D.
void vector_dots(const float* const* features, int64_t K, int64_t D, float* dots);

}  // namespace vitlab
