// CUDA kernels of the fused patch embedding (forward and backward) and their plain C++ launchers.
//
// No torch or ATen include on purpose (they take minutes to compile under nvcc on a small
// machine): patch_embed.cpp does the ATen work and calls the launchers. Only c10's CUDA error
// header comes in, for C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. Index math comes from
// patch_embed_index.h and the column sums' order from patch_embed_sum.h, both shared with the CPU
// implementation.
//
// Design. The patch embedding is a GEMM whose A operand is gathered from the images:
//   tokens[b, 1 + n, :] = patches[b, n, :] @ W^T + bias + pos[1 + n],  patches[b, n, k] = pixel(n, k)
// PyTorch runs it as conv2d + flatten/transpose copy + cat copy + add, i.e. four passes over the
// (B, N + 1, D) tokens. Here one kernel gathers each patch straight from the images into shared
// memory, multiplies by a shared-memory tile of the weight, and writes each finished token once
// with bias, class token and positional embedding already added.
//
// All three GEMM-shaped kernels (forward, image gradient, weight gradient) share one SIMT tile
// loop, `tile_matmul`: a 64 x 64 output tile per 256-thread block, 4 x 4 outputs per thread,
// reduction in steps of 16 through shared memory, fp32 accumulation for every input dtype. The
// gather costs integer divisions (token -> image, patch; k -> channel, row, column); they are
// paid once per tile row and once per k into shared-memory offset tables, not per element
// (see Operand).
//
// Why SIMT and not tensor cores / a library GEMM:
//  * CIFAR (p = 4, K = C * p * p = 48, D = 192): K is tiny, so the work is bound by memory traffic
//    (each token costs 48 MACs per output element against reading 48 pixels and writing D values);
//    the whole weight is read once per 64 tokens, and the gather and epilogue fusion is what saves
//    time. A direct kernel is the right tool here.
//  * ImageNet-style 16 x 16 patches (K = 768): 768 MACs per output element make the op
//    compute-bound, where tensor cores (cuBLAS on an im2col copy, followed by our epilogue
//    kernel) could beat this SIMT loop despite the extra pass over the patches. We keep the one
//    direct kernel for both cases for now: no GPU was available when this was written, so the
//    choice could not be measured. benchmarks/bench_patch_embed.py times both patch sizes against
//    cuDNN's conv2d; if the GEMM alternative wins at K = 768 it belongs behind a size switch in
//    patch_embed.cpp.
//
// Determinism: no atomics, and every summation order comes from the shape alone
// (patch_embed_sum.h), the orders the CPU implementation runs too. The weight gradient reduces
// over the B * N patch rows in weight_grad_splits slices (one fp32 partial each) that a second
// kernel sums in slice order; the bias, class-token and positional-embedding gradients are column
// sums in two levels (chunks of 16 rows reduced in parallel, then the chunk partials in order).
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "patch_embed_cuda.h"
#include "patch_embed_sum.h"

