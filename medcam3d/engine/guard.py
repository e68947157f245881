"""Leave the model exactly as we found it: hooks, requires_grad flags, train/eval modes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from medcam3d.errors import InputError


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with no parameter in the autograd graph, for the duration of the block.

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` flag is recorded
    and restored in ``finally``, so an exception inside the block leaves no trace. Parameters are
    kept out of the graph so autograd only ever records the part of the model after the target
    layer (memory of inference) and no ``.grad`` field is ever touched.

    Raises:
        InputError: a parameter is an inference tensor (the model was built or loaded under
            ``torch.inference_mode()``): autograd cannot run through it. Nothing is changed.
    """
    inference = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if inference is not None:
        raise InputError(
            f"model parameter {inference!r} is an inference tensor (the model was built or loaded "
            "under torch.inference_mode()), so no gradient can flow through the model; build or load "
            "it outside inference_mode (torch.no_grad() is fine)"
        )
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
