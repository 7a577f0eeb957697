"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022).

For an edited weight W (out x in), the fine-tuning gradient on the edit example is a sum
of rank-1 terms over tokens t (Eq. 2): ∇_W L = Σ_t δ_t u_tᵀ, with u_t the layer input and
δ_t the gradient of the loss with respect to the layer output. A gradient hypernetwork g
maps each (u_t, δ_t) to (ũ_t, δ̃_t) (Eq. 3-4) and the edit is (Eq. 5)

    ΔW = -α Σ_t δ̃_t ũ_tᵀ            α: a learned per-weight step size

g normalizes its inputs per feature (running statistics), applies a per-weight scale
and shift, and a low-rank MLP with an identity-initialized residual, shared by all
edited weights of the same shape. A one-shot edit is one forward + backward of the base
model on the edit example (the backward stops at the lowest edited block) plus g.

This file holds the hypernetwork (:class:`MENDNet`) and the :class:`MEND` editor. The
Lightning training module lives in :mod:`kedit.lightning.mend`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import IGNORE, encode, model_inputs, target_logprobs
from kedit.editors.base import Editor, Requests, WeightDelta, as_requests, base_identity
from kedit.hooks import trace
from kedit.models import arch_of
from kedit.utils import check_layers

log = logging.getLogger(__name__)


@dataclass
class MENDHparams:
    """MEND hyperparameters; defaults follow the paper / its reference config."""

    layers: list[int] | None = None
    """Blocks whose weights are edited; None: the last ``num_last_layers`` blocks."""
    num_last_layers: int = 3
    """With ``layers`` unset, edit this many of the last blocks."""
    weights: list[str] = field(default_factory=lambda: ["mlp_in", "mlp_out"])
    """Which projections of each block to edit: "mlp_in" (all MLP input projections), "mlp_out", "attn_out"."""
    rank: int = 1920
    """Rank of the hypernetwork's low-rank MLP layers."""
    n_hidden: int = 1
    """Hidden layers of the hypernetwork MLP (it has n_hidden + 1 residual low-rank layers)."""
    shared: bool = True
    """Share one hypernetwork among edited weights of the same shape (with per-weight scale and shift)."""
    norm: bool = True
    """Normalize (u, δ) per feature with running statistics before the MLP."""
    edit_lr: float = 1e-4
    """Initial per-weight step size α of Eq. 5."""
    lr: float = 1e-6
    """Adam learning rate of the hypernetwork."""
    lr_lr: float = 1e-4
    """Adam learning rate of the per-weight step sizes α."""
    c_edit: float = 0.1
    """Weight of the edit loss NLL(target_new | equivalent prompt, edited weights)."""
    c_loc: float = 1.0
    """Weight of the locality loss KL(pre-edit || post-edit) on locality prompts."""
    edit_on_prompt: bool = True
    """Also apply the edit loss to the edit prompt itself, not only to its paraphrase."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- hypernetwork


class RunningNorm(nn.Module):
    """Per-feature running mean / std over all tokens seen in training (all DDP ranks)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the rows of ``x`` (n, dim); summed over DDP ranks so every rank keeps the same stats."""
        x = x.double()
        stats = torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), (x * x).sum(0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        d = self.total.numel()
        self.count += stats[0]
        self.total += stats[1:1 + d]
        self.total_sq += stats[1 + d:]

    def forward(self, x: Tensor) -> Tensor:
        if self.count < 2:  # no statistics yet: identity (an untrained MEND is a gradient step)
            return x
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp(min=0)
        return ((x - mean.to(x.dtype)) / (var.sqrt() + self.eps).to(x.dtype))


class LowRankResidual(nn.Module):
    """x + B relu(A x), with B zero-initialized: the identity at initialization."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.relu(self.down(x)))


