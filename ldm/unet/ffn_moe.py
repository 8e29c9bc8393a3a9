"""FFN mixture-of-experts layer placed after each attention block of the SS-MoE stage experts.

Official counterpart: ``FeedForwardMoe`` in ``sr_8x_inf/ldm/modules/diffusionmodules/
openaimodel.py`` of tencent-ailab/Frequency_Aug_VAE_MoESR. Output
``x + FFN_k(LayerNorm(x))`` per token, where FFN expert ``k`` is a ``Linear -> GELU -> Dropout ->
Linear`` FFN with a 4x hidden width. Parameter names are the released ones: ``moe_norm``,
``moe_blocks.{k}.0`` and ``moe_blocks.{k}.3``.

Routing modes (``FFNMoE.routing``):

``"random"``
    The released behaviour: every forward draws ONE permutation of the ``N = H*W`` tokens
    (token index ``h*W + w``), shared by all batch elements, splits the permuted tokens into
    consecutive chunks and sends chunk ``k`` to FFN expert ``k``. The permutation comes from
    ``torch.randperm(N, generator=self.generator)``; with ``generator=None`` that is torch's
    default CPU generator, exactly like the release (so ``torch.manual_seed(s)`` before a
    forward reproduces the official routing). The release needs ``N % E == 0``; here any
    ``N`` works: with ``N = q*E + r`` the first ``r`` FFN experts get ``q + 1`` tokens and the
    others ``q`` (chunk sizes differ by at most one; equal to the release when ``r = 0``).
``"average"``
    Deterministic: the FFN experts' weights are averaged once into a single FFN (mean of every
    parameter over the FFN experts, i.e. expert weight averaging with factor ``(E-1)/E``; the
    release's inference path used ``E - 1/E``, a typo). The averaged weights are cached and
    recomputed when any FFN expert parameter changes.
``"fixed"``
    Random routing with a recorded permutation ``fixed_perm`` ([N] int64) used on every
    forward. This is how recorded official routings are replayed: set it with
    ``UNetModel.set_ffn_moe_routing("fixed", perms=[...])`` (one permutation per layer in
    call order) or directly on a layer.

The FFN experts run batched: the routed tokens are gathered into an ``[E, tokens_per_expert, C]``
tensor (padded by at most one slot per FFN expert when ``N % E != 0``) and pushed through two
``torch.baddbmm`` calls over the stacked FFN expert weights, instead of a Python loop over
FFN experts. The parameters stay one ``nn.Linear`` pair per FFN expert (the released names; EMA, EWA
and optimizers see ordinary per-expert parameters), but they are **packed**: each of the four
kinds (``w1, b1, w2, b2``) is a slice of one stacked ``[E, ...]`` tensor, so without gradients
the stack is a view (no copy, no cache, no extra memory). A layer is packed when it is built
and again after every ``.to()`` / ``.half()`` / ``to_empty()`` (which allocate each parameter
anew); a layer whose parameters were replaced otherwise (``load_state_dict(assign=True)``) is
packed in place by its next no-grad forward. With gradients enabled (training) the weights
are stacked by ``torch.stack`` on every forward (differentiable).

**Per-sample routing.** ``generator`` may be a sequence of generators, one per sample of the
batch: sample ``b`` then draws its own permutation from generator ``b`` on every forward, so an
image's routing (and output) does not depend on the other images of its batch, and a batch of
one with ``[g]`` equals the single generator ``g``. A single generator (or a sequence of one)
routes the whole batch with one permutation, as the release does.

Random routing draws its permutation on the CPU (as the release) and computes the token
assignment there; one non-blocking copy moves it to the device, so a GPU forward does not wait
for the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_MODES = ("random", "average", "fixed")


def _randperm(num_tokens: int, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randperm(num_tokens)
    return torch.randperm(num_tokens, generator=generator, device=generator.device)


def chunk_sizes(num_tokens: int, num_experts: int) -> list[int]:
    """Tokens per FFN expert for ``random`` routing: sizes differ by at most one, larger first."""
    q, r = divmod(num_tokens, num_experts)
    return [q + 1] * r + [q] * (num_experts - r)


def _params_key(params: list[torch.Tensor]) -> tuple:
    """Identity of a set of parameters: changes when any is replaced or modified in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