namespace vit_fast {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Tile shape of tile_matmul. 16 x 16 threads; thread (tx, ty) owns rows ty + 16 * i and columns
// tx + 16 * j, so a warp's shared-memory reads of the B tile hit 16 consecutive words (no bank
// conflicts) and its reads of the A tile are 2 broadcasts.
constexpr int kThreads = 256;
constexpr int BLOCK_M = 64;
constexpr int BLOCK_N = 64;
constexpr int BLOCK_K = 16;
constexpr int THREAD_M = BLOCK_M / 16;
constexpr int THREAD_N = BLOCK_N / 16;
static_assert(BLOCK_M == kWeightGradTile && BLOCK_N == kWeightGradTile,
              "weight_grad_splits (patch_embed_sum.h) counts the weight gradient's blocks with this tile");

// Threads per block of the element-wise reductions (weight-gradient slices, column sums).
constexpr int kSumThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A GEMM operand whose element (outer, k) lives at data[outer(outer) + reduction(k)]: `outer`
// indexes the output rows (operand A) or columns (operand B), k the reduction. Every operand of
// the patch embedding has this separable form, the gathered image patches included
// (patch_origin_offset + patch_inner_offset), so tile_matmul evaluates `outer` once per tile row
// and `reduction` once per reduction step into shared-memory offset tables: the integer divisions
// that locate a patch's pixels are paid per row and per k, not per element. An offset of -1 reads
// as zero (outside the matrix, or a class-token row).
template <typename T, class Outer, class Reduction>
struct Operand {
  const T* data;
  Outer outer;          // (int64_t index) -> int64_t offset, or -1
  Reduction reduction;  // (int64_t k) -> int64_t offset; called only for k in range
};

template <typename T, class Outer, class Reduction>
__device__ __forceinline__ Operand<T, Outer, Reduction> make_operand(const T* data, Outer outer, Reduction reduction) {
  return Operand<T, Outer, Reduction>{data, outer, reduction};
}

// acc[i][j] += sum_{k in [k_begin, k_end)} A(m0 + ty + 16 i, k) * B(k, n0 + tx + 16 j), in fp32.
// A_K_FASTEST / B_K_FASTEST pick which index consecutive threads walk when filling the tiles: the
// one along which the operand is contiguous in global memory, so the loads coalesce. The +1
// padding keeps the transposing shared-memory stores free of bank conflicts either way.
template <bool A_K_FASTEST, bool B_K_FASTEST, class OperandA, class OperandB>
__device__ __forceinline__ void tile_matmul(int64_t m0, int64_t n0, int64_t k_begin, int64_t k_end,
                                            const OperandA& a, const OperandB& b,
                                            float (&acc)[THREAD_M][THREAD_N]) {
  __shared__ float a_tile[BLOCK_K][BLOCK_M + 1];
  __shared__ float b_tile[BLOCK_K][BLOCK_N + 1];
  __shared__ int64_t a_outer[BLOCK_M], b_outer[BLOCK_N];     // per tile row / column, once
  __shared__ int64_t a_reduction[BLOCK_K], b_reduction[BLOCK_K];  // per reduction step
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  static_assert(kThreads >= BLOCK_M && kThreads >= BLOCK_N && kThreads >= 2 * BLOCK_K, "one table entry per thread");

  if (tid < BLOCK_M) a_outer[tid] = a.outer(m0 + tid);
  if (tid < BLOCK_N) b_outer[tid] = b.outer(n0 + tid);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BLOCK_K) {
    if (tid < BLOCK_K) {
      a_reduction[tid] = k0 + tid < k_end ? a.reduction(k0 + tid) : -1;
    } else if (tid < 2 * BLOCK_K) {
      b_reduction[tid - BLOCK_K] = k0 + tid - BLOCK_K < k_end ? b.reduction(k0 + tid - BLOCK_K) : -1;
    }
    __syncthreads();  // tables ready (and, on the first step, the outer tables too)
    for (int e = tid; e < BLOCK_M * BLOCK_K; e += kThreads) {
      const int kk = A_K_FASTEST ? e % BLOCK_K : e / BLOCK_M;
      const int mm = A_K_FASTEST ? e / BLOCK_K : e % BLOCK_M;
      const int64_t row = a_outer[mm], col = a_reduction[kk];
      a_tile[kk][mm] = row >= 0 && col >= 0 ? to_float(a.data[row + col]) : 0.f;
    }
    for (int e = tid; e < BLOCK_N * BLOCK_K; e += kThreads) {
      const int kk = B_K_FASTEST ? e % BLOCK_K : e / BLOCK_N;
      const int nn = B_K_FASTEST ? e / BLOCK_K : e % BLOCK_N;
      const int64_t row = b_reduction[kk], col = b_outer[nn];
      b_tile[kk][nn] = row >= 0 && col >= 0 ? to_float(b.data[row + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BLOCK_K; ++kk) {
      float a_frag[THREAD_M], b_frag[THREAD_N];
#pragma unroll
      for (int i = 0; i < THREAD_M; ++i) a_frag[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < THREAD_N; ++j) b_frag[j] = b_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
    }
    __syncthreads();  // tiles and reduction tables are overwritten by the next step
  }
}

// Grid (ceil(B * (N + 1) / BLOCK_M), ceil(D / BLOCK_N)): one tile of token rows x embedding dims.
template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed_forward_kernel(
    const T* __restrict__ images, ImageStrides image_strides,  // (B, C, H, W), any strides
    const T* __restrict__ weight,                              // (D, K)
    const T* __restrict__ bias,                                // (D,)
    const T* __restrict__ cls_token,                           // (D,)
    const T* __restrict__ pos_embed,                           // (N + 1, D)
    T* __restrict__ out,                                       // (B, N + 1, D)
    PatchEmbedShape s) {
  const int64_t rows = num_token_rows(s);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BLOCK_M;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * BLOCK_N;

  // Split the block's token rows into (image, token) once, before the tile loop: the split is a
  // 64-bit division, a called subroutine on the GPU, and values held across such calls (or calls
  // made with the accumulators live) cost the kernel a stack frame. The operand and the epilogue
  // read these tables.
  __shared__ int64_t row_origin[BLOCK_M];  // patch origin offset of the row, -1: class token or past the end
  __shared__ int row_token[BLOCK_M];       // token t of the row, -1 past the end
  const int tid = threadIdx.x;
  if (tid < BLOCK_M) {
    int64_t b = 0;
    int t = -1;
    if (row0 + tid < rows) split_token_row(row0 + tid, s.num_patches, &b, &t);
    row_token[tid] = t;
    row_origin[tid] = t > 0 ? patch_origin_offset(b, t - 1, s, image_strides) : -1;
  }
  __syncthreads();

  // A(r, k): pixel k of the patch behind token row r; class-token rows multiply zeros.
  const auto patches = make_operand(
      images, [&](int64_t r) { return row_origin[r - row0]; },
      [&](int64_t k) { return patch_inner_offset(static_cast<int>(k), s, image_strides); });
  // B(k, d) = weight[d, k]: contiguous along k.
  const auto weight_t = make_operand(
      weight, [&](int64_t d) -> int64_t { return d < s.dim ? d * s.inner : -1; }, [](int64_t k) { return k; });
  float acc[THREAD_M][THREAD_N] = {};
  tile_matmul</*A_K_FASTEST=*/true, /*B_K_FASTEST=*/true>(row0, d0, 0, s.inner, patches, weight_t, acc);

  const int tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < THREAD_M; ++i) {
    const int t = row_token[ty + 16 * i];
    if (t < 0) continue;
    const int64_t r = row0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < THREAD_N; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d >= s.dim) continue;
      float v = t == 0 ? to_float(cls_token[d]) : acc[i][j] + to_float(bias[d]);
      v += to_float(pos_embed[static_cast<int64_t>(t) * s.dim + d]);
      out[r * s.dim + d] = from_float<T>(v);
    }
  }
}