class GradientMLP(nn.Module):
    """The shared low-rank MLP of one weight shape, with a scale and shift per weight ("mode")."""

    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.layers = nn.ModuleList(LowRankResidual(dim, rank) for _ in range(n_hidden + 1))

    def forward(self, x: Tensor, mode: int) -> Tensor:
        x = x * self.scale[mode] + self.shift[mode]
        for layer in self.layers:
            x = layer(x)
        return x


def _key(name: str) -> str:
    return name.replace(".", "__")


class MENDNet(nn.Module):
    """g: (u, δ) of each edited weight -> low-rank ΔW factors (Eq. 3-5).

    ``dims[name] = (d_out, d_in)`` of each edited weight in (out, in) orientation.
    """

    def __init__(self, hparams: MENDHparams, dims: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.hparams = hparams
        self.names = list(dims)
        self.dims = {n: (int(o), int(i)) for n, (o, i) in dims.items()}
        groups: dict[str, list[str]] = {}
        for n in self.names:
            groups.setdefault(self._group(n), []).append(n)
        self.groups = groups
        self.mlps = nn.ModuleDict({
            g: GradientMLP(sum(self.dims[members[0]]), hparams.rank, hparams.n_hidden, len(members))
            for g, members in groups.items()
        })
        self.norm_u = nn.ModuleDict({_key(n): RunningNorm(self.dims[n][1]) for n in self.names})
        self.norm_d = nn.ModuleDict({_key(n): RunningNorm(self.dims[n][0]) for n in self.names})
        self.alpha = nn.ParameterDict({_key(n): nn.Parameter(torch.tensor(float(hparams.edit_lr)))
                                       for n in self.names})

    def _group(self, name: str) -> str:
        d_out, d_in = self.dims[name]
        return f"{d_out}x{d_in}" if self.hparams.shared else _key(name)

    def transform(self, name: str, u: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """(ũ, δ̃) for the tokens of one weight: ``u`` (n, d_in), ``d`` (n, d_out)."""
        nu, nd = self.norm_u[_key(name)], self.norm_d[_key(name)]
        if self.training and self.hparams.norm:
            nu.update(u)
            nd.update(d)
        if self.hparams.norm:
            u, d = nu(u), nd(d)
        group = self._group(name)
        mode = self.groups[group].index(name)
        out = self.mlps[group](torch.cat([u, d], dim=-1), mode)
        return out[:, : u.shape[1]], out[:, u.shape[1]:]

    def forward(self, u: dict[str, Tensor], d: dict[str, Tensor], example: Tensor,
                n_examples: int) -> list[dict[str, tuple[Tensor, Tensor]]]:
        """Per example, per weight: (left (d_out, n_tok), right (d_in, n_tok)), ΔW = left @ right.T.

        ``example[t]`` is the example token t belongs to; each example gets its own edit.
        """
        per_example: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in range(n_examples)]
        for name in self.names:
            u_t, d_t = self.transform(name, u[name].float(), d[name].float())
            left_all = -self.alpha[_key(name)] * d_t  # Eq. 5: ΔW = -α Σ_t δ̃_t ũ_tᵀ
            for i in range(n_examples):
                rows = example == i
                per_example[i][name] = (left_all[rows].T, u_t[rows].T)
        return per_example


# --------------------------------------------------------------------------- gradients


def edited_weights(model: nn.Module, hparams: MENDHparams) -> list[str]:
    """Parameter names MEND (and MALMEN) edit, from the Arch table (MEND default: MLP projections of the last 3 blocks)."""
    arch = arch_of(model)
    n = arch.num_layers(model)
    layers = hparams.layers if hparams.layers is not None else list(range(n - hparams.num_last_layers, n))
    names: list[str] = []
    for layer in check_layers(layers, n, "editor layers"):
        for kind in hparams.weights:
            if kind == "mlp_in":
                modules = arch.mlp_in_modules(layer, model)
            elif kind == "mlp_out":
                modules = [arch.mlp_out_module(layer)]
            elif kind == "attn_out":
                modules = [arch.attn_out_module(layer)]
            else:
                raise ValueError(f"editor weights: unknown kind {kind!r}; use mlp_in, mlp_out, attn_out")
            names += [f"{m}.weight" for m in modules]
    return names


def weight_dims(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each weight, whatever its storage orientation."""
    arch = arch_of(model)
    params = dict(model.named_parameters())
    return {n: tuple(arch.as_out_in(params[n]).shape) for n in names}


def token_mask(batch: dict[str, Tensor], seq2seq: bool) -> Tensor:
    """Real (non-padding) positions of the sequence the edited (decoder) weights see."""
    return batch["labels"] != IGNORE if seq2seq else batch["attention_mask"].bool()


def mean_nll(logits: Tensor, labels: Tensor, seq2seq: bool) -> Tensor:
    """Per example: mean negative log-likelihood of the target tokens."""
    logp, _, n = target_logprobs(logits, labels, seq2seq)
    return -logp / n.clamp(min=1)


def gradient_inputs(model: nn.Module, names: Sequence[str], batch: dict[str, Tensor], seq2seq: bool,
                    params: dict[str, Tensor] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """(u, δ, example) at every real token of ``batch`` for each weight in ``names``.

    The loss is the sum over examples of each example's mean target NLL, so δ of one
    example does not depend on the others in the batch. Model weights are never written
    and get no gradient: a zero leaf added to the outputs of the edited modules makes
    autograd stop at the lowest one.
    """
    modules = [n[: -len(".weight")] for n in names]
    zero = torch.zeros((), requires_grad=True, device=batch["input_ids"].device)
    with torch.enable_grad(), trace(model, modules, inputs=True, outputs=True,
                                    edit_output=lambda _n, y: y + zero.to(y.dtype)) as t:
        if params is None:
            out = model(**model_inputs(batch))
        else:
            out = torch.func.functional_call(model, params, (), model_inputs(batch))
        loss = mean_nll(out.logits, batch["labels"], seq2seq).sum()
        grads = torch.autograd.grad(loss, [t[m].output for m in modules])
    mask = token_mask(batch, seq2seq)
    example = mask.nonzero()[:, 0]
    u = {n: t[m].input.detach()[mask] for n, m in zip(names, modules)}
    d = {n: g.detach()[mask] for n, g in zip(names, grads)}
    return u, d, example


# --------------------------------------------------------------------------- editor


class MEND(Editor):
    """One-shot edits with a trained gradient hypernetwork.

    ``kedit.load_editor("checkpoints/mend-smollm2-135m-counterfact.safetensors")`` gives a
    trained MEND; ``MEND()`` alone is untrained (identity hypernetwork: a scaled gradient step).
    """

    name = "mend"
    Hparams = MENDHparams
    Net: ClassVar[type[nn.Module]] = MENDNet
    """The hypernetwork class: ``Net(hparams, dims)`` with ``dims[name] = (d_out, d_in)`` and ``.names``."""
    weights_prefix: ClassVar[str] = "mlps."
    """State-dict prefix of the hypernetwork's weight matrices (what :meth:`save` may store in a smaller dtype)."""

    def __init__(self, hparams: MENDHparams | None = None, net: nn.Module | None = None,
                 base: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.net = net
        self.base = base or {}

    # -- construction
    def build(self, model: nn.Module) -> nn.Module:
        """The hypernetwork for ``model`` (created identity-initialized if this editor has none)."""
        if self.net is None:
            names = edited_weights(model, self.hparams)
            self.net = self.Net(self.hparams, weight_dims(model, names)).eval()
            log.warning("%s editor has no trained hypernetwork: using an identity-initialized one "
                        "(a normalized gradient step with step size edit_lr=%g)", self.name.upper(),
                        self.hparams.edit_lr)
        return self.net

    def ready(self, model: nn.Module) -> tuple[nn.Module, torch.device]:
        """The hypernetwork, in eval mode on ``model``'s device, and that device; every edited weight must exist."""
        net = self.build(model)
        missing = [n for n in net.names if n not in dict(model.named_parameters())]
        if missing:
            raise ValueError(f"{self.name.upper()} editor edits {missing[:3]}, which {type(model).__name__} "
                             "does not have")
        device = next(model.parameters()).device
        return net.to(device).eval(), device

    @classmethod
    def from_artifact(cls, path: str | Path) -> MEND:
        """A trained editor of this class from an editor artifact (see :mod:`kedit.checkpoint`)."""
        from kedit.checkpoint import META_KEY, load_editor_artifact
        from kedit.editors.base import EditFileError, require

        tensors, meta, file, hparams = load_editor_artifact(path, cls.name, cls.Hparams)
        try:
            dims = require(meta.get("extra") or {}, "dims", dict, f"{META_KEY}.extra")
        except ValueError as err:
            raise EditFileError(f"{file}: {err} (the edited weights' shapes)") from None
        bad = [n for n, v in dims.items()
               if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int and x > 0 for x in v))]
        if not dims or bad:
            raise EditFileError(f"{file}: field '{META_KEY}.extra.dims' must map each weight to [d_out, d_in]"
                                + (f"; {bad[0]!r} is {dims[bad[0]]!r}" if bad else ", and is empty"))
        net = cls.Net(hparams, {n: tuple(v) for n, v in dims.items()})
        tensors = {k: v.float() if k.startswith(cls.weights_prefix) else v for k, v in tensors.items()}
        want = net.state_dict()
        missing = [k for k in want if k not in tensors]
        unexpected = [k for k in tensors if k not in want]
        misshapen = [k for k in want if k in tensors and tensors[k].shape != want[k].shape]
        if missing or unexpected or misshapen:
            raise EditFileError(f"{file}: tensors do not fit the {cls.name.upper()} hypernetwork its header describes: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {misshapen[:5]}")
        net.load_state_dict(tensors)
        return cls(hparams, net=net.eval(), base=meta.get("base"))

    def artifact_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.net is None:
            raise ValueError(f"this {self.name.upper()} editor has no hypernetwork to save")
        return dict(self.net.state_dict()), {"dims": {n: list(v) for n, v in self.net.dims.items()}}

    def save(self, path: str | Path, dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write this editor as an artifact for ``kedit.load_editor`` (optionally casting MLP weights).

        The one writer of MEND and MALMEN artifacts (the Lightning modules' ``export_editor`` calls
        it); ``extra``: more header entries (the training run's model name).
        """
        from kedit.checkpoint import save_artifact

        tensors, own = self.artifact_state()
        if dtype is not None:
            tensors = {k: v.to(dtype) if k.startswith(self.weights_prefix) else v for k, v in tensors.items()}
        return save_artifact(path, self.name, tensors, self.hparams.as_dict(), self.base, {**own, **(extra or {})})

    # -- editing
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Requests) -> WeightDelta:
        """One forward + backward on the edit prompts, then the hypernetwork (Eq. 5).

        Several requests are edited together: their ΔW are summed (factors concatenated).
        A trained MEND refuses a model other than its base (``Editor.check_base``).
        """
        reqs = as_requests(requests)
        net, device = self.ready(model)
        arch = arch_of(model)
        batch = encode(tokenizer, [r.prompt for r in reqs], [r.target_new for r in reqs],
                       seq2seq=arch.encoder_decoder, device=device)
        u, d, _ = gradient_inputs(model, net.names, batch, arch.encoder_decoder)
        n_tok = next(iter(u.values())).shape[0]
        with torch.no_grad():
            deltas = net(u, d, torch.zeros(n_tok, dtype=torch.long, device=device), 1)[0]
        params = dict(model.named_parameters())
        factors = {}
        for name, (left, right) in deltas.items():
            left, right = arch.low_rank_factors(left, right)
            dtype = params[name].dtype
            factors[name] = (left.to(dtype).contiguous(), right.to(dtype).contiguous())
        info = {"editor": "mend", "n_requests": len(reqs), "rank": n_tok}
        return WeightDelta(factors=factors, base=base_identity(model, list(factors)), info=info)
