"""dipfast.kernels: fused Triton ops with their backward, registered as torch ops (dipfast::*).

This folder (kernels/ at the repository top) installs as the subpackage dipfast.kernels (setup.py).
Each op falls back to its plain-PyTorch twin in dipfast.reference where Triton cannot run. Every op has a
torch.func.vmap rule (vmap_fold.py), runs in fp32 (IEEE or TF32 dots) or on bf16 operands, and takes its tiles
from configs.py. TritonBlocks (blocks.py) is the triton backend's dipfast.nets.blocks.BlockOps; PaddedBlocks
(blocks.py) the native and compile backends' on CUDA (cuDNN convs, the BatchNorm + activation of batch_norm_act.py
written reflection-padded for the next conv, and a level's input padded by reflection_pad.py's gathers). FusedRules
(fused_rules.py) runs the fast step's rules after the backward (early stopping's included) in a few launches on CUDA.
The native step's kernels can launch as programmatic dependent launches on Hopper (dependent_launch.py: each waits at
its first instruction for the kernel before it).

Under your own torch.compile: Inductor's caches key a compiled backward on the traced forward graph, which names these
ops but not their autograd rules. dipfast's compiled calls tag the key with a hash of the ops' sources
(dipfast.compile_cache.compile_settings); compile inside `with compile_settings(True):` too, or clear Inductor's cache
after upgrading dipfast, or a cached backward may call an op as an older dipfast defined it.
"""

from dipfast.kernels.batch_norm_act import batch_norm_act, batch_norm_act_path, concat_batch_norm
from dipfast.kernels.blocks import PaddedBlocks, TritonBlocks
from dipfast.kernels.concat_bn_conv_bn_lrelu import concat_bn_conv_bn_lrelu, concat_bn_conv_bn_lrelu_path
from dipfast.kernels.conv_bn_lrelu import conv_bn_lrelu, conv_bn_lrelu_path
from dipfast.kernels.fused_rules import FusedRules
from dipfast.kernels.lanczos2 import lanczos2_downsample, lanczos2_mse, lanczos2_path
from dipfast.kernels.reflection_pad import reflection_pad, reflection_pad_path

__all__ = [
    "FusedRules",
    "PaddedBlocks",
    "TritonBlocks",
    "batch_norm_act",
    "batch_norm_act_path",
    "concat_batch_norm",
    "concat_bn_conv_bn_lrelu",
    "concat_bn_conv_bn_lrelu_path",
    "conv_bn_lrelu",
    "conv_bn_lrelu_path",
    "lanczos2_downsample",
    "lanczos2_mse",
    "lanczos2_path",
    "reflection_pad",
    "reflection_pad_path",
]
