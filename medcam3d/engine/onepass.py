"""One forward and one batched backward, shared by every requested method and class.

How the cost stays at that of inference: a forward hook replaces the target layer's output by a
detached leaf tensor that requires grad, and every parameter is kept out of the graph for the call.
Autograd therefore records only the head (target layer -> scores). The gradients of all K
requested scores come from one call to ``torch.autograd.grad`` with a batch of K one-hot
``grad_outputs`` (``is_grads_batched=True``, i.e. vmap over vector-Jacobian products); if an
operation in the head has no batching rule we fall back to K VJPs over the same, retained graph.

When a method explains at the input (Gradient x Input), the input becomes the leaf instead and the
target layer's activation is kept as an inner node of the graph: the same one backward then yields
the gradients at both places (at the memory cost of a full backward).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from medcam3d.engine.capture import replace_target
from medcam3d.engine.guard import frozen_eval
from medcam3d.engine.result import CAMResult
from medcam3d.engine.scores import ScoreSpec, resolve_score, scores_of
from medcam3d.engine.selection import ClassSpec, check_input, select_classes
from medcam3d.errors import FeatureGeometryError, InputError, TargetLayerError

if TYPE_CHECKING:
    from medcam3d.engine.cam import BaseCAM


def _check_same_model(cams: Sequence[BaseCAM]) -> None:
    if not cams:
        raise InputError("no explainer given.")
    model = cams[0].model
    if any(c.model is not model for c in cams):
        raise InputError("explainers sharing one pass must explain the same model object.")


def run_pass(
    cams: Sequence[BaseCAM],
    x: torch.Tensor,
    class_idx: ClassSpec = None,
    *,
    score: ScoreSpec = None,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> list[CAMResult]:
    """Explain ``class_idx`` with every explainer of ``cams`` from one forward and one backward.

    See :meth:`BaseCAM.__call__` for the arguments, returns (one :class:`CAMResult` per explainer,
    in order) and errors.
    """
    _check_same_model(cams)
    first = cams[0]
    module = first.module
    x = check_input(x, first.model)
    if isinstance(forward_args, (str, bytes)) or not isinstance(forward_args, Sequence):
        raise InputError(f"forward_args must be a tuple or list of extra inputs, not {type(forward_args).__name__}.")
    kwargs = dict(forward_kwargs or {})
    score_fn = resolve_score(score)
    layer_cams = [c for c in cams if not c.at_input]
    target = layer_cams[0].target_for(x, forward_args, kwargs) if layer_cams else None
    for c in layer_cams[1:]:
        if c.target_for(x, forward_args, kwargs) != target:
            raise InputError("explainers sharing one pass must use the same target layer.")
    need_input_grad = any(c.at_input for c in cams)
    need_layer_grad = any(c.needs_gradient for c in layer_cams)
    caps = [c.max_classes_per_backward for c in cams if c.max_classes_per_backward]
    spatial_rank = x.ndim - 2
    captured: list[torch.Tensor] = []

    def keep(activation: torch.Tensor) -> torch.Tensor:
        if need_input_grad:
            captured.append(activation)  # an inner node: gradients reach it on the way to x
        else:
            captured.append(activation.detach().requires_grad_(need_layer_grad))
        # A clone, not the tensor itself: an in-place op after the layer (ReLU(inplace=True))
        # would be illegal on a leaf, and would change the captured activation.
        return captured[-1].clone()

    with frozen_eval(module), torch.inference_mode(False), torch.enable_grad():
        xin = x.detach().requires_grad_(True) if need_input_grad else x
        hooks = (
            replace_target(target, spatial_rank, keep) if target is not None else contextlib.nullcontext()
        )
        with hooks:
            out = module(xin, *forward_args, **kwargs)
        if target is not None and not captured:
            raise TargetLayerError(
                f"target layer {target.label!r} did not run during the forward pass; choose a "
                "module that the model's forward() actually calls."
            )
        scores = scores_of(score_fn, out, x.shape[0])
        idx = select_classes(class_idx, scores)
        selected = scores.gather(1, idx)
        del out
        wrt: list[torch.Tensor] = []
        if need_layer_grad:
            wrt.append(captured[0])
        if need_input_grad:
            wrt.append(xin)
        if wrt and not selected.requires_grad:
            where = f"target layer {target.label!r}" if need_layer_grad and target else "the input"
            raise TargetLayerError(
                f"the scores do not depend on {where}; choose a layer on the path from the input "
                "to the scores."
            )
        activation = captured[0].detach() if captured else None
        raw, batched = _maps(cams, selected, wrt, need_layer_grad, activation, x.detach(), caps)
    out_scores = scores.detach().float()
    logits = selected.detach().float()
    results = []
    for cam, r in zip(cams, raw):
        try:  # where the cells sit (cached); on failure raw and logits stay usable, maps refuse
            geometry = cam.geometry_for(x, target, tuple(r.shape[2:]), forward_args, kwargs)
            refused = None
        except FeatureGeometryError as e:
            geometry, refused = None, str(e)
        results.append(
            CAMResult(
                raw=r,
                logits=logits,
                class_idx=idx,
                outputs=out_scores,
                method=cam.method,
                target_layer=_label(cam, target),
                input_size=tuple(x.shape[2:]),
                batched_backward=batched,
                activation_dtype=x.dtype if cam.at_input or activation is None else activation.dtype,
                geometry=geometry,
                _geometry_error=refused,
            )
        )
    return results


def _label(cam: BaseCAM, target: Any) -> str:
    from medcam3d.engine.cam import INPUT_LABEL

    return INPUT_LABEL if cam.at_input else target.label


def _maps(
    cams: Sequence[BaseCAM],
    selected: torch.Tensor,
    wrt: list[torch.Tensor],
    need_layer_grad: bool,
    activation: torch.Tensor | None,
    x: torch.Tensor,
    caps: list[int],
) -> tuple[list[torch.Tensor], bool]:
    """(B, K, *s) raw map per explainer, and whether every backward was one batched VJP."""
    k_total = selected.shape[1]
    chunk = min(caps) if caps else k_total
    pieces: list[list[torch.Tensor]] = [[] for _ in cams]
    batched = True
    for start in range(0, k_total, chunk):
        ks = list(range(start, min(start + chunk, k_total)))
        grads: tuple[torch.Tensor, ...] = ()
        if wrt:
            grads, ok = _vjp(selected, wrt, ks)
            batched = batched and ok
        layer_grad = grads[0] if need_layer_grad else None
        input_grad = grads[-1] if grads and len(grads) > int(need_layer_grad) else None
        for i, cam in enumerate(cams):
            if cam.at_input:
                pieces[i].append(cam.combine(input_grad, x))
            elif cam.needs_gradient:
                pieces[i].append(cam.combine(layer_grad, activation))
            else:
                pieces[i].append(cam.combine(None, activation).expand(len(ks), *activation.shape[:1], *activation.shape[2:]))
        del grads, layer_grad, input_grad
    raw = [torch.cat(p, dim=0).transpose(0, 1).contiguous() for p in pieces]  # (B, K, *s) each
    return raw, batched


def _vjp(
    selected: torch.Tensor, wrt: list[torch.Tensor], ks: list[int]
) -> tuple[tuple[torch.Tensor, ...], bool]:
    """d selected[:, k] / d each tensor of ``wrt``, for each k in ``ks`` -> ((n, B, ...) per tensor,
    used_batched_path).

    Samples of a batch do not interact in eval mode, so one one-hot row per class serves all B
    samples at once. The graph is retained (it is only the head, and it is freed when the call
    returns) so a failed batched attempt can fall back to the loop on the same graph. A CUDA
    out-of-memory error is re-raised, never turned into the slower loop: lower
    ``max_classes_per_backward`` instead.
    """
    n = len(ks)
    grad_outputs = torch.zeros((n, *selected.shape), dtype=selected.dtype, device=selected.device)
    grad_outputs[torch.arange(n), :, torch.tensor(ks)] = 1
    if n > 1:
        try:
            with warnings.catch_warnings():
                # vmap warns when it has to loop internally; the result is still correct.
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                grads = torch.autograd.grad(
                    selected, wrt, grad_outputs, retain_graph=True, is_grads_batched=True
                )
            return tuple(grads), True
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            pass  # an op in the head has no vmap support: one VJP per class, same graph
    per_class = [torch.autograd.grad(selected, wrt, g, retain_graph=True) for g in grad_outputs]
    return tuple(torch.stack([pc[j] for pc in per_class]) for j in range(len(wrt))), n == 1
