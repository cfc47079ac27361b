"""The triton backend's block ops: a generator's blocks computed by the fused Triton kernels.

TritonBlocks is a dipfast.nets.blocks.BlockOps (install it with use_block_ops(net, TritonBlocks())):
    conv_bn_act(m, x)       -> dipfast.kernels.conv_bn_lrelu            for an eligible ConvBNAct
    merge(level, parts)     -> dipfast.kernels.concat_bn_conv_bn_lrelu  concat + merge_bn + level.up, when the level
                                                                        has a skip branch and level.up is eligible
    upsample(m, x)          -> dipfast.kernels.upsample_bilinear2x_fast for a bilinear x2 nn.Upsample (the
                               others: the reference module)
A ConvBNAct is eligible when the kernel computes exactly what its modules do: reflection padding by (k - 1) // 2
(or a 1x1 conv, which has no pad), no downsampler module after the conv, a square kernel in KERNEL_SIZES, stride
1 or 2, no dilation, a BatchNorm2d with affine parameters normalising with the batch statistics, an nn.LeakyReLU,
and an input the kernels take (fp32 or bf16, on the device they run on here). Anything else runs the reference
block (super()), so every net runs, block by block on whichever path fits; unfused_reason(m, x) says why a block
is not fused. level.up1x1 is not part of the merge: SkipLevel runs it after merge returns, as a ConvBNAct.

Precision follows the context, as the modules' own convolutions do: under torch.autocast (bf16) the block's input
and conv weight are cast to bf16 (what autocast does for the conv) and the kernels run on bf16 operands with fp32
accumulation and fp32 BatchNorm statistics, returning bf16; BatchNorm's parameters and the conv bias stay fp32.
Otherwise the input's dtype rules: fp32 with TF32 dots when torch.backends.cudnn.allow_tf32 (the kernels' flag,
dipfast.kernels.conv_bn_lrelu.tf32_enabled), IEEE dots when not (dipfast.engine.ieee_fp32).

PaddedBlocks (the native backend's block ops on CUDA: Backend.blocks 'padded') is dipfast.nets.padded_writes'
structure, which NativeBlocks shares, with the Triton ops of batch_norm_act.py for its BatchNorms and torch's (cuDNN's)
convolutions:
    bn_act                  batch_norm_act (BatchNorm + LeakyReLU, or BatchNorm alone), written reflection-padded
                            in the conv output's layout where a conv reads it (which then runs with padding=0)
    concat_bn               concat_batch_norm over (skip, deeper) straight into the buffer level.up's conv reads
    bilinear_x2             bilinear x2 and its transpose as Triton gathers (bilinear_x2.py: no atomics,
                            deterministic)
    conv                    a level's input (no BatchNorm writes it padded) padded by reflection_pad.py's gathers
A block whose BatchNorm or activation the ops do not compute (another activation, BatchNorm in eval mode with
running statistics, no affine parameters) or whose next conv does not pad by reflection takes the reference
computation, by the rules NativeBlocks follows too (dipfast.nets.fusable). Off the Triton path
(batch_norm_act_path) every op is its eager twin.

As BlockOps says, fused blocks do not update BatchNorm's running statistics (DIP never reads them). A fused block's
conv runs without its bias, which its BatchNorm cancels exactly (dipfast.nets.fusable.conv_bias_cancels): the bias
gets no gradient and keeps its value, and the output is the reference's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dipfast.kernels.batch_norm_act import batch_norm_act, concat_batch_norm
from dipfast.kernels.bilinear_x2 import upsample_bilinear2x_fast
from dipfast.kernels.concat_bn_conv_bn_lrelu import concat_bn_conv_bn_lrelu
from dipfast.kernels.conv_bn_lrelu import KERNEL_SIZES, STRIDES, conv_bn_lrelu, kernels_take
from dipfast.kernels.reflection_pad import reflection_pad
from dipfast.nets.bilinear_x2 import BilinearX2Upsample
from dipfast.nets.fusable import batch_norm_reason, cancelled_conv_biases, conv_bias_cancels
from dipfast.nets.layers import ConvBNAct, crop_to_smallest
from dipfast.nets.padded_writes import PaddedWrites

if TYPE_CHECKING:
    from dipfast.nets.skip import SkipLevel


def _kept_bias(m: ConvBNAct) -> torch.Tensor | None:
    """m's conv bias, or None where the fused op's training-mode BatchNorm cancels it exactly (as PaddedWrites leaves
    it out): no add in the forward, no sum of dy for its gradient in the backward (a reduction launch per conv)."""
    return None if conv_bias_cancels(m) else m.conv.conv2d.bias


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's conv computes in: autocast's on x's device, else x's."""
    return _autocast_dtype(x) or x.dtype


def _cast(t: torch.Tensor) -> torch.Tensor:
    """A conv operand (input or weight) as autocast hands it to the conv: in autocast's dtype where it is on."""
    dtype = _autocast_dtype(t)
    return t if dtype is None else t.to(dtype)


def _dtype_reason(dtype: torch.dtype, operand_dtypes, params, device: torch.device) -> str | None:
    if any(d != dtype for d in operand_dtypes):
        return f"conv operands are {sorted(map(str, set(operand_dtypes)))}, not all {dtype}"
    if any(p is not None and p.dtype not in (dtype, torch.float32) for p in params):
        return f"bias or BatchNorm parameters are neither {dtype} nor float32"
    if not kernels_take(dtype, device):
        return f"the kernels do not take {dtype} on {device.type} here"
    return None


