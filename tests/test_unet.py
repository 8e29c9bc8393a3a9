"""ldm.unet: parameter layout vs the released checkpoints, FFN-MoE routing, layers, converters."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ldm.config import instantiate, load_config
from ldm.official import config_from_official
from ldm.unet import FFNMoE, UNetModel, chunk_sizes, timestep_embedding
from ldm.unet.layers import AttentionBlock

PREFIX = "model.diffusion_model."


def _manifest_unet(manifests_dir) -> dict[str, list[int]]:
    m = json.loads((manifests_dir / "moe_stage_ckpt.json").read_text())
    return {k[len(PREFIX) :]: v[0] for k, v in m.items() if k.startswith(PREFIX)}


def _meta_shapes(preset: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = instantiate(load_config(preset))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_expert_preset_equals_released_checkpoint(manifests_dir):
    ours = _meta_shapes("unet/sr8x_expert")
    ref = _manifest_unet(manifests_dir)
    assert list(ours) == list(ref)  # names and order
    assert ours == ref  # shapes


def test_without_ffn_moe_gives_ldm_names(manifests_dir):
    """Drop the FFN-MoE layers from the released names, shift the indices after them."""
    expected = {}
    for k, shape in _manifest_unet(manifests_dir).items():
        if re.search(r"\.2\.moe_", k):
            continue
        k = k.replace("middle_block.3.", "middle_block.2.")
        k = re.sub(r"^output_blocks\.(\d+)\.3\.conv", r"output_blocks.\1.2.conv", k)
        expected[k] = shape
    assert _meta_shapes("unet/ldm_sr4x") == expected


# --------------------------------------------------------------------------- FFN-MoE


def _naive_moe(layer: FFNMoE, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The released algorithm, a loop over experts, with our chunk sizes for any N."""
    b, c, h, w = x.shape
    feat = layer.moe_norm(x.flatten(2).transpose(1, 2))[:, perm]
    outs, start = [], 0
    for k, size in enumerate(chunk_sizes(h * w, layer.num_experts)):
        outs.append(layer.moe_blocks[k](feat[:, start : start + size]))
        start += size
    y = torch.cat(outs, dim=1)[:, torch.argsort(perm)]
    return x + y.transpose(1, 2).reshape(b, c, h, w)


def _distinct_layer(dim=16, experts=5, seed=0) -> FFNMoE:
    torch.manual_seed(seed)
    layer = FFNMoE(dim, num_experts=experts).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def test_chunk_sizes():
    assert chunk_sizes(128, 16) == [8] * 16
    assert chunk_sizes(21, 5) == [5, 4, 4, 4, 4]
    assert chunk_sizes(3, 5) == [1, 1, 1, 0, 0]
    assert sum(chunk_sizes(1000, 16)) == 1000


