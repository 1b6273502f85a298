// Index math of the patch embedding, shared by the CUDA kernels (patch_embed_cuda.cu) and the CPU
// implementation (patch_embed.cpp), so the CPU tests exercise the exact indexing the GPU runs.
//
// Plain C++ (no torch, no CUDA headers): the .cu file includes it without pulling in torch.
//
// Conventions (the layout of vit_fast.reference.patch_embed):
//   images  (B, C, H, W), any strides        Hp = H / p, Wp = W / p, N = Hp * Wp patches
//   weight  (D, K), K = C * p * p            the Conv2d weight (D, C, p, p) seen as a matrix
//   tokens  (B, N + 1, D)                    token 0 is the class token, token t >= 1 is patch t - 1
//   patch n = ph * Wp + pw (row-major over the patch grid); inner index k = (c * p + i) * p + j,
//   the order of the Conv2d weight, so patch n's k-th value is pixel (c, ph * p + i, pw * p + j).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VIT_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VIT_FAST_HOST_DEVICE inline
#endif

namespace vit_fast {

// Sizes of one problem, computed once on the host (patch_embed.cpp) and passed by value to the
// kernels. Per-image indices fit in 32 bits; anything multiplied by the batch is 64-bit.
struct PatchEmbedShape {
  int64_t batch;        // B
  int channels;         // C
  int height, width;    // H, W (multiples of patch)
  int patch;            // p
  int grid_w;           // Wp = W / p
  int num_patches;      // N = (H / p) * (W / p)
  int inner;            // K = C * p * p
  int dim;              // D
};

// Element strides of the (B, C, H, W) images: channels_last or sliced inputs are read in place.
struct ImageStrides {
  int64_t b, c, h, w;
};

// Number of token rows (B * (N + 1)) and of patch rows (B * N) of a problem.
VIT_FAST_HOST_DEVICE int64_t num_token_rows(const PatchEmbedShape& s) {
  return s.batch * (s.num_patches + 1);
}
VIT_FAST_HOST_DEVICE int64_t num_patch_rows(const PatchEmbedShape& s) {
  return s.batch * s.num_patches;
}

// Token row r = b * (N + 1) + t of the (B, N + 1, D) output -> image b and token t.
VIT_FAST_HOST_DEVICE void split_token_row(int64_t r, int num_patches, int64_t* b, int* t) {
  *b = r / (num_patches + 1);
  *t = static_cast<int>(r - *b * (num_patches + 1));
}

// Patch row m = b * N + n (the rows of the patch matrix, class tokens excluded) -> the token row
// of the output that holds that patch's embedding.
VIT_FAST_HOST_DEVICE int64_t token_row_of_patch_row(int64_t m, int num_patches) {
  const int64_t b = m / num_patches;
  return m + b + 1;  // b * (N + 1) + (n + 1) with n = m - b * N
}

// The element offset of pixel (c, ph * p + i, pw * p + j) of image b splits into a part that
// depends only on the patch and a part that depends only on the inner index k:
//   offset(b, n, k) = patch_origin_offset(b, n) + patch_inner_offset(k)
// so kernels compute each part once per patch row and once per k (tables), not once per element.

// Offset of the top-left pixel of channel 0 of patch n = ph * Wp + pw of image b.
VIT_FAST_HOST_DEVICE int64_t patch_origin_offset(int64_t b, int n, const PatchEmbedShape& s, const ImageStrides& st) {
  const int ph = n / s.grid_w, pw = n - ph * s.grid_w;
  return b * st.b + static_cast<int64_t>(ph) * s.patch * st.h + static_cast<int64_t>(pw) * s.patch * st.w;
}

// Offset of inner index k = (c * p + i) * p + j (the Conv2d weight order) from a patch's origin.
VIT_FAST_HOST_DEVICE int64_t patch_inner_offset(int k, const PatchEmbedShape& s, const ImageStrides& st) {
  const int pp = s.patch * s.patch;
  const int c = k / pp, r = k - c * pp;
  const int i = r / s.patch, j = r - i * s.patch;
  return c * st.c + i * st.h + j * st.w;
}

// Origin offset of the patch in patch row m = b * N + n.
VIT_FAST_HOST_DEVICE int64_t patch_row_origin_offset(int64_t m, const PatchEmbedShape& s, const ImageStrides& st) {
  const int64_t b = m / s.num_patches;
  return patch_origin_offset(b, static_cast<int>(m - b * s.num_patches), s, st);
}

// Strides of a contiguous (B, C, H, W) tensor of this problem (the image gradient's layout).
VIT_FAST_HOST_DEVICE ImageStrides contiguous_image_strides(const PatchEmbedShape& s) {
  const int64_t plane = static_cast<int64_t>(s.height) * s.width;
  return ImageStrides{s.channels * plane, plane, s.width, 1};
}

}  // namespace vit_fast
