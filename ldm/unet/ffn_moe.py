"""FFN mixture-of-experts layer placed after each attention block of the SS-MoE experts.

Official counterpart: ``FeedForwardMoe`` in ``sr_8x_inf/ldm/modules/diffusionmodules/
openaimodel.py`` of tencent-ailab/Frequency_Aug_VAE_MoESR. Output
``x + FFN_k(LayerNorm(x))`` per token, where expert ``k`` is a ``Linear -> GELU -> Dropout ->
Linear`` FFN with a 4x hidden width. Parameter names are the released ones: ``moe_norm``,
``moe_blocks.{k}.0`` and ``moe_blocks.{k}.3``.

Routing modes (``FFNMoE.routing``):

``"random"``
    The released behaviour: every forward draws ONE permutation of the ``N = H*W`` tokens
    (token index ``h*W + w``), shared by all batch elements, splits the permuted tokens into
    consecutive chunks and sends chunk ``k`` to expert ``k``. The permutation comes from
    ``torch.randperm(N, generator=self.generator)``; with ``generator=None`` that is torch's
    default CPU generator, exactly like the release (so ``torch.manual_seed(s)`` before a
    forward reproduces the official routing). The release needs ``N % E == 0``; here any
    ``N`` works: with ``N = q*E + r`` the first ``r`` experts get ``q + 1`` tokens and the
    others ``q`` (chunk sizes differ by at most one; equal to the release when ``r = 0``).
``"average"``
    Deterministic: the experts' weights are averaged once into a single FFN (mean of every
    parameter over the experts, i.e. expert weight averaging with factor ``(E-1)/E``; the
    release's inference path used ``E - 1/E``, a typo). The averaged weights are cached and
    recomputed when any expert parameter changes.
``"fixed"``
    Random routing with a recorded permutation ``fixed_perm`` ([N] int64) used on every
    forward. This is how recorded official routings are replayed: set it with
    ``UNetModel.set_ffn_moe_routing("fixed", perms=[...])`` (one permutation per layer in
    call order) or directly on a layer.

The experts run batched: the routed tokens are gathered into an ``[E, tokens_per_expert, C]``
tensor (padded by at most one slot per expert when ``N % E != 0``) and pushed through two
``torch.baddbmm`` calls over the stacked expert weights, instead of a Python loop over
experts. The parameters stay one ``nn.Linear`` pair per expert (the released names; EMA, EWA
and optimizers see ordinary per-expert parameters), so the batched path needs the weights
stacked into ``[E, ...]`` tensors:

* with gradients enabled (training) they are stacked by ``torch.stack`` on every forward
  (differentiable; on a GPU the copy is small next to forward + backward);
* without gradients (inference), after :meth:`FFNMoE.pack_experts`
  (``UNetModel.pack_ffn_moe_experts()``, what the SR pipeline does) the experts' parameters are
  slices of four stacked tensors, so the stack is a view: no copy and no extra memory;
* without gradients and unpacked, the stack is cached and rebuilt only when an expert parameter
  changes (in-place updates, ``load_state_dict``, ``.to()``). The cache costs one extra copy of
  the expert weights (about 1.26 GB for a full-size fp32 expert UNet); set
  ``cache_stacked_weights = False`` (``UNetModel.cache_ffn_moe_weights(False)``) to trade it
  for a stack per forward, which is slow on the CPU (fresh 2x105 MB allocations per layer).

Random routing draws its permutation on the CPU (as the release) and computes the token
assignment there; one non-blocking copy moves it to the device, so a GPU forward does not wait
for the host.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_MODES = ("random", "average", "fixed")


def chunk_sizes(num_tokens: int, num_experts: int) -> list[int]:
    """Tokens per expert for ``random`` routing: sizes differ by at most one, larger first."""
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
    expert ``k``; the padding slots (at most one per expert) reuse a position. Read-only."""
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
        num_experts: number of expert FFNs ``E`` (16 in the release).
        mult: hidden width multiplier (4).
        dropout: dropout between the two linears (0 in the release).
        routing: ``"random"``, ``"average"`` or ``"fixed"`` (see the module docstring).
        generator: torch generator for ``random`` routing (``None``: torch's default CPU one).
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
        self.cache_stacked_weights = True
        self.fixed_perm: torch.Tensor | None = None
        #: the permutation used by the last ``random``/``fixed`` forward (for logging/replay)
        self.last_perm: torch.Tensor | None = None
        self._cache: dict[str, tuple[tuple, tuple[torch.Tensor, ...]]] = {}
        self.generator = generator
        self.set_routing(routing, generator=generator)

    # ------------------------------------------------------------------ configuration
    def set_routing(
        self,
        mode: str,
        generator: torch.Generator | None = None,
        perm: torch.Tensor | None = None,
    ) -> None:
        """Choose the routing mode; ``perm`` ([N] permutation) is required for ``"fixed"``."""
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
        self.routing = mode
        self.generator = generator

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, routing={self.routing!r}"

    # ------------------------------------------------------------------ weights
    def _expert_params(self) -> list[list[torch.Tensor]]:
        """[w1s, b1s, w2s, b2s], each a list over experts."""
        blocks = self.moe_blocks
        return [
            [b[0].weight for b in blocks],
            [b[0].bias for b in blocks],
            [b[3].weight for b in blocks],
            [b[3].bias for b in blocks],
        ]

    def _cached(self, name: str, build) -> tuple[torch.Tensor, ...]:
        """``build(views_ok) -> (tensors, costs_memory)``, cached while the parameters stay the
        same (no-grad only). Views of packed parameters cost nothing and are always kept."""
        params = [p for group in self._expert_params() for p in group]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build(False)[0]  # differentiable, never cached
        key = _params_key(params)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            value, costs_memory = build(True)
        if not costs_memory or name != "stacked" or self.cache_stacked_weights:
            self._cache[name] = (key, value)
        return value

    def _stack(self, views_ok: bool) -> tuple[tuple[torch.Tensor, ...], bool]:
        groups = self._expert_params()
        if views_ok:
            views = [packed_stack(g) for g in groups]
            if all(v is not None for v in views):
                return tuple(views), False  # type: ignore[arg-type]
        return tuple(torch.stack(g) for g in groups), True

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1 [E, 4C, C], b1 [E, 4C], w2 [E, C, 4C], b2 [E, C])``."""
        return self._cached("stacked", self._stack)  # type: ignore[return-value]

    def averaged_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' parameters averaged into one FFN: ``(w1, b1, w2, b2)``."""

        def build(views_ok: bool) -> tuple[tuple[torch.Tensor, ...], bool]:
            return tuple(w.mean(0) for w in self._stack(views_ok)[0]), True

        return self._cached("average", build)  # type: ignore[return-value]

    @torch.no_grad()
    def pack_experts(self) -> None:
        """Store the experts' parameters as slices of four stacked tensors (values unchanged),
        so inference uses the stack as a view: no copy, no cache. The parameters stay separate
        ``nn.Parameter`` objects with the released names. ``.to()`` / ``.half()`` allocate
        each parameter anew and undo the packing (call this again afterwards). Saving is
        unaffected (``state_dict`` has every expert's tensor; ``save_pretrained`` writes each)."""
        for group in self._expert_params():
            if packed_stack(group) is None:
                stacked = torch.stack([p.detach() for p in group])
                for e, p in enumerate(group):
                    p.data = stacked[e]
        self.clear_cache()

    def clear_cache(self) -> None:
        """Drop the cached stacked / averaged expert weights."""
        self._cache.clear()

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), device moves: stale cache
        self.clear_cache()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ routing
    def draw_permutation(self, num_tokens: int) -> torch.Tensor:
        """One ``randperm(num_tokens)`` from ``self.generator`` (default: torch's CPU one)."""
        g = self.generator
        if g is None:
            return torch.randperm(num_tokens)
        return torch.randperm(num_tokens, generator=g, device=g.device)

    def _permutation(self, num_tokens: int) -> torch.Tensor:
        if self.routing == "fixed":
            perm = self.fixed_perm
            assert perm is not None
            if perm.numel() != num_tokens:
                raise ValueError(
                    f"fixed routing: the stored permutation has {perm.numel()} entries but this "
                    f"layer sees {num_tokens} tokens (H*W); record perms at the same input size"
                )
        else:
            perm = self.draw_permutation(num_tokens)
        self.last_perm = perm
        return perm

    def _experts(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Route tokens ``x`` [B, N, C] by ``perm`` [N] (any device); return the expert outputs
        [B, N, C]. Index tensors are built where ``perm`` is and copied without a host sync."""
        b, n, c = x.shape
        e = self.num_experts
        cap = -(-n // e)  # slots per expert
        pos, real = _token_slots(n, e)
        token = perm[pos.to(perm.device)]  # [E*cap]: original token index served by each slot
        xs = x[:, token.to(x.device, non_blocking=True)]  # [B, E*cap, C]
        xs = xs.view(b, e, cap, c).transpose(0, 1).reshape(e, b * cap, c)
        w1, b1, w2, b2 = self.stacked_weights()
        h = torch.baddbmm(b1.unsqueeze(1), xs, w1.transpose(1, 2))
        h = F.dropout(F.gelu(h), p=self.dropout, training=self.training)
        ys = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # [E, B*cap, C]
        ys = ys.view(e, b, cap, c).transpose(0, 1).reshape(b, e * cap, c)
        if real is not None:  # drop the padding slots
            ys = ys.index_select(1, real.to(x.device, non_blocking=True))
            token = token[real.to(token.device)]
        out = torch.empty_like(ys)
        out[:, token.to(x.device, non_blocking=True)] = ys  # undo the permutation
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
            y = self._experts(feat, self._permutation(h * w))
        return x + y.transpose(1, 2).reshape(b, c, h, w)