@pytest.mark.parametrize("hw", [(4, 8), (3, 7), (1, 2), (5, 5)])  # N = 32, 21, 2, 25; E = 4 or 5
@pytest.mark.parametrize("experts", [4, 5])
def test_batched_experts_equal_loop(hw, experts):
    layer = _distinct_layer(experts=experts)
    x = torch.randn(3, 16, *hw)
    perm = torch.randperm(hw[0] * hw[1])
    layer.set_routing("fixed", perm=perm)
    with torch.no_grad():
        out = layer(x)
        ref = _naive_moe(layer, x, perm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_random_routing_uses_one_perm_from_generator():
    layer = _distinct_layer()
    x = torch.randn(2, 16, 3, 7)  # N = 21, not divisible by 5
    layer.set_routing("random", generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out1 = layer(x)
        perm1 = layer.last_perm
        assert torch.equal(perm1, torch.randperm(21, generator=torch.Generator().manual_seed(7)))
        torch.testing.assert_close(out1, _naive_moe(layer, x, perm1), atol=1e-5, rtol=1e-5)
        out2 = layer(x)  # the generator moves on: another routing
        assert not torch.equal(layer.last_perm, perm1)
        assert not torch.allclose(out1, out2)
        layer.set_routing("random", generator=torch.Generator().manual_seed(7))
        assert torch.equal(layer(x), out1)  # same seed reproduces


def test_random_routing_default_generator_is_torch_cpu_default():
    layer = _distinct_layer()
    x = torch.randn(1, 16, 4, 4)
    torch.manual_seed(1206)
    with torch.no_grad():
        layer(x)
    torch.manual_seed(1206)
    assert torch.equal(layer.last_perm, torch.randperm(16))


def test_average_routing_equals_mean_expert():
    layer = _distinct_layer()
    layer.set_routing("average")
    mean = FFNMoE(16, num_experts=1).eval()
    with torch.no_grad():
        mean.moe_norm.load_state_dict(layer.moe_norm.state_dict())
        for i in (0, 3):
            for name in ("weight", "bias"):
                stacked = torch.stack([getattr(b[i], name) for b in layer.moe_blocks])
                getattr(mean.moe_blocks[0][i], name).copy_(stacked.mean(0))
        x = torch.randn(2, 16, 3, 5)
        out = layer(x)
        torch.testing.assert_close(out, mean(x), atol=1e-5, rtol=1e-5)
        # cached average follows weight changes (in-place update bumps the version)
        layer.moe_blocks[2][3].bias.add_(1.0)
        torch.testing.assert_close(layer(x), out + 1.0 / layer.num_experts, atol=1e-5, rtol=1e-5)


def test_identical_experts_make_routing_irrelevant():
    layer = FFNMoE(16, num_experts=4).eval()
    with torch.no_grad():
        for b in layer.moe_blocks[1:]:
            b.load_state_dict(layer.moe_blocks[0].state_dict())
        x = torch.randn(2, 16, 3, 6)
        outs = []
        for seed in (0, 1):
            layer.set_routing("random", generator=torch.Generator().manual_seed(seed))
            outs.append(layer(x))
        layer.set_routing("average")
        outs.append(layer(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_layers_are_packed_when_built_and_after_every_move():
    """The stack of expert weights is a view of the parameters (no copy, no cache): when built,
    after .double() (which allocates every parameter anew) and after parameters were replaced
    (load_state_dict(assign=True): packed again by the next no-grad forward)."""
    layer = _distinct_layer()
    x = torch.randn(1, 16, 4, 5)  # 20 tokens, 5 experts
    perm = torch.randperm(20)
    names = [n for n, _ in layer.named_parameters()]
    assert layer.is_packed()
    with torch.no_grad():
        layer.set_routing("average")
        ref_avg = layer(x)
        layer.set_routing("fixed", perm=perm)
        ref = layer(x)
        assert [n for n, _ in layer.named_parameters()] == names
        w1, b1, w2, b2 = layer.stacked_weights()
        assert w1.data_ptr() == layer.moe_blocks[0][0].weight.data_ptr()  # a view, not a copy
        assert torch.equal(w2[3], layer.moe_blocks[3][3].weight)
        torch.testing.assert_close(ref, _naive_moe(layer, x, perm), atol=1e-5, rtol=1e-5)
        # an in-place update of one expert is seen through the stack
        layer.moe_blocks[2][3].bias.add_(1.0)
        assert torch.equal(layer.stacked_weights()[3][2], layer.moe_blocks[2][3].bias)
        layer.moe_blocks[2][3].bias.sub_(1.0)
        layer.set_routing("average")
        torch.testing.assert_close(layer(x), ref_avg, rtol=0, atol=1e-6)
    layer.double()
    assert layer.is_packed()
    with torch.no_grad():
        layer.set_routing("fixed", perm=perm)
        torch.testing.assert_close(layer(x.double()), ref.double(), rtol=1e-6, atol=1e-6)
    other = _distinct_layer(seed=1)
    fresh = {k: v.clone() for k, v in other.state_dict().items()}  # separate tensors
    layer.float().load_state_dict(fresh, assign=True)
    assert not layer.is_packed()
    with torch.no_grad():
        out = layer(x)
    assert layer.is_packed()
    torch.testing.assert_close(out, _naive_moe(other, x, perm), atol=1e-5, rtol=1e-5)


def test_a_built_unet_holds_no_second_copy_of_its_experts():
    """No-grad forwards of a UNet built from a preset allocate no stacked expert weights."""
    model = instantiate(load_config("unet/sr8x_expert_tiny")).eval()
    before = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.no_grad():
        model(torch.randn(1, 6, 8, 8), torch.tensor([3]))
        assert {p.untyped_storage().data_ptr() for p in model.parameters()} == before
        for layer in model.ffn_moe_layers():
            assert layer.is_packed() and layer._average is None
            assert layer.stacked_weights()[0].untyped_storage().data_ptr() in before


def test_per_sample_routing_makes_a_sample_independent_of_its_batch():
    """One generator per sample: each sample draws its own permutation, so its output equals
    the sample alone with its generator; a sequence of one equals the generator itself."""
    layer = _distinct_layer()
    x = torch.randn(3, 16, 3, 7)  # N = 21, not divisible by 5

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        layer.set_routing("random", generator=gens(1, 2, 3))
        both = [layer(x), layer(x)]  # two forwards: the generators move on
        perms = layer.last_perm
        assert perms.shape == (3, 21)
        for b, seed in enumerate((1, 2, 3)):
            layer.set_routing("random", generator=gens(seed))
            alone = [layer(x[b : b + 1]), layer(x[b : b + 1])]
            assert torch.equal(alone[0], both[0][b : b + 1])
            assert torch.equal(alone[1], both[1][b : b + 1])
            assert torch.equal(layer.last_perm, perms[b])
            ref = _naive_moe(layer, x[b : b + 1], perms[b])
            torch.testing.assert_close(both[1][b : b + 1], ref, atol=1e-5, rtol=1e-5)
        layer.set_routing("random", generator=torch.Generator().manual_seed(1))
        single = layer(x)
        layer.set_routing("random", generator=gens(1))
        assert torch.equal(layer(x), single)  # [g] == g: one permutation for the batch
        layer.set_routing("random", generator=gens(1, 2))
        with pytest.raises(ValueError, match="2 generators for a batch of 3"):
            layer(x)
    with pytest.raises(TypeError, match="generator"):
        layer.set_routing("random", generator=[1, 2])


def test_packed_experts_train_like_separate_ones():
    sep, packed = _distinct_layer().train(), _distinct_layer().train()
    packed.pack_experts()
    x = torch.randn(2, 16, 3, 7)
    for layer in (sep, packed):
        layer.set_routing("random", generator=torch.Generator().manual_seed(0))
        layer(x).square().mean().backward()
    for (name, a), b in zip(sep.named_parameters(), packed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_gradients_reach_every_routed_expert():
    layer = _distinct_layer().train()
    layer.set_routing("random", generator=torch.Generator().manual_seed(0))
    layer(torch.randn(2, 16, 3, 7)).square().mean().backward()
    for k, block in enumerate(layer.moe_blocks):
        assert block[0].weight.grad is not None and block[0].weight.grad.abs().sum() > 0, k
        assert block[3].bias.grad is not None and block[3].bias.grad.abs().sum() > 0, k


def test_routing_errors():
    layer = _distinct_layer()
    with pytest.raises(ValueError, match="unknown FFN-MoE routing"):
        layer.set_routing("gate")
    with pytest.raises(ValueError, match="not a permutation"):
        layer.set_routing("fixed", perm=torch.tensor([0, 0, 1]))
    layer.set_routing("fixed", perm=torch.arange(6))
    with pytest.raises(ValueError, match="6 entries but this layer sees 20 tokens"):
        layer(torch.randn(1, 16, 4, 5))


# --------------------------------------------------------------------------- UNet


@pytest.fixture(scope="module")
def tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    model = instantiate(load_config("unet/sr8x_expert_tiny")).eval()
    with torch.no_grad():  # non-zero output convs so that every block matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_tiny_unet_forward_any_token_count(tiny_unet):
    x = torch.randn(2, 6, 12, 20)  # FFN-MoE at 3x5 = 15 tokens, 4 experts
    t = torch.tensor([999, 3])
    tiny_unet.set_ffn_moe_routing("random", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_unet(x, t)
        perms = tiny_unet.last_ffn_moe_perms()
        tiny_unet.set_ffn_moe_routing("fixed", perms=perms)
        replay = tiny_unet(x, t)
    assert out.shape == (2, 3, 12, 20) and torch.isfinite(out).all()
    assert [p.numel() for p in perms] == [15] * len(tiny_unet.ffn_moe_layers())
    assert torch.equal(out, replay)


def test_unet_input_errors(tiny_unet):
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        tiny_unet(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_unet(torch.randn(1, 6, 10, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        tiny_unet(torch.randn(2, 6, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="one permutation per FFN-MoE layer"):
        tiny_unet.set_ffn_moe_routing("fixed", perms=[torch.arange(4)])


def test_plain_unet_has_no_ffn_moe():
    model = UNetModel(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    assert not model.ffn_moe_layers()
    assert model.input_blocks[1][0].emb_layers[1].out_features == 64  # scale and shift
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([5])).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="no FFN-MoE layers"):
        model.set_ffn_moe_routing("average")


def test_attention_block_matches_legacy_qkv_split():
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 4, 5)
    b, c, t, heads, ch = 2, 64, 20, 4, 16
    qkv = block.qkv(block.norm(x.reshape(b, c, t)))
    q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)  # heads first, then q|k|v
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
    ref = (x.reshape(b, c, t) + block.proj_out(a)).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 17, 999])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs
    assert torch.equal(emb[:, :3], torch.cos(args)) and torch.equal(emb[:, 3:6], torch.sin(args))
    assert torch.equal(emb[:, 6], torch.zeros(3))


# --------------------------------------------------------------------------- converters


def test_official_converter_release_config():
    official = dict(
        image_size=128,
        in_channels=6,
        out_channels=3,
        model_channels=160,
        attention_resolutions=[16, 8],
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 4],
        num_head_channels=32,
        is_inference=False,
    )
    cfg = config_from_official("UNetModelWithFFNMoe", official)
    assert cfg["target"] == "unet"
    assert cfg["params"]["ffn_moe_experts"] == 16 and cfg["params"]["ffn_moe_routing"] == "random"
    assert "image_size" not in cfg["params"]
    avg = config_from_official("UNetModelWithFFNMoe", {**official, "is_inference": True})
    assert avg["params"]["ffn_moe_routing"] == "average"
    plain = config_from_official(
        "UNetModel", {k: v for k, v in official.items() if k != "is_inference"}
    )
    assert "ffn_moe_experts" not in plain["params"]


def test_official_converter_rejects_unsupported():
    base = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1)
    base.update(attention_resolutions=[1], num_heads=1)
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        config_from_official("UNetModel", {**base, "use_spatial_transformer": True})
    with pytest.raises(ValueError, match="not understood"):
        config_from_official("UNetModel", {**base, "num_experts": 3})
    with pytest.raises(ValueError, match="not understood"):
        config_from_official("UNetModel", {**base, "is_inference": False})


def test_tiny_preset_matches_official_layout():
    """unet/sr8x_expert_tiny has the layout of the fixture's official config (4 experts)."""
    official = dict(
        image_size=64,
        in_channels=6,
        out_channels=3,
        model_channels=32,
        attention_resolutions=[4],
        num_res_blocks=1,
        channel_mult=[1, 2, 1],
        num_head_channels=16,
    )
    cfg = config_from_official("UNetModelWithFFNMoe", official, num_expert_per_ffn_moe_layer=4)
    with torch.device("meta"):
        a = instantiate(cfg).state_dict()
        b = instantiate(load_config("unet/sr8x_expert_tiny")).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_half_precision_model_runs(tiny_unet):
    model = instantiate(load_config("unet/sr8x_expert_tiny")).to(torch.bfloat16).eval()
    model.load_state_dict(tiny_unet.state_dict())
    x, t = torch.randn(1, 6, 8, 8), torch.tensor([10])
    model.set_ffn_moe_routing("average")
    tiny_unet.set_ffn_moe_routing("average")
    with torch.no_grad():
        out = model(x.to(torch.bfloat16), t)
        ref = tiny_unet(x, t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_preset_guesser_names_unet_files():
    from ldm.checkpoint import guess_preset

    for preset in ("unet/sr8x_expert", "unet/ldm_sr4x", "unet/sr8x_expert_tiny"):
        with torch.device("meta"):
            sd = instantiate(load_config(preset)).state_dict()
        assert guess_preset(sd) == preset
        assert guess_preset({PREFIX + k: v for k, v in sd.items()}) == preset


@pytest.mark.parametrize("layout", ["packed", "flat buffer"])
def test_unet_with_shared_storage_saves_and_loads(tmp_path, layout):
    """Packed experts, or all weights in one flat buffer (the SR pipeline's residency), share a
    storage without overlapping: save_pretrained writes every tensor, load gives them back."""
    from ldm.checkpoint import load_pretrained, save_pretrained
    from moe_sr.residency import ExpertResidency

    cfg = load_config("unet/sr8x_expert_tiny")
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    model.pack_ffn_moe_experts()
    if layout == "flat buffer":
        ExpertResidency([model], torch.device("cpu"), torch.float32)
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    path = save_pretrained(model, tmp_path / "unet.safetensors", cfg)
    loaded = load_pretrained(path)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
