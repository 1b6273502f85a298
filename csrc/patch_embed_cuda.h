// Plain C++ launchers of the CUDA kernels in patch_embed_cuda.cu: raw pointers, sizes and a stream.
//
// The .cu file does not include torch or ATen (their headers take minutes to compile under nvcc on
// a small machine), only c10's CUDA error header; patch_embed.cpp does all ATen work (checks, allocation, strides, streams) and
// calls these. Every launcher checks each of its launches with C10_CUDA_KERNEL_LAUNCH_CHECK (a
// c10::Error naming the CUDA error).
#pragma once

#include <cuda_runtime_api.h>

#include "patch_embed_index.h"
#include "patch_embed_sum.h"

namespace vit_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// tokens (B, N + 1, D) = [cls_token; patches(images) @ weight^T + bias] + pos_embed, one pass.
void launch_patch_embed_forward(DType dtype,
                                const void* images, ImageStrides image_strides,  // (B, C, H, W)
                                const void* weight,     // (D, K) contiguous
                                const void* bias,       // (D,)
                                const void* cls_token,  // (D,)
                                const void* pos_embed,  // (N + 1, D) contiguous
                                void* out,              // (B, N + 1, D) contiguous
                                const PatchEmbedShape& shape, cudaStream_t stream);

// The fp32 workspace of the parameter gradients, as offsets (in floats) into one buffer of
// `total` floats: weight_partials (splits, D, K) with splits = weight_grad_splits(shape), then the
// column sums' partials and sums (patch_embed_sum.h): pos_partials (chunks(B), N + 1, D), pos_sums (N + 1, D),
// bias_partials (chunks(N), D).
struct BackwardWorkspace {
  int64_t weight_partials, pos_partials, pos_sums, bias_partials, total;
};
BackwardWorkspace backward_workspace(const PatchEmbedShape& shape, int64_t splits);

// Gradients of the parameters. grad_out (B, N + 1, D) contiguous; images read through strides;
// workspace: backward_workspace(shape, splits).total floats.
void launch_patch_embed_backward_params(DType dtype,
                                        const void* grad_out,
                                        const void* images, ImageStrides image_strides,
                                        float* workspace, int64_t splits,
                                        void* grad_weight,     // (D, K)
                                        void* grad_bias,       // (D,)
                                        void* grad_cls_token,  // (D,)
                                        void* grad_pos_embed,  // (N + 1, D)
                                        const PatchEmbedShape& shape, cudaStream_t stream);

// Gradient of the images: grad_images (B, C, H, W) contiguous = scatter(grad_patches @ weight).
void launch_patch_embed_backward_images(DType dtype,
                                        const void* grad_out,  // (B, N + 1, D) contiguous
                                        const void* weight,    // (D, K) contiguous
                                        void* grad_images,     // (B, C, H, W) contiguous
                                        const PatchEmbedShape& shape, cudaStream_t stream);

}  // namespace cuda
}  // namespace vit_fast
