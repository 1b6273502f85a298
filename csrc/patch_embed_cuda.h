// Plain C++ launchers of the CUDA kernels in patch_embed_cuda.cu: raw pointers, sizes and a stream.
//
// The .cu file does not include torch (torch headers take minutes to compile under nvcc on a
// small machine); patch_embed.cpp does all ATen work (checks, allocation, strides, streams) and
// calls these. Every launcher returns the launch status (cudaGetLastError) for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include "patch_embed_index.h"

namespace vit_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// tokens (B, N + 1, D) = [cls_token; patches(images) @ weight^T + bias] + pos_embed, one pass.
cudaError_t launch_patch_embed_forward(DType dtype,
                                       const void* images, ImageStrides image_strides,  // (B, C, H, W)
                                       const void* weight,     // (D, K) contiguous
                                       const void* bias,       // (D,)
                                       const void* cls_token,  // (D,)
                                       const void* pos_embed,  // (N + 1, D) contiguous
                                       void* out,              // (B, N + 1, D) contiguous
                                       const PatchEmbedShape& shape, cudaStream_t stream);

// Number of slices the reduction over the B * N patch rows of the weight gradient is split into
// (each slice writes its own fp32 partial; a second kernel sums them in a fixed order).
int patch_embed_weight_grad_splits(const PatchEmbedShape& shape, int num_sms);

// Gradients of the parameters. grad_out (B, N + 1, D) contiguous; images read through strides.
// Workspaces: weight_partials (splits, D, K) fp32, pos_sums (N + 1, D) fp32.
cudaError_t launch_patch_embed_backward_params(DType dtype,
                                               const void* grad_out,
                                               const void* images, ImageStrides image_strides,
                                               float* weight_partials, int splits, float* pos_sums,
                                               void* grad_weight,     // (D, K)
                                               void* grad_bias,       // (D,)
                                               void* grad_cls_token,  // (D,)
                                               void* grad_pos_embed,  // (N + 1, D)
                                               const PatchEmbedShape& shape, cudaStream_t stream);

// Gradient of the images: grad_images (B, C, H, W) contiguous = scatter(grad_patches @ weight).
cudaError_t launch_patch_embed_backward_images(DType dtype,
                                               const void* grad_out,  // (B, N + 1, D) contiguous
                                               const void* weight,    // (D, K) contiguous
                                               void* grad_images,     // (B, C, H, W) contiguous
                                               const PatchEmbedShape& shape, cudaStream_t stream);

}  // namespace cuda
}  // namespace vit_fast
