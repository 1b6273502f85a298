// The vit_fast._C extension: the fused patch embedding's op schema, input checks, CPU
// implementation and (when built WITH_CUDA) the CUDA dispatch that calls patch_embed_cuda.cu.
//
// Ops (namespace vit_fast; fake and autograd implementations live in vit_fast/fused/patch_embed.py):
//   patch_embed(images, weight, bias, cls_token, pos_embed) -> tokens (B, N + 1, D)
//   patch_embed_backward(grad_out, images, weight, needs)
//       -> (grad_images (B, C, H, W), grad_weight (D, C, p, p), grad_bias (D,), grad_cls_token (1, 1, D),
//           grad_pos_embed (1, N + 1, D))
// The whole backward is one op (one call per backward, like every vit_fast op). `needs` (five bools,
// the forward's inputs in order: images, weight, bias, cls_token, pos_embed) says which gradients
// are wanted; the others come back as empty (0,) placeholders in the images' dtype, as
// vit_fast::mlp_backward does. The image gradient's kernel runs only when needs[0] (the usual
// training step feeds images that do not require grad); the parameter gradients come from one
// pass that computes all four whenever any of them is needed, and the unwanted ones are dropped.
//
// Strides: images are read through their strides (channels_last and sliced batches need no copy);
// grad_out is made contiguous deliberately (an expanded stride-0 gradient from `.sum().backward()`
// is materialized once; every kernel then reads it with unit stride along D); weight, bias,
// cls_token and pos_embed are parameters and are made contiguous (a no-op in practice).
//
// The CPU implementation mirrors the CUDA kernels' math (fp32 accumulation for 16-bit types, a
// fixed reduction order, no cross-thread reductions, so results are deterministic) and calls the
// same index helpers of patch_embed_index.h. The parameter gradients are summed in the GPU's
// orders through the helpers of patch_embed_sum.h (two-level column sums for the positional
// embedding, class token and bias; row slices for the weight), so the CPU tests check the
// accuracy of those orders.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "patch_embed_index.h"
#include "patch_embed_sum.h"

#ifdef WITH_CUDA
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE headers, which a minimal
// toolkit (nvcc + cudart) does not have.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "patch_embed_cuda.h"
#endif

namespace vit_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Input checks: raised where the mistake is made, naming the offending shapes.

void check_same_dtype_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "patch_embed: ", name, " has dtype ", t.scalar_type(),
              " but images have dtype ", ref.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), "patch_embed: ", name, " is on ", t.device(), " but images are on ",
              ref.device());
}

// Shape of the problem from the weight (D, C, p, p), the image size and the batch, checking that
// the two agree.
PatchEmbedShape make_shape(int64_t batch, int64_t channels, int64_t height, int64_t width, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "patch_embed: weight must be a Conv2d weight of shape (D, C, p, p) with square patches, got ",
              weight.sizes());
  const int64_t p = weight.size(2);
  TORCH_CHECK(p >= 1, "patch_embed: patch size must be at least 1, got weight of shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == channels, "patch_embed: weight ", weight.sizes(), " expects ", weight.size(1),
              " input channels but the images have ", channels);
  TORCH_CHECK(height % p == 0 && width % p == 0, "patch_embed: image size (", height, ", ", width,
              ") must be a multiple of the patch size ", p, " (weight of shape ", weight.sizes(), ")");
  const int64_t inner = channels * p * p;
  const int64_t num_patches = (height / p) * (width / p);
  TORCH_CHECK(inner < INT32_MAX && num_patches < INT32_MAX && height < INT32_MAX && width < INT32_MAX &&
                  weight.size(0) < INT32_MAX,
              "patch_embed: per-image sizes must fit in 32 bits, got weight ", weight.sizes(), " and images of ",
              height, " x ", width);
  PatchEmbedShape s;
  s.batch = batch;
  s.channels = static_cast<int>(channels);
  s.height = static_cast<int>(height);
  s.width = static_cast<int>(width);
  s.patch = static_cast<int>(p);
  s.grid_w = static_cast<int>(width / p);
  s.num_patches = static_cast<int>(num_patches);
  s.inner = static_cast<int>(inner);
  s.dim = static_cast<int>(weight.size(0));
  return s;
}