// Grid (ceil(B * N / BLOCK_M), ceil(K / BLOCK_N)): grad_patches (B * N, D) @ weight (D, K),
// scattered back to the pixels. Patches do not overlap, so each pixel is written exactly once.
template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed_backward_images_kernel(
    const T* __restrict__ grad_out,  // (B, N + 1, D)
    const T* __restrict__ weight,    // (D, K)
    T* __restrict__ grad_images,     // (B, C, H, W) contiguous
    PatchEmbedShape s) {
  const int64_t rows = num_patch_rows(s);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BLOCK_M;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BLOCK_N;

  // A(m, d): the gradient of patch row m's token, contiguous along d.
  const auto grad_patches = make_operand(
      grad_out,
      [&](int64_t m) -> int64_t { return m < rows ? token_row_of_patch_row(m, s.num_patches) * s.dim : -1; },
      [](int64_t d) { return d; });
  // B(d, k) = weight[d, k]: contiguous along k.
  const auto weight_op = make_operand(
      weight, [&](int64_t k) -> int64_t { return k < s.inner ? k : -1; }, [&](int64_t d) { return d * s.inner; });
  float acc[THREAD_M][THREAD_N] = {};
  tile_matmul</*A_K_FASTEST=*/true, /*B_K_FASTEST=*/false>(m0, k0, 0, s.dim, grad_patches, weight_op, acc);

  const ImageStrides contiguous = contiguous_image_strides(s);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int64_t inner[THREAD_N];
#pragma unroll
  for (int j = 0; j < THREAD_N; ++j) {
    const int64_t k = k0 + tx + 16 * j;
    inner[j] = k < s.inner ? patch_inner_offset(static_cast<int>(k), s, contiguous) : -1;
  }
#pragma unroll
  for (int i = 0; i < THREAD_M; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= rows) continue;
    const int64_t origin = patch_row_origin_offset(m, s, contiguous);
#pragma unroll
    for (int j = 0; j < THREAD_N; ++j) {
      if (inner[j] >= 0) grad_images[origin + inner[j]] = from_float<T>(acc[i][j]);
    }
  }
}

