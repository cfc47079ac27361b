"""NVTX ranges around the phases of a DIP step, for Nsight Systems timelines.

    with phase("forward"):
        out = net(z)

Off by default: phase() then returns one shared nullcontext (no allocation, no call into
NVTX). enable() turns the ranges on when the `nvtx` package imports; without it they stay a
no-op. Inside a torch.compile trace phase() is always the nullcontext, so it never breaks a
graph. With no profiler attached the NVTX calls themselves are no-ops in the C library.

The reference engine has no phase hooks of its own, so reference_hooks() marks its phases from
outside with global module, autograd and optimizer hooks: forward, loss (from the end of the
forward to the start of backward), backward, between (EMA, backtracking, zero_grad) and
optimizer. The noise draw and the metrics read-back are not visible from outside the engine.
"""

from __future__ import annotations

import contextlib

import torch

DOMAIN = "dipfast"
PHASES = ("noise", "forward", "loss", "backward", "between", "backtracking", "optimizer", "read-back")
COLORS = {
    "noise": "grey",
    "forward": "green",
    "loss": "yellow",
    "backward": "red",
    "between": "cyan",
    "backtracking": "purple",
    "optimizer": "blue",
    "read-back": "orange",
}

_NULL = contextlib.nullcontext()
_lib = None  # the nvtx module once imported, False when it is missing
_enabled = False


def _nvtx():
    global _lib
    if _lib is None:
        try:
            import nvtx

            _lib = nvtx
        except ImportError:
            _lib = False
    return _lib


def enable(on: bool = True) -> bool:
    """Turn the ranges on (when nvtx imports) or off; returns whether they are on."""
    global _enabled
    _enabled = bool(on) and bool(_nvtx())
    return _enabled


def enabled() -> bool:
    return _enabled


def phase(name: str):
    """A context manager: an NVTX range named `name` in the 'dipfast' domain, or a no-op."""
    if not _enabled or torch.compiler.is_compiling():
        return _NULL
    return _nvtx().annotate(name, color=COLORS.get(name), domain=DOMAIN)


def start(name: str):
    """Open a range that another thread may close (autograd runs backward on its own threads)."""
    if not _enabled:
        return None
    return _nvtx().start_range(name, color=COLORS.get(name), domain=DOMAIN)


def end(handle) -> None:
    if handle is not None and _enabled:
        _nvtx().end_range(handle)


@contextlib.contextmanager
def reference_hooks(root_types: tuple[type, ...] | None = None):
    """Mark forward / loss / backward / between / optimizer of any loop from outside it.

    root_types: the generator classes whose forward is a step's forward (default: the nets of
    dipfast.nets). Does nothing unless enable() turned the ranges on.
    """
    if not _enabled:
        yield
        return
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    if root_types is None:
        from dipfast import nets

        root_types = (nets.Skip, nets.UNet, nets.ResNet)
    open_ranges: dict[str, object] = {}

    def close(name):
        end(open_ranges.pop(name, None))

    def is_step(module, args) -> bool:  # a generator's forward on real data (not a meta-device shape probe)
        return isinstance(module, root_types) and not (args and isinstance(args[0], torch.Tensor) and args[0].is_meta)

    def forward_pre(module, args):
        if is_step(module, args):
            for name in list(open_ranges):  # a new forward: whatever the last step left open ends here
                close(name)
            open_ranges["forward"] = start("forward")

    def forward_post(module, args, output):
        if not is_step(module, args):
            return
        close("forward")
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return  # a no-grad forward (the final output): no backward follows
        open_ranges["loss"] = start("loss")
        params = [p for p in module.parameters() if p.requires_grad]
        handle = None

        def backward_starts(grad):
            close("loss")
            open_ranges["backward"] = start("backward")

        def backward_ends(grads):
            close("backward")
            open_ranges["between"] = start("between")
            handle.remove()  # the parameters' grad nodes outlive the step: fire once

        output.register_hook(backward_starts)
        if params:
            handle = torch.autograd.graph.register_multi_grad_hook(params, backward_ends, mode="all")

    def optimizer_pre(opt, args, kwargs):
        close("between")
        open_ranges["optimizer"] = start("optimizer")

    def optimizer_post(opt, args, kwargs):
        close("optimizer")

    handles = [
        module_hooks.register_module_forward_pre_hook(forward_pre),
        module_hooks.register_module_forward_hook(forward_post),
        optimizer_hooks.register_optimizer_step_pre_hook(optimizer_pre),
        optimizer_hooks.register_optimizer_step_post_hook(optimizer_post),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name in list(open_ranges):
            close(name)