PatchEmbedShape check_forward(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& cls_token, const at::Tensor& pos_embed) {
  TORCH_CHECK(images.dim() == 4, "patch_embed: images must have shape (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(at::isFloatingType(images.scalar_type()), "patch_embed: images must be floating point, got ",
              images.scalar_type());
  check_same_dtype_device(images, weight, "weight");
  check_same_dtype_device(images, bias, "bias");
  check_same_dtype_device(images, cls_token, "cls_token");
  check_same_dtype_device(images, pos_embed, "pos_embed");
  const PatchEmbedShape s = make_shape(images.size(0), images.size(1), images.size(2), images.size(3), weight);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == s.dim, "patch_embed: bias must have shape (", s.dim,
              ",) to match weight ", weight.sizes(), ", got ", bias.sizes());
  TORCH_CHECK(cls_token.dim() == 3 && cls_token.size(0) == 1 && cls_token.size(1) == 1 && cls_token.size(2) == s.dim,
              "patch_embed: cls_token must have shape (1, 1, ", s.dim, "), got ", cls_token.sizes());
  TORCH_CHECK(pos_embed.dim() == 3 && pos_embed.size(0) == 1 && pos_embed.size(1) == s.num_patches + 1 &&
                  pos_embed.size(2) == s.dim,
              "patch_embed: pos_embed must have shape (1, ", s.num_patches + 1, ", ", s.dim, ") for ", s.num_patches,
              " patches of images ", images.sizes(), " with weight ", weight.sizes(), ", got ", pos_embed.sizes());
  return s;
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weight, const PatchEmbedShape& s) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.batch && grad_out.size(1) == s.num_patches + 1 &&
                  grad_out.size(2) == s.dim,
              "patch_embed backward: grad_out must have shape (", s.batch, ", ", s.num_patches + 1, ", ", s.dim,
              "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), "patch_embed backward: grad_out has dtype ",
              grad_out.scalar_type(), " but weight has dtype ", weight.scalar_type());
  TORCH_CHECK(grad_out.device() == weight.device(), "patch_embed backward: grad_out is on ", grad_out.device(),
              " but weight is on ", weight.device());
}

ImageStrides image_strides(const at::Tensor& images) {
  return ImageStrides{images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
}

// ---------------------------------------------------------------------------------------------
// CPU implementation. Grain sizes keep at::parallel_for chunks large enough to amortize a task.

// patch_inner_offset(k) for every k: a patch's pixels are its origin plus these (the same
// separation the CUDA kernels use for their shared-memory offset tables).
std::vector<int64_t> inner_offsets(const PatchEmbedShape& s, const ImageStrides& st) {
  std::vector<int64_t> offsets(s.inner);
  for (int k = 0; k < s.inner; ++k) offsets[k] = patch_inner_offset(k, s, st);
  return offsets;
}

template <typename scalar_t>
void forward_cpu_impl(const scalar_t* images, ImageStrides st, const scalar_t* weight, const scalar_t* bias,
                      const scalar_t* cls_token, const scalar_t* pos_embed, scalar_t* out, const PatchEmbedShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<int64_t> inner = inner_offsets(s, st);
  at::parallel_for(0, num_token_rows(s), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> patch(s.inner);
    for (int64_t r = begin; r < end; ++r) {
      int64_t b;
      int t;
      split_token_row(r, s.num_patches, &b, &t);
      const scalar_t* pos_row = pos_embed + static_cast<int64_t>(t) * s.dim;
      scalar_t* out_row = out + r * s.dim;
      if (t == 0) {
        for (int d = 0; d < s.dim; ++d) out_row[d] = static_cast<acc_t>(cls_token[d]) + static_cast<acc_t>(pos_row[d]);
        continue;
      }
      const scalar_t* origin = images + patch_origin_offset(b, t - 1, s, st);
      for (int k = 0; k < s.inner; ++k) patch[k] = static_cast<acc_t>(origin[inner[k]]);
      for (int d = 0; d < s.dim; ++d) {
        const scalar_t* w_row = weight + static_cast<int64_t>(d) * s.inner;
        acc_t acc = 0;
        for (int k = 0; k < s.inner; ++k) acc += static_cast<acc_t>(w_row[k]) * patch[k];
        out_row[d] = (acc + static_cast<acc_t>(bias[d])) + static_cast<acc_t>(pos_row[d]);
      }
    }
  });
}

