"""dipfast.kernels: fused Triton ops with their backward, registered as torch ops (dipfast::*).

This folder (kernels/ at the repository top) installs as the subpackage dipfast.kernels (setup.py).
Each op falls back to its plain-PyTorch twin in dipfast.reference where Triton cannot run.
"""

from dipfast.kernels.concat_bn_conv_bn_lrelu import concat_bn_conv_bn_lrelu, concat_bn_conv_bn_lrelu_path
from dipfast.kernels.conv_bn_lrelu import conv_bn_lrelu, conv_bn_lrelu_path
from dipfast.kernels.lanczos2 import lanczos2_downsample, lanczos2_mse, lanczos2_path

__all__ = [
    "concat_bn_conv_bn_lrelu",
    "concat_bn_conv_bn_lrelu_path",
    "conv_bn_lrelu",
    "conv_bn_lrelu_path",
    "lanczos2_downsample",
    "lanczos2_mse",
    "lanczos2_path",
]
