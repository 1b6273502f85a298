"""The training batch's augmentation, batched, per image, on the device: the DeiT / Lee et al.
(2021) CIFAR ViT recipe.

Every random draw comes from the ``torch.Generator`` passed in (the epoch's device generator), every
shape is fixed by the batch shape alone, and nothing reads a tensor back to the host, so a batch can
be built inside a captured CUDA graph and a run is exactly repeatable and resumable.

One module per job, each importing only those above it in this list:

- ``config``: ``AugmentConfig``, the one augmentation config (the recipe's field names);
- ``image_ops``: batched uint8 image operations with a per-image magnitude, matched to
  ``torchvision.transforms.v2.functional`` per image, and ``apply_ops`` (one policy step);
- ``policies``: the AutoAugment CIFAR-10 policy, RandAugment and TrivialAugment-Wide (``Policy``:
  each image draws its own sub-policy, ops, magnitudes and signs);
- ``erasing``: random erasing (Zhong et al. 2020) on uint8 or normalised batches;
- ``mixing``: mixup / cutmix with a batched device Beta / Gamma sampler, and the targets;
- ``pipeline``: the batch in the recipe's order (crop and flip, the policy, normalisation,
  erasing, mixing): every draw apart from its application (``draw_batch``), and the batch built
  from the draws by torch ops or by two fused kernels (``build_batch``).

Datasets are ``vit_fast.datasets``; the loader that shuffles, shards and calls the pipeline is
``vit_fast.loader``. This package imports none of them, nor the recipes.
"""