// Grid (ceil(D / BLOCK_M), ceil(K / BLOCK_N), splits): slice z of the reduction over patch rows,
// partials[z, d, k] = sum_{m in slice z} grad_patches[m, d] * patches[m, k].
template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed_weight_grad_partial_kernel(
    const T* __restrict__ grad_out,                            // (B, N + 1, D)
    const T* __restrict__ images, ImageStrides image_strides,  // (B, C, H, W), any strides
    float* __restrict__ partials,                              // (splits, D, K)
    int64_t rows_per_split, PatchEmbedShape s) {
  const int64_t rows = num_patch_rows(s);
  const int64_t d0 = static_cast<int64_t>(blockIdx.x) * BLOCK_M;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BLOCK_N;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < rows ? m_begin + rows_per_split : rows;

  // A(d, m) = grad_patches[m, d], contiguous along d.
  const auto grad_patches_t = make_operand(
      grad_out, [&](int64_t d) -> int64_t { return d < s.dim ? d : -1; },
      [&](int64_t m) { return token_row_of_patch_row(m, s.num_patches) * s.dim; });
  // B(m, k) = patches[m, k], gathered from the images.
  const auto patches = make_operand(
      images,
      [&](int64_t k) -> int64_t {
        return k < s.inner ? patch_inner_offset(static_cast<int>(k), s, image_strides) : -1;
      },
      [&](int64_t m) { return patch_row_origin_offset(m, s, image_strides); });
  float acc[THREAD_M][THREAD_N] = {};
  tile_matmul</*A_K_FASTEST=*/false, /*B_K_FASTEST=*/false>(d0, k0, m_begin, m_end, grad_patches_t, patches, acc);

  float* slice = partials + static_cast<int64_t>(blockIdx.z) * s.dim * s.inner;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < THREAD_M; ++i) {
    const int64_t d = d0 + ty + 16 * i;
    if (d >= s.dim) continue;
#pragma unroll
    for (int j = 0; j < THREAD_N; ++j) {
      const int64_t k = k0 + tx + 16 * j;
      if (k < s.inner) slice[d * s.inner + k] = acc[i][j];
    }
  }
}

// grad_weight[e] = sum_z partials[z, e] in slice order, one thread per element of (D, K).
template <typename T>
__global__ void __launch_bounds__(kSumThreads) patch_embed_weight_grad_reduce_kernel(
    const float* __restrict__ partials,  // (splits, D * K)
    T* __restrict__ grad_weight,         // (D * K,)
    int64_t splits, int64_t numel) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (e >= numel) return;
  float acc = 0.f;
  for (int64_t z = 0; z < splits; ++z) acc += partials[z * numel + e];
  grad_weight[e] = from_float<T>(acc);
}

