"""GeneratorRunner: the forward of N networks of one structure, from their stacked parameters.

The N networks' parameters are stacked (torch.func.stack_module_state: every tensor gets a leading
axis of N) and held in one or two flat (N, P) buffers (flat_parameters.FlatParameters: Adam,
backtracking and the bf16 cast are one op each, not one per tensor). The generator runs either

- vectorised: vmap(functional_call) over views of them. The conv batching rule makes each conv a
  grouped conv (the Triton kernels' vmap rules fold the networks into groups the same way) and each
  BatchNorm keeps per-network statistics, so the N fits are exactly N separate DIPs (DESIGN.md,
  principle 4). One launch per layer: what a GPU wants.
- or one network at a time: the module once per network, its tensors loaded into the module's slots
  (flat_parameters.ModuleSlots; functional_call where the generator is compiled). What a CPU wants,
  where grouped convs are slower than separate ones.

optionally under torch.compile. precision='bf16' runs it under autocast with the conv weights cast to
bf16 once per step (in FlatParameters); the cropped output comes back in fp32. Autocast does not reach a
convolution's batching rule inside vmap, so the vectorised path casts its convolutions' operands itself
(vmap_autocast).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dipfast.backends import Plan
from dipfast.flat_parameters import FlatParameters, ModuleSlots
from dipfast.nets.aligned_channels import align_conv_channels
from dipfast.nets.blocks import use_block_ops
from dipfast.nets.layers import centre_crop
from dipfast.vmap_autocast import bf16_convolutions


def channels_last_stacked(t: torch.Tensor) -> torch.Tensor:
    """A stacked (N, A, C, H, W) tensor whose (A, C, H, W) slices are channels_last; others as they are."""
    if t.dim() != 5:
        return t
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class GeneratorRunner:
    """Runs N same-structure networks: `runner(z)` with z (N, 1, D, H', W') -> (N, C, H, W) fp32, cropped."""

    def __init__(
        self, networks: list[nn.Module], out_size: tuple[int, int], plan: Plan, device: torch.device, vectorised: bool
    ):
        self.plan, self.device, self.out_size, self.vectorised = plan, device, out_size, vectorised
        params, buffers = stack_module_state(networks)
        self.channels_last = plan.channels_last(device) and not vectorised  # grouped convs stay NCHW
        cast = torch.bfloat16 if plan.precision == "bf16" else None  # autocast's, done once per step
        ops = plan.block_ops(device)
        self.flat = FlatParameters(
            params, networks[0], device, cast, self.channels_last, plan.aligned_parameters(device),
            ops.unread_parameters(networks[0]),
        )  # fmt: skip
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        # the structure; each call brings the weights in
        self.module = use_block_ops(networks[0].to(device), ops)
        align_conv_channels(self.module, plan.channel_multiple(device))
        # eager: the module's own tensor slots take each step's parameters (it is this runner's alone)
        self.slots = None if plan.compile else ModuleSlots(self.module)
        generate = self._generate_many if vectorised else self._generate_each
        options = plan.inductor_options()
        self._generate = torch.compile(generate, dynamic=False, options=options) if plan.compile else generate

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """t in the layout the generator's input takes."""
        return channels_last_stacked(t) if self.channels_last else t

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        in_vmap = bf16_convolutions() if self.vectorised and self.plan.precision == "bf16" else contextlib.nullcontext()
        # a compiled generator's cache settings are its caller's: Plan.step_math wraps every call, backward included
        with self.plan.autocast(self.device), in_vmap:
            out = self._generate(self.flat.buffers, self.buffers, z)
        return centre_crop(out.squeeze(1).float(), self.out_size)  # squeeze: a view both ways; [:, 0]'s backward fills

    def _generate_each(self, flat, buffers, z):
        outs = []
        for i, params in enumerate(self.flat.per_network(flat)):
            one = params, {k: v[i] for k, v in buffers.items()}
            if self.slots is None:
                outs.append(functional_call(self.module, one, (z[i],)))
            else:
                self.slots.load(*one)
                outs.append(self.module(z[i]))
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)  # one network: a view, not stack's copy

    def _generate_many(self, flat, buffers, z):
        params = self.flat.stacked(flat)
        return vmap(lambda p, b, x: functional_call(self.module, (p, b), (x,)))(params, buffers, z)
