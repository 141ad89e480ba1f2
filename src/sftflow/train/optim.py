"""The optimizer a tuning method needs, built from the libraries that implement it, for the stage recipes to
hand to their Trainer (`optimizers=(build_optimizer(...), None)`; the Trainer still builds the scheduler).

- LoRA+ (`loraplus_lr_ratio`): PEFT's `create_loraplus_optimizer`, the LoRA B matrices at ratio x lr;
- Muon (`use_muon`): `torch.optim.Muon` on the 2-D weights of the decoder layers, AdamW on everything
  else (embeddings, output head, norms, biases: Muon takes only 2-D parameters), one `MuonWithAdamW`;
- GaLore / APOLLO (`use_galore` / `use_apollo`): galore-torch's `GaLoreAdamW` / apollo-torch's
  `APOLLOAdamW` with the target linear weights in a projected parameter group (the same groups as HF's
  `optim: galore_adamw` + `optim_target_modules`, which also work as plain training keys); with
  `galore_layerwise` / `apollo_layerwise`, one such optimizer per weight, stepped in backward hooks
  (`LayerwiseOptimizer`, LLaMA-Factory's way);
- BAdam (`use_badam`): badam's `BlockOptimizer` (one decoder layer at a time) or `BlockOptimizerRatio`;
- Adam-mini (`use_adam_mini`): adam-mini's `Adam_mini`, one second moment per block.

Without any of these `build_optimizer` returns None and the Trainer builds its own (`optim`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn
    from transformers import Seq2SeqTrainingArguments

    from sftflow.config.args import FinetuningArguments

# method key -> the pip package it needs (and the extra that installs it)
PACKAGES = {
    "use_galore": ("galore_torch", "galore-torch"),
    "use_apollo": ("apollo_torch", "apollo-torch"),
    "use_badam": ("badam", "badam"),
    "use_adam_mini": ("adam_mini", "adam-mini"),
}


def optimizer_method(finetuning: FinetuningArguments) -> str | None:
    """The optimizer-side method a run asks for (a key name), or None.

    Raises:
        SftflowError: two optimizer methods at once (each builds the whole optimizer).
    """
    chosen = [
        key
        for key in ("use_muon", "use_galore", "use_apollo", "use_badam", "use_adam_mini")
        if getattr(finetuning, key)
    ]
    if finetuning.loraplus_lr_ratio is not None:
        chosen.append("loraplus_lr_ratio")
    if len(chosen) > 1:
        raise SftflowError(f"{' and '.join(chosen)} each build the optimizer; set only one of them.")
    return chosen[0] if chosen else None


def build_optimizer(
    model: nn.Module, finetuning: FinetuningArguments, training: Seq2SeqTrainingArguments
) -> torch.optim.Optimizer | None:
    """The optimizer of the run's method over the trainable parameters of `model`, or None (plain `optim`).

    Args:
        model: the model after `apply_finetuning` (what the Trainer will train).
        finetuning: the method keys.
        training: the HF training arguments (learning_rate, weight_decay, adam_beta1/2, adam_epsilon).

    Raises:
        SftflowError: a method whose package is missing, or that does not fit the tuning type.
    """
    method = optimizer_method(finetuning)
    if method is None:
        return None
    if method in PACKAGES:
        _require(method)
    adam = {
        "lr": training.learning_rate,
        "betas": (training.adam_beta1, training.adam_beta2),
        "eps": training.adam_epsilon,
    }
    if method == "loraplus_lr_ratio":
        return loraplus_optimizer(model, finetuning, training, adam)
    if method == "use_muon":
        return muon_optimizer(model, training.weight_decay, adam)
    if method in ("use_galore", "use_apollo"):
        return low_rank_optimizer(model, finetuning, method, training.weight_decay, adam)
    if method == "use_badam":
        return badam_optimizer(model, finetuning, training.weight_decay, adam)
    return adam_mini_optimizer(model, training.weight_decay, adam)


def _require(method: str) -> None:
    import importlib.util

    module, package = PACKAGES[method]
    if importlib.util.find_spec(module) is None:
        raise SftflowError(
            f"{method} needs the {package} package: pip install {package} (or pip install 'sftflow[methods]')."
        )


def _trainable(model: nn.Module) -> list[tuple[str, Any]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _decay_groups(named: list[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), as the Trainer groups them."""
    decay = [p for _, p in named if p.ndim >= 2]
    rest = [p for _, p in named if p.ndim < 2]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
        if g["params"]
    ]