// Level 1 of a column sum (patch_embed_sum.h) of the (rows, cols) row-major matrix x: grid
// (ceil(cols / kSumThreads), chunks), partials[c, j] = sum of x[r, j] over the rows r of chunk c.
// Consecutive threads walk j, so every load is coalesced.
template <typename T>
__global__ void __launch_bounds__(kSumThreads) patch_embed_column_sum_partial_kernel(
    const T* __restrict__ x,       // (rows, cols)
    float* __restrict__ partials,  // (chunks, cols)
    int64_t rows, int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (j >= cols) return;
  const int64_t chunk = blockIdx.y;
  partials[chunk * cols + j] = chunk_sum<float>([&](int64_t r) { return to_float(x[r * cols + j]); }, chunk, rows);
}

// Level 2: one thread per column j, out[j] = sum of partials[c, j] in chunk order, stored as T in
// `out`, in fp32 in `out_fp32` (when not null, for a further reduction) and, for j < head_cols,
// also in `head` (the class-token gradient is row 0 of the positional one).
template <typename T>
__global__ void __launch_bounds__(kSumThreads) patch_embed_column_sum_finish_kernel(
    const float* __restrict__ partials,  // (chunks, cols)
    T* __restrict__ out,                 // (cols,)
    float* __restrict__ out_fp32,        // (cols,) or null
    T* __restrict__ head,                // (head_cols,) or null
    int64_t chunks, int64_t cols, int64_t head_cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (j >= cols) return;
  const float sum = sum_of_partials<float>([&](int64_t c) { return partials[c * cols + j]; }, chunks);
  out[j] = from_float<T>(sum);
  if (out_fp32 != nullptr) out_fp32[j] = sum;
  if (j < head_cols) head[j] = from_float<T>(sum);
}

// out (cols,) = the column sums of x (rows, cols), two launches in the order of patch_embed_sum.h.
template <typename In, typename Out>
void column_sum(const In* x, int64_t rows, int64_t cols, float* partials, Out* out, float* out_fp32, Out* head,
                int64_t head_cols, cudaStream_t stream) {
  const int64_t chunks = num_sum_chunks(rows);
  const unsigned column_blocks = static_cast<unsigned>(ceil_div(cols, kSumThreads));
  if (chunks > 0) {  // no rows (images without patches): the finish kernel writes zeros
    patch_embed_column_sum_partial_kernel<In>
        <<<dim3(column_blocks, static_cast<unsigned>(chunks)), kSumThreads, 0, stream>>>(x, partials, rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  patch_embed_column_sum_finish_kernel<Out><<<column_blocks, kSumThreads, 0, stream>>>(partials, out, out_fp32, head,
                                                                                      chunks, cols, head_cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward(const void* images, ImageStrides image_strides, const void* weight, const void* bias,
             const void* cls_token, const void* pos_embed, void* out, const PatchEmbedShape& s,
             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(num_token_rows(s), BLOCK_M)),
                  static_cast<unsigned>(ceil_div(s.dim, BLOCK_N)));
  patch_embed_forward_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(images), image_strides, static_cast<const T*>(weight),
      static_cast<const T*>(bias), static_cast<const T*>(cls_token), static_cast<const T*>(pos_embed),
      static_cast<T*>(out), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_params(const void* grad_out, const void* images, ImageStrides image_strides, float* workspace,
                     int64_t splits, void* grad_weight, void* grad_bias, void* grad_cls_token, void* grad_pos_embed,
                     const PatchEmbedShape& s, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad_out);
  const BackwardWorkspace w = backward_workspace(s, splits);

  const int64_t rows_per_split = weight_grad_rows_per_split(s, splits);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.dim, BLOCK_M)),
                  static_cast<unsigned>(ceil_div(s.inner, BLOCK_N)), static_cast<unsigned>(splits));
  patch_embed_weight_grad_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
      g, static_cast<const T*>(images), image_strides, workspace + w.weight_partials, rows_per_split, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t weight_numel = static_cast<int64_t>(s.dim) * s.inner;
  patch_embed_weight_grad_reduce_kernel<T>
      <<<static_cast<unsigned>(ceil_div(weight_numel, kSumThreads)), kSumThreads, 0, stream>>>(
          workspace + w.weight_partials, static_cast<T*>(grad_weight), splits, weight_numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // grad_pos_embed[t, d] = sum_b grad_out[b, t, d] (kept in fp32 too), grad_cls_token = its row 0.
  const int64_t tokens = s.num_patches + 1;
  column_sum(g, s.batch, tokens * s.dim, workspace + w.pos_partials, static_cast<T*>(grad_pos_embed),
                workspace + w.pos_sums, static_cast<T*>(grad_cls_token), s.dim, stream);
  // grad_bias[d] = sum_{t >= 1} pos_sums[t, d]: the bias reaches every patch token, not the class token.
  column_sum(static_cast<const float*>(workspace + w.pos_sums + s.dim), s.num_patches, s.dim,
             workspace + w.bias_partials, static_cast<T*>(grad_bias), nullptr, static_cast<T*>(nullptr), 0, stream);
}