def unfused_reason(m: ConvBNAct, x: torch.Tensor) -> str | None:
    """Why conv_bn_act(m, x) takes the reference block; None when the fused kernel runs."""
    pad_conv, conv = m.conv, m.conv.conv2d
    k = conv.kernel_size[0]
    if pad_conv.downsample is not None:
        return f"a {type(pad_conv.downsample).__name__} downsampler follows the conv"
    if conv.kernel_size != (k, k) or k not in KERNEL_SIZES:
        return f"kernel {conv.kernel_size} is not square in {KERNEL_SIZES}"
    if conv.stride[0] not in STRIDES or conv.stride != (conv.stride[0],) * 2:
        return f"stride {conv.stride} is not one of {STRIDES} on both axes"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.padding != (0, 0) or pad_conv.reflection_pad != (k - 1) // 2:
        return "zero padding (the kernels fold reflection padding only)"
    reason = batch_norm_reason(m.bn)
    if reason is not None:
        return reason
    if not isinstance(m.act, nn.LeakyReLU):
        return f"activation is {type(m.act).__name__}, not LeakyReLU"
    dtype = _compute_dtype(x)
    weight_dtype = dtype if _autocast_dtype(x) else conv.weight.dtype  # autocast casts the weight too
    return _dtype_reason(dtype, [dtype, weight_dtype], (conv.bias, m.bn.weight, m.bn.bias), x.device)


def _merge_unfused_reason(level: SkipLevel, parts: list[torch.Tensor]) -> str | None:
    """Why merge(level, parts) takes the reference merge; None when the fused merge kernel runs."""
    if len(parts) != 2:
        return "no skip branch: nothing to concatenate"
    up = level.up
    reason = unfused_reason(up, parts[0]) or batch_norm_reason(level.merge_bn)
    if reason is not None:
        return reason
    conv = up.conv.conv2d
    if conv.stride != (1, 1) or conv.groups != 1:  # the op's groups concatenate per group, not cat([skip, deeper])
        return "level.up is strided or grouped"
    if level.merge_bn.eps != up.bn.eps:
        return "merge_bn and level.up's BatchNorm differ in eps"
    dtype = _compute_dtype(parts[0])
    merge_bn = level.merge_bn
    return _dtype_reason(dtype, [_compute_dtype(p) for p in parts], (merge_bn.weight, merge_bn.bias), parts[0].device)


class TritonBlocks(BilinearX2Upsample):
    """ConvBNAct blocks and skip-level merges by the fused Triton kernels, the reference blocks elsewhere."""

    name = "triton"

    def unread_parameters(self, net: nn.Module) -> frozenset[str]:
        # the fused kernels leave these out; a block that falls back to the reference reads its bias all the same,
        # and its gradient still reaches the flat buffer (through the view: a fill more, not a wrong value)
        return cancelled_conv_biases(net)

    def conv_bn_act(self, m: ConvBNAct, x: torch.Tensor) -> torch.Tensor:
        if unfused_reason(m, x) is not None:
            return super().conv_bn_act(m, x)
        conv, bn = m.conv.conv2d, m.bn
        return conv_bn_lrelu(
            _cast(x),
            _cast(conv.weight),
            _kept_bias(m),
            bn.weight,
            bn.bias,
            stride=conv.stride[0],
            groups=conv.groups,
            eps=bn.eps,
            slope=m.act.negative_slope,
        )

    def merge(self, level: SkipLevel, parts: list[torch.Tensor]) -> torch.Tensor:
        if _merge_unfused_reason(level, parts) is not None:
            return super().merge(level, parts)
        skip, deeper = (_cast(p) for p in crop_to_smallest(parts))
        up, merge_bn = level.up, level.merge_bn
        conv = up.conv.conv2d
        return concat_bn_conv_bn_lrelu(
            skip,
            deeper,
            merge_bn.weight,
            merge_bn.bias,
            _cast(conv.weight),
            _kept_bias(up),
            up.bn.weight,
            up.bn.bias,
            eps=up.bn.eps,
            slope=up.act.negative_slope,
        )

    def bilinear_x2(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the module's backward is four zero-filled input-sized buffers, each scattered into
        # by an index_put with accumulation (atomics on a GPU); the Triton transpose is one deterministic gather.
        return upsample_bilinear2x_fast(x)


class PaddedBlocks(PaddedWrites):
    """Each BatchNorm + activation by batch_norm_act.py's ops, written padded for the conv that reads it
    (the structure: dipfast.nets.padded_writes)."""

    name = "padded"

    def bn_act(self, y: torch.Tensor, bn: nn.BatchNorm2d, slope: float, pad: int) -> torch.Tensor:
        return batch_norm_act(y, bn.weight, bn.bias, pad=pad, eps=bn.eps, negative_slope=slope)

    def concat_bn(self, skip: torch.Tensor, deeper: torch.Tensor, bn: nn.BatchNorm2d, pad: int) -> torch.Tensor:
        return concat_batch_norm(skip, deeper, bn.weight, bn.bias, pad=pad, eps=bn.eps)

    def bilinear_x2(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_bilinear2x_fast(x)

    def conv(self, m: ConvBNAct, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """A level's input, which no BatchNorm wrote padded: reflection_pad.py's gathers, not torch's CUDA pad (NCHW
        only, an atomic scatter backward), in the input's layout as the padded writes."""
        pad_conv = m.conv
        if not pad_conv.reflection_pad:
            return pad_conv(x, bias)
        return pad_conv.from_padded(reflection_pad(x, pad_conv.reflection_pad), bias)
