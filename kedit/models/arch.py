"""Architecture knowledge as data, keyed by ``config.model_type``.

Editors ask ``arch_of(model)`` for module paths and weight orientation; they never
look at a model's name and never guess orientation from shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Arch:
    """Where the editable parts of one transformer family live.

    Paths within a block are relative to ``f"{blocks}.{layer}"``.
    """

    blocks: str
    """Module list of the (decoder) transformer blocks, e.g. ``model.layers``."""
    mlp_in: tuple[str, ...]
    """MLP input projection(s) within a block; gated MLPs have two (gate, up)."""
    mlp_out: str
    """MLP output projection within a block: the ROME/MEMIT edit target."""
    attn_out: str
    """Attention output projection within a block."""
    embed: str
    """Token embedding module."""
    final_norm: str
    """Final norm before the LM head."""
    lm_head: str
    """Output projection to the vocabulary."""
    conv1d: bool = False
    """Weights stored (in, out) as in GPT-2's Conv1D, instead of nn.Linear's (out, in)."""
    encoder_decoder: bool = False
    """Seq2seq model (T5); ``blocks`` are the decoder blocks."""

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_out_module(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def mlp_out_weight(self, layer: int) -> str:
        return f"{self.mlp_out_module(layer)}.weight"

    def mlp_in_modules(self, layer: int, model: nn.Module | None = None) -> list[str]:
        """The MLP input projections of a block (only those present, if ``model`` given)."""
        names = [f"{self.blocks}.{layer}.{m}" for m in self.mlp_in]
        if model is None:
            return names
        present = dict(model.named_modules())
        return [n for n in names if n in present]

    def attn_out_module(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn_out}"

    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def blocks_below(self, model: nn.Module, module: str) -> list[str]:
        """The blocks under the one that holds ``module``, lowest first: nothing done at ``module``
        changes their output. Empty for a module outside the blocks."""
        for layer in range(self.num_layers(model)):
            if module == self.block(layer) or module.startswith(self.block(layer) + "."):
                return [self.block(i) for i in range(layer)]
        return []

    def mlp_dims(self, model: nn.Module, layer: int) -> tuple[int, int]:
        """(d_in, d_out) of the MLP output projection: key and value sizes."""
        w = get_module(model, self.mlp_out_module(layer)).weight
        return (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])

    def as_out_in(self, weight: Tensor) -> Tensor:
        """View a stored projection weight as (out, in), whatever its storage."""
        return weight.T if self.conv1d else weight

    def low_rank_factors(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """Turn a (out, in) update ``left @ right.T`` into factors in storage orientation.

        ``left`` is (d_out, r), ``right`` is (d_in, r). For Conv1D storage the
        transpose swaps them.
        """
        return (right, left) if self.conv1d else (left, right)


_LLAMA_LIKE = Arch(
    blocks="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        blocks="transformer.h",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
    ),
    "gptj": Arch(
        blocks="transformer.h",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": Arch(
        blocks="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # "embed_out" before transformers 5
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": Arch(  # Gemma3ForConditionalGeneration wraps the text model
        blocks="model.language_model.layers",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
    ),
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM, e.g. Gemma-3-270M
    "t5": Arch(
        blocks="decoder.block",
        mlp_in=("layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1"),
        mlp_out="layer.2.DenseReluDense.wo",
        attn_out="layer.0.SelfAttention.o",
        embed="shared",
        final_norm="decoder.final_layer_norm",
        lm_head="lm_head",
        encoder_decoder=True,
    ),
}


class UnsupportedArchitecture(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def arch_of(model_or_type: nn.Module | str) -> Arch:
    """The :class:`Arch` of a model (or of a ``config.model_type`` string)."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"kedit has no architecture entry for model_type={model_type!r}. "
            f"Supported: {', '.join(sorted(ARCHS))}. To add one, register an Arch with its "
            f"module paths: kedit.models.ARCHS[{model_type!r}] = Arch(blocks=..., mlp_in=(...), "
            f"mlp_out=..., attn_out=..., embed=..., final_norm=..., lm_head=..., conv1d=False)."
        ) from None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the architecture."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise AttributeError(
            f"{type(model).__name__} has no module {name!r} ({err}); "
            "check the Arch entry for this model_type in kedit.models.ARCHS"
        ) from None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)