def loraplus_optimizer(
    model: nn.Module, finetuning: FinetuningArguments, training: Seq2SeqTrainingArguments, adam: dict
) -> Any:
    """PEFT's LoRA+ optimizer: AdamW whose LoRA B matrices (and 1-D params) learn at ratio x lr."""
    from peft.optimizers import create_loraplus_optimizer

    if finetuning.finetuning_type != "lora":
        raise SftflowError(
            f"loraplus_lr_ratio needs finetuning_type: lora (it scales the LoRA B matrices), not "
            f"{finetuning.finetuning_type}."
        )
    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=adam["lr"],
        loraplus_lr_ratio=finetuning.loraplus_lr_ratio,
        loraplus_lr_embedding=finetuning.loraplus_lr_embedding,
        loraplus_weight_decay=training.weight_decay,
        betas=adam["betas"],
        eps=adam["eps"],
    )


def _outer_params(model: nn.Module) -> set[int]:
    """ids of the embedding and output-head parameters (kept out of Muon even though they are 2-D)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = set()
    for get in (inner.get_input_embeddings, inner.get_output_embeddings):
        module = get()
        if module is not None:
            ids |= {id(p) for p in module.parameters()}
    return ids


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the 2-D hidden weights and `torch.optim.AdamW` on the rest, as one optimizer.

    The param groups are the two optimizers' own dicts, so the Trainer's scheduler sets both learning
    rates; `state_dict` holds both states (checkpoints resume both).
    """

    def __init__(
        self, muon_params: list, adamw_groups: list[dict], lr: float, weight_decay: float, adam: dict
    ):
        # match_rms_adamw scales Muon's orthogonalised update to AdamW's RMS, so one learning rate serves both
        self.muon = torch.optim.Muon(
            muon_params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=adam["betas"], eps=adam["eps"])
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def muon_optimizer(model: nn.Module, weight_decay: float, adam: dict) -> MuonWithAdamW:
    """Muon on the trainable 2-D weights outside the embeddings and output head; AdamW on the rest.

    Raises:
        SftflowError: no trainable 2-D hidden weight (Muon would have nothing to do).
    """
    outer = _outer_params(model)
    named = _trainable(model)
    muon = [p for _, p in named if p.ndim == 2 and id(p) not in outer]
    rest = [(n, p) for n, p in named if not (p.ndim == 2 and id(p) not in outer)]
    if not muon:
        raise SftflowError("use_muon: the model has no trainable 2-D hidden weight for Muon to update.")
    return MuonWithAdamW(muon, _decay_groups(rest, weight_decay), adam["lr"], weight_decay, adam)


def _target_linears(model: nn.Module, targets: list[str], key: str) -> list[tuple[str, Any]]:
    """The trainable weights of the linear layers named in `targets` (all: every linear but the head)."""
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets != ["all"] and name.rsplit(".", 1)[-1] not in targets:
            continue
        if module.weight.requires_grad:
            found.append((f"{name}.weight", module.weight))
    if not found:
        raise SftflowError(f"{key} {targets} matches no trainable linear layer of the model.")
    return found