template <typename scalar_t>
void backward_params_cpu_impl(const scalar_t* grad_out, const scalar_t* images, ImageStrides st, scalar_t* grad_weight,
                              scalar_t* grad_bias, scalar_t* grad_cls_token, scalar_t* grad_pos_embed,
                              const PatchEmbedShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = s.num_patches + 1;

  // pos_sums[t, d] = sum_b grad_out[b, t, d] = grad_pos_embed; row 0 is grad_cls_token.
  std::vector<acc_t> pos_sums(tokens * s.dim);
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int d = 0; d < s.dim; ++d) {
        const scalar_t* g = grad_out + t * s.dim + d;
        const acc_t sum = two_level_sum<acc_t>([&](int64_t b) { return static_cast<acc_t>(g[b * tokens * s.dim]); },
                                               s.batch);
        pos_sums[t * s.dim + d] = sum;
        grad_pos_embed[t * s.dim + d] = sum;
      }
    }
  });
  for (int d = 0; d < s.dim; ++d) {
    grad_cls_token[d] = pos_sums[d];
    // The bias reaches every patch token, not the class token: rows 1..N of pos_sums.
    const acc_t* patch_sums = pos_sums.data() + s.dim + d;
    grad_bias[d] = two_level_sum<acc_t>([&](int64_t t) { return patch_sums[t * s.dim]; }, s.num_patches);
  }

  // grad_weight[d, k] = sum_m grad_patches[m, d] * patches[m, k]; gather the patches once.
  const int64_t rows = num_patch_rows(s);
  std::vector<acc_t> patches(rows * s.inner);
  const std::vector<int64_t> inner = inner_offsets(s, st);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* origin = images + patch_row_origin_offset(m, s, st);
      for (int k = 0; k < s.inner; ++k) patches[m * s.inner + k] = static_cast<acc_t>(origin[inner[k]]);
    }
  });
  // The GPU's order (patch_embed_sum.h): each slice of rows accumulated in row order, then the
  // slices' partials in slice order. (The GPU fuses each multiply-add; this loop rounds the
  // product first, unless the compiler contracts it.)
  const int64_t splits = weight_grad_splits(s);
  const int64_t rows_per_split = weight_grad_rows_per_split(s, splits);
  at::parallel_for(0, s.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> slice(s.inner), total(s.inner);
    for (int64_t d = begin; d < end; ++d) {
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t z = 0; z < splits; ++z) {
        std::fill(slice.begin(), slice.end(), acc_t(0));
        const int64_t m_end = std::min(rows, (z + 1) * rows_per_split);
        for (int64_t m = z * rows_per_split; m < m_end; ++m) {
          const acc_t g = static_cast<acc_t>(grad_out[token_row_of_patch_row(m, s.num_patches) * s.dim + d]);
          const acc_t* x = patches.data() + m * s.inner;
          for (int k = 0; k < s.inner; ++k) slice[k] += g * x[k];
        }
        for (int k = 0; k < s.inner; ++k) total[k] += slice[k];
      }
      for (int k = 0; k < s.inner; ++k) grad_weight[d * s.inner + k] = total[k];
    }
  });
}

template <typename scalar_t>
void backward_images_cpu_impl(const scalar_t* grad_out, const scalar_t* weight, scalar_t* grad_images,
                              const PatchEmbedShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const ImageStrides contiguous = contiguous_image_strides(s);
  const std::vector<int64_t> inner = inner_offsets(s, contiguous);
  at::parallel_for(0, num_patch_rows(s), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.inner);
    for (int64_t m = begin; m < end; ++m) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* g = grad_out + token_row_of_patch_row(m, s.num_patches) * s.dim;
      for (int d = 0; d < s.dim; ++d) {
        const acc_t gd = static_cast<acc_t>(g[d]);
        const scalar_t* w_row = weight + static_cast<int64_t>(d) * s.inner;
        for (int k = 0; k < s.inner; ++k) acc[k] += gd * static_cast<acc_t>(w_row[k]);
      }
      // Patches do not overlap: each pixel is written by exactly one (m, k).
      scalar_t* origin = grad_images + patch_row_origin_offset(m, s, contiguous);
      for (int k = 0; k < s.inner; ++k) origin[inner[k]] = acc[k];
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& images, const at::Tensor& weight_in, const at::Tensor& bias_in,
                       const at::Tensor& cls_in, const at::Tensor& pos_in) {
  const PatchEmbedShape s = check_forward(images, weight_in, bias_in, cls_in, pos_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor cls_token = cls_in.contiguous(), pos_embed = pos_in.contiguous();
  at::Tensor out = at::empty({s.batch, s.num_patches + 1, s.dim}, images.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_embed_cpu", [&] {
    forward_cpu_impl<scalar_t>(images.const_data_ptr<scalar_t>(), image_strides(images),
                               weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                               cls_token.const_data_ptr<scalar_t>(), pos_embed.const_data_ptr<scalar_t>(),
                               out.mutable_data_ptr<scalar_t>(), s);
  });
  return out;
}

using ParamGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // weight, bias, cls, pos
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // images, then ParamGrads

ParamGrads empty_param_grads(const at::Tensor& weight, const PatchEmbedShape& s) {
  const auto opts = weight.options();
  return {at::empty(weight.sizes(), opts), at::empty({s.dim}, opts), at::empty({1, 1, s.dim}, opts),
          at::empty({1, s.num_patches + 1, s.dim}, opts)};
}