def packed_stack(group: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.stack(group)`` as a view (no copy) when the tensors lie back to back in one
    storage, as :meth:`FFNMoE.pack_experts` leaves them; ``None`` otherwise."""
    first = group[0]
    n = first.numel()
    if n == 0 or not first.is_contiguous():
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for e, p in enumerate(group):
        if (
            p.shape != first.shape
            or p.dtype != first.dtype
            or p.device != first.device
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != storage
            or p.storage_offset() != offset + e * n
        ):
            return None
    return first.detach().as_strided((len(group), *first.shape), (n, *first.stride()), offset)


@functools.lru_cache(maxsize=64)
def _token_slots(num_tokens: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU index tensors of the ``[E, cap]`` slots (``cap = ceil(N / E)``), flattened: the
    permuted position each slot serves, and the indices of the real slots (``None`` when
    ``N % E == 0``). Chunk ``k``, the permuted positions ``[start_k, start_k + size_k)``, goes to
    FFN expert ``k``; the padding slots (at most one per FFN expert) reuse a position. Read-only."""
    q, r = divmod(num_tokens, num_experts)
    cap = q + (1 if r else 0)
    k = torch.arange(num_experts)
    sizes = q + (k < r).long()
    starts = k * q + torch.clamp(k, max=r)
    j = torch.arange(cap)
    pos = (starts[:, None] + j[None, :]).clamp(max=num_tokens - 1).flatten()
    real = (j[None, :] < sizes[:, None]).flatten().nonzero().squeeze(1) if r else None
    return pos, real


class FFNMoE(nn.Module):
    """LayerNorm + ``num_experts`` FFN experts with token routing, residual output.

    Args:
        dim: channels ``C`` of the feature map.
        num_experts: number of FFN experts ``E`` (16 in the release).
        mult: hidden width multiplier (4).
        dropout: dropout between the two linears (0 in the release).
        routing: ``"random"``, ``"average"`` or ``"fixed"`` (see the module docstring).
        generator: torch generator for ``random`` routing (``None``: torch's default CPU one),
            or one generator per sample.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 16,
        mult: int = 4,
        dropout: float = 0.0,
        routing: str = "random",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.dim = dim
        self.num_experts = num_experts
        self.inner_dim = int(dim * mult)
        self.dropout = dropout
        self.moe_norm = nn.LayerNorm(dim)
        self.moe_blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dim, self.inner_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(self.inner_dim, dim),
            )
            for _ in range(num_experts)
        )
        self.fixed_perm: torch.Tensor | None = None
        #: the permutation used by the last ``random``/``fixed`` forward (for logging/replay)
        self.last_perm: torch.Tensor | None = None
        self._average: tuple[tuple, tuple[torch.Tensor, ...]] | None = None
        self.generator = generator
        self.set_routing(routing, generator=generator)
        self.pack_experts()

    # ------------------------------------------------------------------ configuration
    def set_routing(
        self,
        mode: str,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        perm: torch.Tensor | None = None,
    ) -> None:
        """Choose the routing mode; ``perm`` ([N] permutation) is required for ``"fixed"``;
        ``generator``: one generator, or one per sample (see the module docstring)."""
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown FFN-MoE routing {mode!r}; use one of {ROUTING_MODES}")
        if mode == "fixed":
            if perm is None:
                raise ValueError("routing 'fixed' needs a permutation (perm=...)")
            perm = torch.as_tensor(perm, dtype=torch.long).flatten()
            n = perm.numel()
            if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
                raise ValueError(f"fixed routing: perm is not a permutation of 0..{n - 1}")
            self.fixed_perm = perm
        elif perm is not None:
            raise ValueError(f"perm is only used by routing 'fixed', not {mode!r}")
        else:
            self.fixed_perm = None
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = tuple(generator)
            if not generator or not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a sequence of them")
        self.routing = mode
        self.generator = generator

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, routing={self.routing!r}"

    # ------------------------------------------------------------------ weights
    def _expert_params(self) -> list[list[torch.Tensor]]:
        """[w1s, b1s, w2s, b2s], each a list over FFN experts."""
        blocks = self.moe_blocks
        return [
            [b[0].weight for b in blocks],
            [b[0].bias for b in blocks],
            [b[3].weight for b in blocks],
            [b[3].bias for b in blocks],
        ]

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1 [E, 4C, C], b1 [E, 4C], w2 [E, C, 4C], b2 [E, C])``: views of the packed
        parameters without gradients (packing them first if needed), a differentiable
        ``torch.stack`` with gradients."""
        groups = self._expert_params()
        if torch.is_grad_enabled() and any(p.requires_grad for g in groups for p in g):
            return tuple(torch.stack(g) for g in groups)  # type: ignore[return-value]
        views = [packed_stack(g) for g in groups]
        if any(v is None for v in views):
            self.pack_experts()
            views = [packed_stack(g) for g in self._expert_params()]
        return tuple(views)  # type: ignore[return-value]

    def averaged_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The FFN experts' parameters averaged into one FFN: ``(w1, b1, w2, b2)``; cached while
        the parameters stay the same (no-grad only)."""
        params = [p for group in self._expert_params() for p in group]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return tuple(w.mean(0) for w in self.stacked_weights())  # type: ignore[return-value]
        key = _params_key(params)
        if self._average is None or self._average[0] != key:
            with torch.no_grad():
                self._average = (key, tuple(w.mean(0) for w in self.stacked_weights()))
        return self._average[1]  # type: ignore[return-value]

    @torch.no_grad()
    def pack_experts(self) -> None:
        """Store the FFN experts' parameters as slices of four stacked tensors (values unchanged;
        a no-op when they already are). The parameters stay separate ``nn.Parameter`` objects
        with the released names; ``state_dict`` has every FFN expert's tensor."""
        for group in self._expert_params():
            if packed_stack(group) is None:
                stacked = torch.stack([p.detach() for p in group])
                for e, p in enumerate(group):
                    p.data = stacked[e]
        self.clear_cache()

    def is_packed(self) -> bool:
        return all(packed_stack(g) is not None for g in self._expert_params())

    def clear_cache(self) -> None:
        """Drop the cached averaged FFN expert weights."""
        self._average = None

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), to_empty(), device moves allocate each parameter anew: pack again
        self.clear_cache()
        out = super()._apply(fn, recurse)
        self.pack_experts()
        return out

    # ------------------------------------------------------------------ routing
    def draw_permutation(self, num_tokens: int) -> torch.Tensor:
        """One ``randperm(num_tokens)`` from ``self.generator`` (default: torch's CPU one; the
        first one of a per-sample sequence)."""
        gens = self.generator
        return _randperm(num_tokens, gens[0] if isinstance(gens, tuple) else gens)

    def _permutations(self, batch: int, num_tokens: int) -> torch.Tensor:
        """``[1, N]`` (one permutation for the batch) or ``[B, N]`` (one per sample)."""
        if self.routing == "fixed":
            perm = self.fixed_perm
            assert perm is not None
            if perm.numel() != num_tokens:
                raise ValueError(
                    f"fixed routing: the stored permutation has {perm.numel()} entries but this "
                    f"layer sees {num_tokens} tokens (H*W); record perms at the same input size"
                )
            self.last_perm = perm
            return perm[None]
        gens = self.generator
        if isinstance(gens, tuple) and len(gens) > 1:
            if len(gens) != batch:
                raise ValueError(
                    f"per-sample FFN-MoE routing: {len(gens)} generators for a batch of {batch}"
                )
            perms = torch.stack([_randperm(num_tokens, g) for g in gens])
            self.last_perm = perms
            return perms
        perm = _randperm(num_tokens, gens[0] if isinstance(gens, tuple) else gens)
        self.last_perm = perm
        return perm[None]

    def _experts(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Route tokens ``x`` [B, N, C] by ``perm`` ([1, N] shared or [B, N], any device);
        return the FFN expert outputs [B, N, C]. Index tensors are built where ``perm`` is and
        copied without a host sync."""
        b, n, c = x.shape
        e = self.num_experts
        cap = -(-n // e)  # slots per FFN expert
        pos, real = _token_slots(n, e)
        token = perm[:, pos.to(perm.device)]  # [P, E*cap]: original token served by each slot
        shared = token.shape[0] == 1
        idx = token.to(x.device, non_blocking=True)
        if shared:
            xs = x[:, idx[0]]  # [B, E*cap, C]
        else:
            xs = torch.gather(x, 1, idx[..., None].expand(-1, -1, c))
        xs = xs.view(b, e, cap, c).transpose(0, 1).reshape(e, b * cap, c)
        w1, b1, w2, b2 = self.stacked_weights()
        h = torch.baddbmm(b1.unsqueeze(1), xs, w1.transpose(1, 2))
        h = F.dropout(F.gelu(h), p=self.dropout, training=self.training)
        ys = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # [E, B*cap, C]
        ys = ys.view(e, b, cap, c).transpose(0, 1).reshape(b, e * cap, c)
        if real is not None:  # drop the padding slots
            real_x = real.to(x.device, non_blocking=True)
            ys = ys.index_select(1, real_x)
            idx = idx.index_select(1, real_x)
        out = torch.empty_like(ys)
        if shared:
            out[:, idx[0]] = ys  # undo the permutation
        else:
            out.scatter_(1, idx[..., None].expand(-1, -1, c), ys)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] -> ``x + FFN(LayerNorm(x))`` (tokens = the H*W positions)."""
        b, c, h, w = x.shape
        feat = self.moe_norm(x.flatten(2).transpose(1, 2))  # [B, HW, C]
        if self.routing == "average":
            w1, b1, w2, b2 = self.averaged_weights()
            y = F.linear(
                F.dropout(F.gelu(F.linear(feat, w1, b1)), self.dropout, self.training), w2, b2
            )
        else:
            y = self._experts(feat, self._permutations(b, h * w))
        return x + y.transpose(1, 2).reshape(b, c, h, w)