def low_rank_optimizer(
    model: nn.Module, finetuning: FinetuningArguments, method: str, weight_decay: float, adam: dict
) -> Any:
    """GaLoreAdamW / APOLLOAdamW with the target linear weights in a projected param group."""
    name = "galore" if method == "use_galore" else "apollo"
    if finetuning.finetuning_type not in ("full", "freeze"):
        raise SftflowError(
            f"{method} projects the gradients of whole weights: use finetuning_type: full or freeze, not "
            f"{finetuning.finetuning_type}."
        )
    targets = _target_linears(model, getattr(finetuning, f"{name}_target"), f"{name}_target")
    target_ids = {id(p) for _, p in targets}
    rest = [(n, p) for n, p in _trainable(model) if id(p) not in target_ids]
    if name == "galore":
        from galore_torch import GaLoreAdamW

        projected = {
            "rank": finetuning.galore_rank,
            "update_proj_gap": finetuning.galore_update_interval,
            "scale": finetuning.galore_scale,
            "proj_type": finetuning.galore_proj_type,
        }
        cls, extra = GaLoreAdamW, {}
    else:
        from apollo_torch import APOLLOAdamW

        projected = {
            "rank": finetuning.apollo_rank,
            "proj": finetuning.apollo_proj,
            "scale_type": finetuning.apollo_scale_type,
            "update_proj_gap": finetuning.apollo_update_interval,
            "scale": finetuning.apollo_scale,
            "proj_type": finetuning.apollo_proj_type,
        }
        cls, extra = APOLLOAdamW, {"scale_front": finetuning.apollo_scale_front}
    groups = [
        *_decay_groups(rest, weight_decay),
        {"params": [p for _, p in targets], "weight_decay": weight_decay, **projected},
    ]
    options = {"lr": adam["lr"], "betas": adam["betas"], "eps": adam["eps"], **extra}
    if getattr(finetuning, f"{name}_layerwise"):
        per_weight = [
            (p, cls([{**group, "params": [p]}], **options)) for group in groups for p in group["params"]
        ]
        return LayerwiseOptimizer(per_weight, adam["lr"])
    return cls(groups, **options)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Layer-wise GaLore/APOLLO, as LLaMA-Factory runs `galore_layerwise` / `apollo_layerwise`: one optimizer
    per trainable weight, stepped in that weight's post-accumulate-grad hook, which then frees its gradient
    (so the whole model's gradients never exist at once). The Trainer steps and zeroes this shell, a no-op;
    its scheduler sets the shell's learning rate, which each hook copies before it steps. Every update
    happens in backward, so there is no gradient accumulation (refused in config/methods.py) and no
    whole-model gradient to clip. `state_dict` holds every inner optimizer's state (checkpoints resume them).
    """

    def __init__(self, per_weight: list[tuple[torch.Tensor, torch.optim.Optimizer]], lr: float):
        self.inner = {id(param): optimizer for param, optimizer in per_weight}
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": lr})
        self.hooks = [param.register_post_accumulate_grad_hook(self.update) for param, _ in per_weight]

    def update(self, param: torch.Tensor) -> None:
        optimizer = self.inner[id(param)]
        for group in optimizer.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero: each hook freed its weight's gradient after its step."""

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.param_groups[0]["lr"], "per_weight": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.param_groups[0]["lr"] = state_dict["lr"]
        for optimizer, state in zip(self.inner.values(), state_dict["per_weight"], strict=True):
            optimizer.load_state_dict(state)


def badam_optimizer(
    model: nn.Module, finetuning: FinetuningArguments, weight_decay: float, adam: dict
) -> Any:
    """BAdam: block coordinate descent with Adam on one block at a time.

    Raises:
        SftflowError: a tuning type other than full (BAdam picks the trainable block itself).
    """
    if finetuning.finetuning_type != "full":
        raise SftflowError(
            f"use_badam chooses which block trains itself: use finetuning_type: full, not {finetuning.finetuning_type}."
        )
    from badam import BlockOptimizer, BlockOptimizerRatio

    named = list(model.named_parameters())
    if finetuning.badam_mode == "layer":
        base = torch.optim.AdamW(_decay_groups(_trainable(model), weight_decay), **adam)
        return BlockOptimizer(
            base_optimizer=base,
            named_parameters_list=named,
            block_prefix_list=None,
            switch_block_every=finetuning.badam_switch_interval,
            start_block=finetuning.badam_start_block,
            switch_mode=finetuning.badam_switch_mode,
            verbose=finetuning.badam_verbose,
        )
    return BlockOptimizerRatio(
        param_groups=_decay_groups(_trainable(model), weight_decay),
        named_parameters_list=named,
        update_ratio=finetuning.badam_update_ratio,
        mask_mode=finetuning.badam_mask_mode,
        verbose=finetuning.badam_verbose,
        # a tied output head is the (frozen) embedding: there is no separate lm_head for badam to freeze
        include_lm_head=not any("lm_head" in name for name, _ in named),
        **adam,
    )


def adam_mini_optimizer(model: nn.Module, weight_decay: float, adam: dict) -> Any:
    """Adam-mini over the trainable parameters, told the attention shape (it partitions by head)."""
    from adam_mini import Adam_mini

    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    heads = config.num_attention_heads
    return Adam_mini(
        named_parameters=_trainable(model),
        lr=adam["lr"],
        betas=adam["betas"],
        eps=adam["eps"],
        weight_decay=weight_decay,
        dim=config.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        verbose=False,
    )