template <typename T>
void backward_images(const void* grad_out, const void* weight, void* grad_images, const PatchEmbedShape& s,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(num_patch_rows(s), BLOCK_M)),
                  static_cast<unsigned>(ceil_div(s.inner, BLOCK_N)));
  patch_embed_backward_images_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<const T*>(weight), static_cast<T*>(grad_images), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(T{}) with the CUDA element type T of dtype.
template <class Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  TORCH_CHECK(false, "patch_embed (CUDA): unknown dtype code ", static_cast<int>(dtype));
}

}  // namespace

void launch_patch_embed_forward(DType dtype, const void* images, ImageStrides image_strides, const void* weight,
                                const void* bias, const void* cls_token, const void* pos_embed, void* out,
                                const PatchEmbedShape& shape, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    forward<decltype(tag)>(images, image_strides, weight, bias, cls_token, pos_embed, out, shape, stream);
  });
}

BackwardWorkspace backward_workspace(const PatchEmbedShape& shape, int64_t splits) {
  const int64_t tokens_x_dim = static_cast<int64_t>(shape.num_patches + 1) * shape.dim;
  BackwardWorkspace w;
  w.weight_partials = 0;
  w.pos_partials = w.weight_partials + splits * static_cast<int64_t>(shape.dim) * shape.inner;
  w.pos_sums = w.pos_partials + num_sum_chunks(shape.batch) * tokens_x_dim;
  w.bias_partials = w.pos_sums + tokens_x_dim;
  w.total = w.bias_partials + num_sum_chunks(shape.num_patches) * shape.dim;
  return w;
}

void launch_patch_embed_backward_params(DType dtype, const void* grad_out, const void* images,
                                        ImageStrides image_strides, float* workspace, int64_t splits,
                                        void* grad_weight, void* grad_bias, void* grad_cls_token,
                                        void* grad_pos_embed, const PatchEmbedShape& shape, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    backward_params<decltype(tag)>(grad_out, images, image_strides, workspace, splits, grad_weight, grad_bias,
                                   grad_cls_token, grad_pos_embed, shape, stream);
  });
}

void launch_patch_embed_backward_images(DType dtype, const void* grad_out, const void* weight, void* grad_images,
                                        const PatchEmbedShape& shape, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) { backward_images<decltype(tag)>(grad_out, weight, grad_images, shape, stream); });
}

}  // namespace cuda
}  // namespace vit_fast