// The gradients the backward is asked for: one flag per input of the forward, in its order.
constexpr int64_t kNumInputs = 5;
using Needs = std::array<bool, kNumInputs>;  // images, weight, bias, cls_token, pos_embed

// `needs` as Python prints a list, for the error message (the fake's words).
std::string python_list(const c10::List<bool>& needs) {
  std::string listed = "[";
  for (size_t i = 0; i < needs.size(); ++i) listed += std::string(i ? ", " : "") + (needs.get(i) ? "True" : "False");
  return listed + "]";
}

// A ValueError (TORCH_CHECK_VALUE), as the fake and vit_fast::mlp_backward raise.
Needs read_needs(const c10::List<bool>& needs) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(needs.size()) == kNumInputs,
                    "needs must list 5 booleans (images, weight, bias, cls_token, pos_embed), got ",
                    python_list(needs));
  Needs out;
  for (int64_t i = 0; i < kNumInputs; ++i) out[i] = needs.get(i);
  return out;
}

bool any_param(const Needs& need) { return need[1] || need[2] || need[3] || need[4]; }

PatchEmbedShape check_backward(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight) {
  TORCH_CHECK(images.dim() == 4, "patch_embed backward: images must have shape (B, C, H, W), got ", images.sizes());
  check_same_dtype_device(images, weight, "weight");
  const PatchEmbedShape s = make_shape(images.size(0), images.size(1), images.size(2), images.size(3), weight);
  check_grad_out(grad_out, weight, s);
  return s;
}

// The op's frame, shared by the CPU and CUDA implementations: grad_out made contiguous once, each
// part run only when one of its gradients is needed (images_grad(grad_out) -> grad_images,
// param_grads(grad_out) -> ParamGrads), and empty placeholders for the gradients not needed.
template <class ImagesGrad, class ParamGradsFn>
Grads backward_frame(const at::Tensor& grad_out_in, const at::Tensor& images, const Needs& need,
                     ImagesGrad&& images_grad, ParamGradsFn&& param_grads) {
  const at::Tensor grad_out = grad_out_in.contiguous();
  const auto not_needed = [&] { return at::empty({0}, images.options()); };
  at::Tensor grad_images = need[0] ? images_grad(grad_out) : not_needed();
  ParamGrads params = any_param(need) ? param_grads(grad_out) : ParamGrads{};
  auto& [grad_weight, grad_bias, grad_cls, grad_pos] = params;
  return {grad_images, need[1] ? grad_weight : not_needed(), need[2] ? grad_bias : not_needed(),
          need[3] ? grad_cls : not_needed(), need[4] ? grad_pos : not_needed()};
}

ParamGrads param_grads_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                           const PatchEmbedShape& s) {
  auto grads = empty_param_grads(weight, s);
  auto& [grad_weight, grad_bias, grad_cls, grad_pos] = grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patch_embed_backward_cpu", [&] {
    backward_params_cpu_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), images.const_data_ptr<scalar_t>(),
                                       image_strides(images), grad_weight.mutable_data_ptr<scalar_t>(),
                                       grad_bias.mutable_data_ptr<scalar_t>(), grad_cls.mutable_data_ptr<scalar_t>(),
                                       grad_pos.mutable_data_ptr<scalar_t>(), s);
  });
  return grads;
}

at::Tensor images_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight_in, const PatchEmbedShape& s) {
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor grad_images = at::empty({s.batch, s.channels, s.height, s.width}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "patch_embed_backward_images_cpu", [&] {
    backward_images_cpu_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                       grad_images.mutable_data_ptr<scalar_t>(), s);
  });
  return grad_images;
}

Grads backward_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                   const c10::List<bool>& needs) {
  const PatchEmbedShape s = check_backward(grad_out, images, weight);
  const Needs need = read_needs(needs);
  return backward_frame(
      grad_out, images, need, [&](const at::Tensor& g) { return images_grad_cpu(g, weight, s); },
      [&](const at::Tensor& g) { return param_grads_cpu(g, images, weight, s); });
}

// ---------------------------------------------------------------------------------------------
// CUDA: checks and allocation here, kernels in patch_embed_cuda.cu.
#ifdef WITH_CUDA

cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "patch_embed (CUDA): dtype ", t, " is not supported; expected float32, float16 or bfloat16");
  }
}

