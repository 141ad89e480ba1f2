"""The sft training loss, computed only where it is trained.

A causal LM spends a large part of its FLOPs and most of its activation memory on the output head:
every position gets a `vocab_size` row of logits, kept (in fp32) for the backward pass. In SFT the prompt
and padding positions carry label -100, so their logits are thrown away. `causal_lm_loss`:

1. flattens the batch into one padding-free row (`flatten_batch`): the real tokens of every example
   back to back, `position_ids` restarting at 0 for each example and no attention mask, which is
   transformers' documented padding-free input (flash-attention reads the boundaries from the position
   ids; sdpa/eager build a block-diagonal causal mask from them when there is no KV cache). No FLOP is
   spent on padding and no token attends across examples. With sdpa the row's example boundaries also
   go to the model as `cu_seq_lens_q` and attention runs per example (`attention.py`), instead of over
   the whole row through a dense block-diagonal mask;
2. computes the output head only at the positions whose next token is trained: when the head is a
   plain linear map, from the last hidden state with the head fused into the cross-entropy chunk by
   chunk (`linear_cross_entropy`: no (tokens x vocab) logits kept for backward); otherwise through the
   `logits_to_keep` argument of the model's own forward (with a 1-D tensor of positions);
3. sums the cross-entropy over those positions and divides by `num_items_in_batch`, the number of trained
   tokens in the whole accumulation window (over all ranks under DDP), so batch 8 x accumulation 1 and
   batch 1 x accumulation 8 give the same loss and gradients, as the Trainer's own loss does.

With `dft=True` (`use_dft_loss`) each trained token's cross-entropy is weighted by its probability under the
model, exp(-loss), taken as a constant (Dynamic Fine-Tuning, arXiv 2508.05629; TRL's `loss_type="dft"`),
with the same sum / num_items_in_batch normalisation.

The model is always called through its (possibly DDP/PEFT-wrapped) forward; nothing is patched.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX
from sftflow.train.attention import sequence_starts, uses_segment_attention

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.autograd.function import FunctionCtx


# Inputs the flattened forward knows how to carry; any other key (pixel_values, ...) means: use the
# model's own loss instead.
_FLATTENABLE = {"input_ids", "attention_mask", "labels", "position_ids"}


def supports_fast_loss(model: nn.Module, inputs: dict[str, Any]) -> bool:
    """True when `causal_lm_loss` applies: the model's forward takes `logits_to_keep` (transformers causal
    LMs do; PEFT/DDP wrappers pass it through) and the batch holds only token inputs and labels."""
    if "labels" not in inputs or not set(inputs) <= _FLATTENABLE:
        return False
    inner = model
    for attr in ("module", "base_model", "model"):  # DDP -> PeftModel -> LoraModel -> the causal LM
        if hasattr(inner, "get_output_embeddings") and _takes_logits_to_keep(inner):
            return True
        inner = getattr(inner, attr, inner)
    return hasattr(inner, "get_output_embeddings") and _takes_logits_to_keep(inner)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def shift_labels(labels: torch.Tensor) -> Any:
    """The target of each position: the label of the next token in the same row (-100 at the end).

    >>> import torch
    >>> shift_labels(torch.tensor([[-100, 5, 6], [-100, -100, 7]])).tolist()
    [[5, 6, -100], [-100, 7, -100]]
    """
    import torch

    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def flatten_batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """One padding-free row from a padded or packed batch: input_ids, position_ids and the shifted targets.

    With an `attention_mask`, only its tokens are kept (right or left padding alike) and their positions
    count from 0 within each row; without one, every token is kept with the given `position_ids`
    (packed rows, whose padding is a block of its own that is never trained). Targets are shifted
    within each row before flattening, so no token is trained to predict the next example.

    >>> import torch
    >>> flat = flatten_batch({"input_ids": torch.tensor([[5, 6, 0], [7, 8, 9]]),
    ...     "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    ...     "labels": torch.tensor([[-100, 6, -100], [-100, 8, 9]])})
    >>> flat["input_ids"].tolist(), flat["position_ids"].tolist(), flat["targets"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 0, 1, 2]], [[6, -100, 8, 9, -100]])
    """
    import torch

    input_ids, labels = inputs["input_ids"], inputs["labels"]
    targets = shift_labels(labels)
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    if mask is None:
        if positions is None:
            positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        keep = mask.bool()
        if positions is None:
            positions = (keep.long().cumsum(1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids[keep].unsqueeze(0),
        "position_ids": positions[keep].unsqueeze(0),
        "targets": targets[keep].unsqueeze(0),
    }


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    fused_head: bool = True,
    dft: bool = False,
) -> tuple[Any, Any]:
    """Cross-entropy over the trained tokens of `inputs`, with logits computed only there.

    Args:
        model: the causal LM as the Trainer holds it (DDP/PEFT wrappers included); called once.
        inputs: input_ids, labels and attention_mask (padded) or position_ids (packed).
        num_items_in_batch: trained tokens in the whole accumulation window (all ranks); the sum of the
            token losses is divided by it. None: divide by this batch's trained tokens (a mean).
        fused_head: multiply the output head into the loss chunk by chunk (`linear_cross_entropy`) when
            the head is a plain linear map; False: ask the model for the kept positions' logits.
        dft: weight each token's loss by its detached probability (the DFT loss).

    Returns:
        (loss, model outputs). With a plain linear output head the logits are never materialised for the
        whole batch (`linear_cross_entropy`) and `outputs.logits` holds at most one position; otherwise
        it holds the kept positions, shape (1, kept, vocab).
    """
    import torch
    import torch.nn.functional as F

    flat = flatten_batch(inputs)
    targets = flat["targets"][0]
    keep = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)
    call: dict[str, Any] = {
        "input_ids": flat["input_ids"],
        "position_ids": flat["position_ids"],
        "use_cache": False,  # a KV cache makes transformers ignore the position_ids when building the mask
    }
    if uses_segment_attention(model):  # each example attends within itself, at its own length's cost
        starts, longest = sequence_starts(flat["position_ids"])
        call.update(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=longest, max_length_k=longest)

    head = output_head(model) if fused_head else None
    total = None
    if head is not None and _HEAD_CHECKED.get(head, True):
        # The last hidden state at the trained positions goes straight into the fused head + loss; one
        # position's logits come from the model itself, to check once that its head is that plain linear.
        outputs = model(**call, logits_to_keep=keep[:1], output_hidden_states=True)
        hidden = outputs.hidden_states[-1][0] if outputs.hidden_states is not None else None
        if head not in _HEAD_CHECKED and hidden is not None and keep.numel():
            mine = F.linear(hidden[keep[:1]].detach(), head.weight.detach())
            _HEAD_CHECKED[head] = bool(
                torch.allclose(mine.float(), outputs.logits[0].detach().float(), 1e-3, 1e-3)
            )
        if hidden is not None and _HEAD_CHECKED.get(head, True):
            total = linear_cross_entropy(hidden.index_select(0, keep), head.weight, targets[keep], dft=dft)
    if total is None:
        outputs = model(**call, logits_to_keep=keep)
        token_losses = F.cross_entropy(outputs.logits[0].float(), targets[keep], reduction="none")
        if dft:
            token_losses = token_losses * token_losses.detach().neg().exp()
        total = token_losses.sum()
    if num_items_in_batch is None:
        num_items_in_batch = keep.numel()
    # An empty window (every label -100) would divide 0 by 0; the loss is then 0 with a zero gradient.
    if torch.is_tensor(num_items_in_batch):
        return total / num_items_in_batch.to(total.device).clamp(min=1), outputs
    return total / max(int(num_items_in_batch), 1), outputs


# Output heads checked against their model's own logits (True: a plain linear map); weakly keyed so a
# freed model takes its entry with it.
_HEAD_CHECKED: Any = weakref.WeakKeyDictionary()


def output_head(model: nn.Module) -> Any:
    """The model's output head when it is a plain, bias-free `nn.Linear` (not wrapped by LoRA or
    modules_to_save), else None: only then can the loss multiply the hidden states by its weight itself."""
    import torch

    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and head.weight.shape == (head.out_features, head.in_features)
    ):
        return head  # (a ZeRO-3 partitioned weight has another shape: not usable outside the forward)
    return None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: int = 2**25,
    dft: bool = False,
) -> Any:
    """sum over rows of cross_entropy(hidden @ weight.T, targets), without keeping the logits (`dft`: each
    row's cross-entropy times its constant probability exp(-cross_entropy)).

    The logits of a few rows at a time (at most `chunk_elements` floats) are computed in fp32, turned
    into their gradient (softmax minus one-hot) in place and multiplied back straight away, so the
    backward pass only scales stored gradients. Peak memory is one chunk of logits instead of the 3-4
    (kept rows x vocab) fp32 copies of logits -> log_softmax -> gradient, and there is no full-vocab
    pass to redo. Works for a frozen head (LoRA) and a trained one (full tuning: the weight gets its
    gradient too). It is for training: the gradient is computed even when nothing calls backward.

    >>> import torch
    >>> h, w, t = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4), torch.tensor([1, 0, 6, 2, 2])
    >>> fused = linear_cross_entropy(h, w, t, chunk_elements=14)  # two rows per chunk
    >>> plain = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    >>> bool(torch.allclose(fused, plain))
    True
    """
    rows = max(1, chunk_elements // weight.shape[0])
    return _linear_cross_entropy_function().apply(hidden, weight, targets, rows, dft)


@functools.cache
def _linear_cross_entropy_function() -> Any:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: FunctionCtx,
            hidden: torch.Tensor,
            weight: torch.Tensor,
            targets: torch.Tensor,
            rows: int,
            dft: bool,
        ) -> Any:
            ctx.weight_dtype = weight.dtype
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start : start + rows].to(weight.dtype), targets[start : start + rows]
                logits = (h @ weight.T).float()
                target_logit = logits.gather(1, t[:, None])
                # log-sum-exp and softmax in place: no second (rows x vocab) buffer to allocate and fault in
                peak = logits.amax(-1, keepdim=True)
                exp_sum = logits.sub_(peak).exp_().sum(-1, keepdim=True)
                token_loss = peak + exp_sum.log() - target_logit
                grad = logits.div_(exp_sum)  # softmax: d(sum CE)/d logits ...
                grad[torch.arange(t.numel(), device=t.device), t] -= 1  # ... minus the one-hot target
                if dft:  # DFT: the loss and its gradient scaled by the token's probability, a constant
                    probability = token_loss.neg().exp()
                    token_loss = token_loss * probability
                    grad.mul_(probability)
                total += token_loss.sum()
                grad = grad.to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + rows] = grad @ weight
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
            ctx.save_for_backward(grad_hidden, grad_weight)
            return total

        @staticmethod
        def backward(ctx: FunctionCtx, grad_total: torch.Tensor) -> Any:
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_total.float()
            return (
                (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
                None,
                None,
                None,
            )

    return LinearCrossEntropy
