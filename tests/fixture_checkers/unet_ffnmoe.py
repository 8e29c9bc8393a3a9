"""Checker for ``unet_ffnmoe_small``: official ``UNetModelWithFFNMoe`` vs our ``unet``.

Builds our model from the fixture's official config through ``config_from_official``, loads
the official state_dict strictly, and compares: the full forward with identical experts
(any routing, also ``average``), the full forward with distinct experts and the recorded
permutations replayed (``fixed`` routing), the same through ``random`` routing re-drawn from
the seed the fixture used, the timestep embedding, and the attention / FFN-MoE components.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fixture_checkers.common import assert_close, load_io, load_json

FEATURE = "UNet with FFN-MoE layers (ldm.unet, issue 3)"


def _build(fixture_dir: Path):
    from ldm.checkpoint import load_state_dict_strict
    from ldm.config import instantiate
    from ldm.official import config_from_official

    cfg = load_json(fixture_dir, "config.json")
    extra = {}
    if "num_expert_per_ffn_moe_layer" in cfg:
        extra["num_expert_per_ffn_moe_layer"] = cfg["num_expert_per_ffn_moe_layer"]
    model = instantiate(config_from_official(cfg["cls"], cfg["params"], **extra))
    weights = load_file(str(fixture_dir / "weights.safetensors"))
    load_state_dict_strict(model, weights, what="fixture weights.safetensors")
    return model.eval(), weights


def check(fixture_dir: Path) -> None:
    from ldm.unet.layers import timestep_embedding

    io = load_io(fixture_dir)
    meta = load_json(fixture_dir, "meta.json")
    model, weights = _build(fixture_dir)
    x = torch.cat([io["x_t"], io["cond"]], dim=1)
    t = io["timesteps"]

    emb = timestep_embedding(t, model.model_channels)
    assert_close(emb, io["timestep_embedding"], "timestep_embedding")

    with torch.no_grad():
        # identical experts: routing-independent
        for mode in ("random", "average"):
            model.set_ffn_moe_routing(mode, generator=torch.Generator().manual_seed(5))
            assert_close(model(x, t), io["out_identical_experts"], f"out_identical_experts[{mode}]")

        assert_close(model.middle_block[1](io["comp_attn_in"]), io["comp_attn_out"], "comp_attn")
        assert_close(model.middle_block[2](io["comp_moe_in"]), io["comp_moe_out"], "comp_moe")

        # distinct experts, recorded permutations replayed
        distinct = load_file(str(fixture_dir / "weights_distinct_experts.safetensors"))
        model.load_state_dict({**weights, **distinct}, strict=True)
        layers = model.ffn_moe_layers()
        perms = [io[f"perm_distinct_{i}"] for i in range(len(layers))]
        assert f"perm_distinct_{len(layers)}" not in io, "more recorded perms than FFN-MoE layers"
        names = [n for n, m in model.named_modules() if m in layers]
        assert names == meta["moe_layers_in_call_order"], names
        model.set_ffn_moe_routing("fixed", perms=perms)
        assert_close(model(x, t), io["out_distinct_experts"], "out_distinct_experts[fixed]")

        # the released random routing: consecutive randperm draws after manual_seed(seed)
        seed = meta["seeds"]["route_distinct"]
        model.set_ffn_moe_routing("random", generator=torch.Generator().manual_seed(seed))
        out = model(x, t)
        for i, (used, rec) in enumerate(zip(model.last_ffn_moe_perms(), perms)):
            assert torch.equal(used, rec), f"random routing: layer {i} drew another permutation"
        assert_close(out, io["out_distinct_experts"], "out_distinct_experts[random]")