at::Tensor forward_cuda(const at::Tensor& images, const at::Tensor& weight_in, const at::Tensor& bias_in,
                        const at::Tensor& cls_in, const at::Tensor& pos_in) {
  const PatchEmbedShape s = check_forward(images, weight_in, bias_in, cls_in, pos_in);
  const cuda::DType dtype = cuda_dtype(images.scalar_type());
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor cls_token = cls_in.contiguous(), pos_embed = pos_in.contiguous();
  at::Tensor out = at::empty({s.batch, s.num_patches + 1, s.dim}, images.options());
  if (out.numel() == 0) return out;
  cuda::launch_patch_embed_forward(dtype, images.const_data_ptr(), image_strides(images), weight.const_data_ptr(),
                                   bias.const_data_ptr(), cls_token.const_data_ptr(), pos_embed.const_data_ptr(),
                                   out.mutable_data_ptr(), s, c10::cuda::getCurrentCUDAStream());
  return out;
}

ParamGrads param_grads_cuda(cuda::DType dtype, const at::Tensor& grad_out, const at::Tensor& images,
                            const at::Tensor& weight, const PatchEmbedShape& s) {
  auto grads = empty_param_grads(weight, s);
  auto& [grad_weight, grad_bias, grad_cls, grad_pos] = grads;
  if (s.dim == 0) return grads;
  if (s.batch == 0) {  // an empty batch contributes nothing to the parameter gradients
    for (auto* g : {&grad_weight, &grad_bias, &grad_cls, &grad_pos}) g->zero_();
    return grads;
  }
  // The column sums launch one row of blocks per chunk of 16 images, and a grid's y extent is at
  // most 65535.
  TORCH_CHECK(num_sum_chunks(s.batch) <= 65535, "patch_embed backward (CUDA): batch ", s.batch,
              " is too large; at most ", 65535 * kSumChunkRows, " images are supported");
  const int64_t splits = weight_grad_splits(s);
  at::Tensor workspace = at::empty({cuda::backward_workspace(s, splits).total}, grad_out.options().dtype(at::kFloat));
  cuda::launch_patch_embed_backward_params(dtype, grad_out.const_data_ptr(), images.const_data_ptr(),
                                           image_strides(images), workspace.mutable_data_ptr<float>(), splits,
                                           grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(),
                                           grad_cls.mutable_data_ptr(), grad_pos.mutable_data_ptr(), s,
                                           c10::cuda::getCurrentCUDAStream());
  return grads;
}

at::Tensor images_grad_cuda(cuda::DType dtype, const at::Tensor& grad_out, const at::Tensor& weight_in,
                            const PatchEmbedShape& s) {
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor grad_images = at::empty({s.batch, s.channels, s.height, s.width}, grad_out.options());
  if (grad_images.numel() == 0) return grad_images;
  if (s.dim == 0) return grad_images.zero_();
  cuda::launch_patch_embed_backward_images(dtype, grad_out.const_data_ptr(), weight.const_data_ptr(),
                                           grad_images.mutable_data_ptr(), s, c10::cuda::getCurrentCUDAStream());
  return grad_images;
}

// The two kernel launchers of patch_embed_cuda.cu behind one op: the image gradient's, then the
// parameter gradients', each only when needed.
Grads backward_cuda(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                    const c10::List<bool>& needs) {
  const PatchEmbedShape s = check_backward(grad_out, images, weight);
  const Needs need = read_needs(needs);
  const cuda::DType dtype = cuda_dtype(images.scalar_type());
  const c10::cuda::CUDAGuard guard(images.device());
  return backward_frame(
      grad_out, images, need, [&](const at::Tensor& g) { return images_grad_cuda(dtype, g, weight, s); },
      [&](const at::Tensor& g) { return param_grads_cuda(dtype, g, images, weight, s); });
}

#endif  // WITH_CUDA

}  // namespace
}  // namespace vit_fast

TORCH_LIBRARY(vit_fast, m) {
  // Fake (meta) and autograd implementations are registered from this Python module; torch
  // imports it if an op is traced before the user did.
  m.set_python_module("vit_fast.fused.patch_embed");
  m.def("patch_embed(Tensor images, Tensor weight, Tensor bias, Tensor cls_token, Tensor pos_embed) -> Tensor");
  m.def("patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, bool[] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vit_fast, CPU, m) {
  m.impl("patch_embed", &vit_fast::forward_cpu);
  m.impl("patch_embed_backward", &vit_fast::backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("patch_embed", &vit_fast::forward_cuda);
  m.impl("patch_embed_backward", &vit_fast::backward_cuda);
}
#endif

// A plain Python module: importing vit_fast._C loads this library, whose static initializers
// register the ops above. No pybind11 (torch/extension.h) keeps the build fast.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vit_fast C++/CUDA ops (torch.ops.vit_fast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
