"""LoRA editing through ``peft``, merged into an ordinary low-rank :class:`WeightDelta`.

Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"; as an editing
baseline in EasyEdit (``hparams/LoRA``: rank 8, alpha 32, dropout 0.1, lr 5e-3, 70 steps,
loss on the target tokens with the prompt masked).

The user's model never receives a peft wrapper. For each targeted MLP projection we build
a *proxy* module (a fresh ``nn.Linear``/``Conv1D`` whose weight is a detached view of the
original, so no copy) and let ``peft.inject_adapter_in_model`` wrap the proxies. During
training, a forward hook on each original module (removed afterwards) returns the peft
module's output instead, while the model runs through ``functional_call`` with detached
parameters. The trained adapters are merged with peft's own ``get_delta_weight`` scaling:
``ΔW = scaling · B A`` (transposed for Conv1D), stored as factors in storage orientation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from kedit.data.request import EditRequest
from kedit.editors.base import Editor, WeightDelta, base_identity
from kedit.editors.ft import TrainSpec, fit, resolve_layers, seeded
from kedit.models.arch import Arch, arch_of, get_module

log = logging.getLogger(__name__)

ADAPTER = "kedit"


@dataclass
class LoRAHparams:
    """LoRA on MLP projections (EasyEdit ``hparams/LoRA`` defaults; EasyEdit targets q/v of all layers)."""

    layers: list[int] | Literal["auto", "all"] = "all"
    """Layers whose MLP projections get adapters; "all" (EasyEdit: every layer) or "auto" (one at 2/3 depth)."""
    modules: Literal["mlp", "mlp_in", "mlp_out"] = "mlp"
    """Which MLP projections: all of them, the input one(s) (gate/up), or the output one (down)."""
    rank: int = 8
    """LoRA rank r (EasyEdit: 8)."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank (EasyEdit: 32)."""
    dropout: float = 0.1
    """Dropout on the adapter input during training (EasyEdit: 0.1)."""
    num_steps: int = 70
    """Adam steps over all requests (EasyEdit: 70)."""
    lr: float = 5e-3
    """Adam learning rate (EasyEdit: 5e-3)."""
    weight_decay: float = 0.0
    """Adam weight decay on the adapter weights (EasyEdit: 0)."""
    batch_size: int = 64
    """Requests per optimizer step in a batch edit."""
    early_stop_loss: float | None = 1e-2
    """Stop once the mean target NLL is below this (as FT); null: always run num_steps."""
    seed: int = 0
    """Seed of the adapter initialization and dropout (the global RNG is left untouched)."""
    progress: bool = False
    """Show a progress bar over the steps."""


def _proxy(module: nn.Module) -> nn.Module:
    """A fresh Linear/Conv1D whose weight and bias are detached views of ``module``'s.

    peft may set ``requires_grad`` on its base layer's parameters; on new Parameter objects
    that cannot reach the user's model.
    """
    if isinstance(module, nn.Linear):
        proxy = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    elif isinstance(module, Conv1D):
        with torch.device("meta"):
            proxy = Conv1D(module.nf, module.weight.shape[0])
    else:
        raise TypeError(f"LoRA editing supports nn.Linear and transformers Conv1D projections, "
                        f"not {type(module).__name__}")
    proxy.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
    if module.bias is not None:
        proxy.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return proxy


def build_adapters(model: nn.Module, modules: list[str], config: Any) -> tuple[nn.Module, dict[str, nn.Module]]:
    """peft LoRA layers around detached proxies of ``modules`` (``config.target_modules`` is replaced).

    The adapter weights are fp32 whatever the model's dtype. Returns the container holding
    them and a map from each model module name to its LoRA layer.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    keys = {name: f"m{i}" for i, name in enumerate(modules)}
    container = nn.Module()
    for name, key in keys.items():
        container.add_module(key, _proxy(get_module(model, name)))
    config = dataclasses.replace(config, target_modules=list(keys.values()))
    inject_adapter_in_model(config, container, adapter_name=ADAPTER)
    container.to(next(model.parameters()).device)
    # adapters train in fp32 on fp16/bf16 models (in fp16, Adam's eps 1e-8 rounds to 0 and its
    # steps turn into inf/nan); peft computes the adapter branch in fp32 and casts it back
    cast_adapter_dtype(container, adapter_name=ADAPTER)
    return container, {name: getattr(container, key) for name, key in keys.items()}


def merged_factors(layer: nn.Module, arch: Arch, adapter: str = ADAPTER) -> tuple[Tensor, Tensor]:
    """A peft LoRA layer's update ``scaling · B A`` as factors in the weight's storage orientation.

    Equals peft's ``layer.get_delta_weight(adapter)`` (which also transposes for Conv1D).
    """
    a = layer.lora_A[adapter].weight.detach()  # (r, d_in)
    b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]  # (d_out, r)
    return arch.low_rank_factors(b, a.T)  # ΔW (out, in) = b @ a


def target_modules(arch: Arch, model: nn.Module, layers: list[int], which: str) -> list[str]:
    names = []
    for layer in layers:
        if which in ("mlp", "mlp_in"):
            names += arch.mlp_in_modules(layer, model)
        if which in ("mlp", "mlp_out"):
            names.append(arch.mlp_out_module(layer))
    return names


class LoRA(Editor):
    """Train LoRA adapters (peft) on the edit, then merge them into a low-rank weight delta."""

    name = "lora"
    Hparams = LoRAHparams

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> WeightDelta:
        from peft import LoraConfig

        hp = self.hparams
        arch = arch_of(model)
        layers = resolve_layers(hp.layers, arch, model)
        modules = target_modules(arch, model, layers, hp.modules)
        config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=["_"],
                            fan_in_fan_out=arch.conv1d, bias="none")
        with seeded(hp.seed):
            container, lora = build_adapters(model, modules, config)
        container.train()  # adapter dropout on; the model's own mode is untouched
        leaves = [p for p in container.parameters() if p.requires_grad]

        @contextmanager
        def routed() -> Iterator[None]:
            handles = []

            def hook(name: str):
                def fn(_module: nn.Module, args: tuple, kwargs: dict, _out: Tensor) -> Tensor:
                    x = args[0] if args else next(iter(kwargs.values()))
                    return lora[name](x)

                return fn

            try:
                for name in modules:
                    handles.append(get_module(model, name).register_forward_hook(hook(name), with_kwargs=True))
                yield
            finally:
                for h in handles:
                    h.remove()

        spec = TrainSpec(leaves=leaves, weights=dict, num_steps=hp.num_steps, lr=hp.lr,
                         weight_decay=hp.weight_decay, batch_size=hp.batch_size, objective="target",
                         early_stop_loss=hp.early_stop_loss, progress=hp.progress, context=routed)
        with seeded(hp.seed):
            stats = fit(model, tokenizer, requests, spec, self.name)
        factors = {f"{name}.weight": merged_factors(layer, arch) for name, layer in lora.items()}
        weights = list(factors)
        log.debug("%s: %d modules in layers %s, %s", self.name, len(modules), layers, stats)
        return WeightDelta(factors=factors, base=base_identity(model, weights),
                           info={"editor": self.name, "layers": layers, "modules": modules,
                                 "n_requests": len(requests), **stats, "hparams": dataclasses.asdict(hp)})
