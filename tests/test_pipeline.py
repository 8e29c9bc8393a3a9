"""The 8x SR pipeline on tiny random models (moe_sr/pipeline.py, moe_sr/tiling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.schedule import NoiseSchedule
from ldm.unet.ffn_moe import packed_stack
from moe_sr.pipeline import MoESRPipeline
from moe_sr.residency import ALIGN, ExpertResidency, FlatLayout, module_tensors
from moe_sr.stages import StageSchedule
from moe_sr.tiling import (
    TiledDenoiser,
    TilingConfig,
    crop_boxes_cover,
    gaussian_weights,
    tile_boxes,
    tiled_fa_vae_decode,
)
from tests.moe_sr_helpers import StandInFAVAE, tiny_fa_vae, tiny_unets

NO_TILES = TilingConfig(mode="off")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def make_pipe(vae=None, **kw) -> MoESRPipeline:
    kw.setdefault("steps", 4)
    kw.setdefault("tiling", NO_TILES)
    return MoESRPipeline(
        tiny_unets(), StageSchedule.uniform(4), NoiseSchedule.linear(), vae or StandInFAVAE(), **kw
    )


@pytest.fixture(scope="module")
def pipe() -> MoESRPipeline:
    return make_pipe()


def test_end_to_end_any_size(pipe):
    """37x53 (non-square, not a multiple of 8) -> exactly 296x424; latent 2x the LR."""
    lr = torch.rand(3, 37, 53)
    out = pipe(lr, steps=2)
    assert out.image.shape == (3, 296, 424)
    assert out.latent.shape == (3, 74, 106)
    assert out.image.dtype == torch.float32 and 0 <= out.image.min() and out.image.max() <= 1
    again = pipe(lr, steps=2)
    assert torch.equal(out.image, again.image)  # seeded: same seed, same image
    other = pipe(lr, steps=2, seed=7)
    assert not torch.equal(out.latent, other.latent)


def test_end_to_end_with_the_tiny_fa_vae():
    p = make_pipe(vae=tiny_fa_vae(), steps=2)
    out = p(torch.rand(3, 7, 9))
    assert out.image.shape == (3, 56, 72) and out.latent.shape == (3, 14, 18)
    assert torch.isfinite(out.image).all() and out.image.std() > 0


@pytest.mark.slow
def test_end_to_end_37x53_with_the_tiny_fa_vae():
    out = make_pipe(vae=tiny_fa_vae(), steps=2)(torch.rand(3, 37, 53))
    assert out.image.shape == (3, 296, 424)


def test_inputs_uint8_grayscale_and_bad_values(pipe):
    gray = torch.randint(0, 256, (1, 5, 6), dtype=torch.uint8)
    assert pipe(gray, steps=1).image.shape == (3, 40, 48)
    assert pipe(torch.rand(3, 1, 1), steps=1).image.shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(torch.rand(3, 8, 8) * 2, steps=1)
    with pytest.raises(ValueError, match="colour fix"):
        pipe(torch.rand(3, 8, 8), color_fix="sepia")


def test_colour_fix_modes(pipe):
    lr = torch.rand(3, 6, 7)
    out = {m: pipe(lr, steps=1, color_fix=m).image for m in ("adain", "wavelet", "none")}
    assert all(o.shape == (3, 48, 56) for o in out.values())
    assert not torch.equal(out["adain"], out["none"])
    assert not torch.equal(out["wavelet"], out["none"])
    # AdaIN matches the channel means of the x2 condition (before clamping to [0, 1])
    cond_mean = lr.mean((1, 2))
    assert torch.allclose(out["adain"].mean((1, 2)), cond_mean, atol=0.08)


def test_router_sends_each_step_to_its_expert(pipe):
    """8 DDIM steps: t = 876, 751 | 626, 501 | 376, 251 | 126, 1 -> two calls per expert."""
    calls = [0, 0, 0, 0]
    hooks = [
        u.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, u in enumerate(pipe.unets)
    ]
    try:
        pipe(torch.rand(3, 4, 4), steps=8)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2, 2, 2, 2]


def test_ffn_moe_routing_modes(pipe):
    lr = torch.rand(3, 6, 6)
    pipe.set_ffn_moe_routing("average")
    try:
        avg = pipe(lr, steps=2).image
        assert {layer.routing for u in pipe.unets for layer in u.ffn_moe_layers()} == {"average"}
    finally:
        pipe.set_ffn_moe_routing("random")
    rnd = pipe(lr, steps=2).image
    assert {layer.routing for u in pipe.unets for layer in u.ffn_moe_layers()} == {"random"}
    assert not torch.equal(avg, rnd)
    with pytest.raises(ValueError, match="routing"):
        pipe.set_ffn_moe_routing("top2")


def test_offload_moves_experts_once_per_stage_and_changes_nothing(pipe):
    lr = torch.rand(3, 6, 6)
    ref = pipe(lr, steps=4).image
    off = make_pipe(offload=True)
    assert off.residency.switches == 0
    out = off(lr, steps=4)
    assert off.residency.switches == 4  # the first expert's load + 3 stage changes
    off(lr, steps=4)
    assert off.residency.switches == 8  # the next image starts again at the last stage
    assert off.residency.active == 0
    torch.testing.assert_close(out.image, ref, rtol=0, atol=0)


def test_offload_prefetches_the_next_stage():
    res = ExpertResidency(tiny_unets(), torch.device("cpu"), torch.float32, offload=True,
                          prefetch=True)  # fmt: skip
    staged = []
    for prev, new in [(None, 3), (3, 2), (2, 1), (1, 0), (0, 3)]:
        res.on_switch(prev, new)
        staged.append(res.staged())
    assert staged == [[2], [1], [0], [3], [2]] and res.switches == 5
    res.on_switch(3, 1)  # not the prefetched one: copied at once, over the staged slot
    assert res.active == 1 and res.staged() == [0] and res.switches == 6


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("prefetch", [False, True])
def test_offload_switches_reuse_fixed_slots_and_change_no_weight(prefetch):
    """A switch copies one buffer into a slot allocated once; the active expert's tensors are
    views of that slot, the others of their home buffers, all values unchanged."""
    unets = tiny_unets()
    for u in unets:
        u.pack_ffn_moe_experts()
    ref = [{k: v.clone() for k, v in u.state_dict().items()} for u in unets]
    res = ExpertResidency(unets, torch.device("cpu"), torch.float32, offload=True,
                          prefetch=prefetch)  # fmt: skip
    homes = [{_storage(t) for t in module_tensors(u)} for u in unets]
    assert all(len(h) == 1 for h in homes)  # one home buffer per expert
    assert res.resident_bytes() == 0
    slots = None
    for prev, new in [(None, 3), (3, 2), (2, 1), (1, 0), (0, 3), (3, 2)]:
        res.on_switch(prev, new)
        now = [s.data_ptr() for s in res._slots if s is not None]
        slots = slots or now
        assert now == slots  # nothing allocated per switch
        for k, u in enumerate(unets):
            where = {_storage(t) for t in module_tensors(u)}
            assert where <= set(slots) if k == new else where == homes[k], (new, k)
            for name, v in u.state_dict().items():
                assert torch.equal(v, ref[k][name]), (new, k, name)
        layer = unets[new].ffn_moe_layers()[0]
        assert packed_stack([b[0].weight for b in layer.moe_blocks]) is not None  # still packed
    assert len(slots) == (2 if prefetch else 1)
    packed = tiny_unets()[0]
    packed.pack_ffn_moe_experts()
    one = FlatLayout(module_tensors(packed)).nbytes
    assert res.resident_bytes() == res.peak_resident_bytes == len(slots) * one


def test_flat_layout_keeps_dtypes_strides_sharing_and_alignment():
    base = torch.randn(6, 5)
    shared = base[1:4, ::2]  # a strided view sharing base's storage
    tensors = [base, torch.arange(7, dtype=torch.int64), shared, torch.zeros(0),
               torch.ones(3, dtype=torch.float16), base.t()]  # fmt: skip
    layout = FlatLayout(tensors)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.fill(flat)
    views = layout.views(flat)
    for t, v in zip(tensors, views):
        assert v.dtype == t.dtype and v.shape == t.shape and v.stride() == t.stride()
        assert torch.equal(v, t)
        assert _storage(v) == flat.data_ptr()
        assert (v.data_ptr() - flat.data_ptr()) % ALIGN == 0 or v is views[2] or v.numel() == 0
    views[0][1, 0] = 100.0  # the view of a view still shares memory with its base
    assert views[2][0, 0] == 100.0 and views[5][0, 1] == 100.0
    assert layout.nbytes % ALIGN == 0 and layout.nbytes < base.numel() * 4 + 4 * ALIGN + 64
    with pytest.raises(ValueError, match="uint8 buffer"):
        FlatLayout(tensors).fill(torch.empty(8, dtype=torch.uint8))


def test_resident_experts_live_in_one_buffer_each_and_stay_packed(pipe):
    for u in pipe.unets:
        assert len({_storage(t) for t in module_tensors(u)}) == 1
        layer = u.ffn_moe_layers()[0]
        w1 = layer.stacked_weights()[0]
        assert w1.data_ptr() == layer.moe_blocks[0][0].weight.data_ptr()  # no stacked copy
    packed = tiny_unets()
    for u in packed:
        u.pack_ffn_moe_experts()
    layouts = [FlatLayout(module_tensors(u)) for u in packed]
    assert pipe.residency.resident_bytes() == sum(layout.nbytes for layout in layouts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("prefetch", [False, True])
def test_offload_keeps_one_expert_on_the_device(prefetch):
    """Only the active expert (and with prefetch the next one) is on the GPU; the others point
    at their pinned home copies, unchanged."""
    unets = tiny_unets()
    ref = [{k: v.clone() for k, v in u.state_dict().items()} for u in unets]
    res = ExpertResidency(
        unets, torch.device("cuda"), torch.float32, offload=True, prefetch=prefetch
    )
    assert res.resident_bytes() == 0
    res.on_switch(None, 3)
    res.on_switch(3, 2)
    torch.cuda.synchronize()
    devices = [{p.device.type for p in u.parameters()} for u in unets]
    assert devices == [{"cpu"}, {"cpu"}, {"cuda"}, {"cpu"}]
    assert all(p.is_pinned() for p in unets[0].parameters())
    one = FlatLayout(module_tensors(tiny_unets()[2])).nbytes
    assert res.resident_bytes() == res.peak_resident_bytes == (2 if prefetch else 1) * one
    x = torch.randn(1, 6, 16, 16, device="cuda")
    t = torch.tensor([600], device="cuda")
    # the FFN-MoE routing is random (drawn from the default CPU generator, also for a GPU
    # model): seed it identically so both forwards route the tokens the same way
    torch.manual_seed(0)
    with torch.no_grad():
        got = unets[2](x, t).cpu()
    unets[2].load_state_dict(ref[2])  # back to CPU values, compute there
    torch.manual_seed(0)
    with torch.no_grad():
        want = unets[2].cpu()(x.cpu(), t.cpu())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for k in (0, 1, 3):
        for name, v in unets[k].state_dict().items():
            assert torch.equal(v, ref[k][name]), name
    assert res.switches == 2


def test_bfloat16_unets_with_float32_vae(pipe):
    lr = torch.rand(3, 6, 6)
    ref = pipe(lr, steps=2).image
    half = make_pipe(dtype=torch.bfloat16, vae_dtype=torch.float32, steps=2)
    assert {p.dtype for u in half.unets for p in u.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}
    out = half(lr)
    assert out.image.dtype == torch.float32 and out.image.shape == ref.shape
    assert psnr(out.image, ref) > 20, psnr(out.image, ref)


# ----------------------------------------------------------------------------- tiling


def test_tile_boxes_cover_and_overlap():
    for h, w, tile, overlap in [(100, 37, 32, 8), (32, 32, 32, 8), (40, 200, 16, 4)]:
        boxes = tile_boxes(h, w, tile, overlap, multiple=4)
        assert crop_boxes_cover(boxes, h, w)
        assert all((y1 - y0) % 4 == 0 and (x1 - x0) % 4 == 0 for y0, y1, x0, x1 in boxes)
        assert all(y1 <= h and x1 <= w for _, y1, _, x1 in boxes)
    wgt = gaussian_weights(16, 16)
    assert wgt.min() > 1e-4 and wgt.max() == wgt[7:9, 7:9].max()
    assert wgt[0, 8] / wgt[8, 8] == pytest.approx(0.0195, rel=0.05)  # edge ~2% of the centre


def test_tiled_denoiser_is_exact_for_a_pointwise_denoiser():
    def pointwise(x_t, t, cond):
        return x_t * 0.5 + cond * (t.float() / 1000)[:, None, None, None]

    x, c = torch.randn(2, 3, 40, 24), torch.randn(2, 3, 40, 24)
    t = torch.tensor([10, 900])
    tiled = TiledDenoiser(pointwise, 16, 8, multiple=4, tile_batch=3)
    torch.testing.assert_close(tiled(x, t, c), pointwise(x, t, c))


def test_tiled_sampling_stays_close_to_untiled():
    """Tiny random UNets (global attention and per-tile GroupNorm statistics at the lowest
    level): LR 32x32 -> latent 64x64 in four 48x48 tiles (overlap 32). Measured: tiled vs
    untiled PSNR ~29 dB, while two seeds of the untiled pipeline differ at ~10 dB."""
    lr = torch.rand(3, 32, 32)
    p = make_pipe(steps=4)
    ref = p(lr).image
    other_seed = p(lr, seed=43).image
    p.tiling = TilingConfig(mode="on", latent_tile=48, latent_overlap=32, vae_tile=256)
    out = p(lr).image
    value, baseline = psnr(out, ref), psnr(other_seed, ref)
    print(f"tiled vs untiled PSNR {value:.1f} dB; another seed {baseline:.1f} dB")
    assert value > 24 and value > baseline + 12, (value, baseline)
    assert not torch.equal(out, ref)  # the tiles really ran


@pytest.mark.parametrize("size, tile, overlap", [(32, 24, 16), (40, 32, 8)])
def test_tiled_fa_vae_decode_stays_close_to_untiled(size, tile, overlap):
    """Tiny random FA-VAE, the encoder run per tile for the skip features: latent 32x32 in four
    24x24 tiles (overlap 16), 40x40 in four 32x32 tiles (overlap 8 asked, 24 given by spreading
    the full-size tiles). Measured: PSNR ~25.5 / ~27.6 dB (images in [0, 1])."""
    vae = tiny_fa_vae()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, size, size, generator=g)
    enc = torch.rand(1, 3, 4 * size, 4 * size, generator=g) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(z, skips=vae.encode(enc, return_features=True)[1])
        out = tiled_fa_vae_decode(vae, z, enc, tile, overlap)
    value = psnr((out + 1) / 2, (ref + 1) / 2)
    print(f"tiled FA-VAE decode PSNR: {value:.1f} dB")
    assert value > 22, value


def test_auto_tiling_thresholds():
    cfg = TilingConfig(latent_tile=32, latent_overlap=8, vae_tile=64)
    assert not cfg.use_latent_tiles(32, 32) and cfg.use_latent_tiles(33, 8)
    assert cfg.use_vae_tiles(8, 65) and not TilingConfig(mode="off").use_vae_tiles(999, 999)
    with pytest.raises(ValueError, match="overlap"):
        TilingConfig(latent_tile=16, latent_overlap=16)


def test_prefetch_stream_ordering_with_fake_cuda_streams(monkeypatch):
    """The CUDA-only ordering of the offload prefetch, checked on the CPU with recording fakes
    of the stream API: a side-stream copy starts only after the compute stream's queued work
    (wait_stream) and never into the active expert's slot, and the compute stream waits for the
    event of exactly the copy whose slot it switches to."""
    log: list[tuple] = []

    class FakeEvent:
        count = 0

        def __init__(self, *a, **k):
            FakeEvent.count += 1
            self.id = FakeEvent.count

        def record(self, stream):
            log.append(("record", stream.name, self.id))

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event):
            log.append(("wait_event", self.name, event.id))

    compute, side = FakeStream("compute"), FakeStream("side")
    current = [compute]

    class use_stream:  # noqa: N801 - stands in for torch.cuda.stream
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream.name))
            current.append(self.stream)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    res = ExpertResidency(tiny_unets(), torch.device("cpu"), torch.float32, offload=True,
                          prefetch=True)  # fmt: skip
    res._stream = side  # what a CUDA device gets
    slot_of_event: dict[int, int] = {}
    real_copy = res._copy

    def copy(k, slot, stream):
        log.append(("copy", k, slot, "compute" if stream is None else stream.name))
        real_copy(k, slot, stream)
        if stream is not None:
            slot_of_event[res._ready[slot].id] = slot

    monkeypatch.setattr(res, "_copy", copy)
    for prev, new in [(None, 3), (3, 2), (2, 1), (1, 0), (0, 3), (3, 1)]:
        staged_before = res.staged()
        pending = {s: e.id for s, e in enumerate(res._ready) if e is not None}
        log.clear()
        res.on_switch(prev, new)
        slot = res._owner.index(new)
        waits = [x for x in log if x[0] == "wait_event"]
        copies = [x for x in log if x[0] == "copy"]
        if new in staged_before:  # prefetched: wait for exactly that copy, copy nothing now
            assert [slot_of_event[w[2]] for w in waits] == [slot]
            assert all(c[3] == "side" for c in copies)
        else:  # copied now, on the compute stream, after any pending copy into that slot
            first = copies[0]
            assert first[1:] == (new, slot, "compute")
            want = [("wait_event", "compute", pending[slot])] if slot in pending else []
            assert waits == want and all(log.index(w) < log.index(first) for w in waits)
        for c in copies[1:] if new not in staged_before else copies:  # the prefetch
            assert c[3] == "side" and c[1] == res.next_stage(new) and c[2] != slot
            assert log.index(("wait_stream", "side", "compute")) < log.index(("enter", "side"))
    assert res.switches == 6 and res.staged() == [0]


# ----------------------------------------------------------------------------- batches, solvers


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "unipc"])
def test_an_image_is_identical_alone_and_in_a_batch(sampler, monkeypatch):
    """Seeds, x_T, per-step noise and FFN-MoE routing belong to each image: every random draw
    of an image is the same alone and in a batch (exactly), so its output is the same up to
    the rounding of batched kernels (oneDNN picks other conv/GEMM algorithms per batch size:
    ~1e-6 of the image range here, far below one 8-bit level)."""
    import ldm.diffusion.ddim as ddim_mod
    import ldm.unet.ffn_moe as ffn_mod

    draws: list[tuple[str, torch.Tensor]] = []
    real_noise, real_perms = ddim_mod.draw_noise, ffn_mod.FFNMoE._permutations

    def noise(shape, like, generator=None):
        out = real_noise(shape, like, generator)
        draws.append(("noise", out))
        return out

    def perms(self, batch, n):
        out = real_perms(self, batch, n)
        draws.append(("perm", out))
        return out

    monkeypatch.setattr(ddim_mod, "draw_noise", noise)
    monkeypatch.setattr(ffn_mod.FFNMoE, "_permutations", perms)
    p = make_pipe(vae=tiny_fa_vae(), steps=4, sampler=sampler)
    g = torch.Generator().manual_seed(5)
    lrs = [torch.rand(3, 6, 10, generator=g) for _ in range(4)]
    alone = p(lrs[2], seed=11)
    alone_draws, draws[:] = list(draws), []
    batch = p.run_batch(lrs, seeds=[3, 4, 11, 6])
    assert len(draws) == len(alone_draws) > 0
    for (kind, got), (_, want) in zip(draws, alone_draws):
        assert torch.equal(got[2], want[0]), kind
    shape = p.latent_shape(6, 10)
    x_T = p._start_latents([None, None], [torch.Generator().manual_seed(s) for s in (3, 11)], shape)
    assert torch.equal(
        x_T[1:], p._start_latents([None], [torch.Generator().manual_seed(11)], shape)
    )
    torch.testing.assert_close(batch[2].image, alone.image, rtol=0, atol=1e-4)
    torch.testing.assert_close(batch[2].latent, alone.latent, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(batch[0].latent, batch[1].latent)
    same_seed = p.run_batch(lrs[:2], seeds=[11, 11])  # same seed, different images
    assert not torch.equal(same_seed[0].image, same_seed[1].image)


def test_batches_need_one_padded_size_and_tiled_images_run_one_by_one():
    p = make_pipe(steps=2)
    with pytest.raises(ValueError, match="one padded size"):
        p.run_batch([torch.rand(3, 6, 6), torch.rand(3, 10, 6)])
    p.tiling = TilingConfig(mode="on", latent_tile=8, latent_overlap=4, vae_tile=8, vae_overlap=4)
    lrs = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    batch = p.run_batch(lrs, seeds=[1, 2])
    assert torch.equal(batch[1].image, p(lrs[1], seed=2).image)


def test_starting_latents_reproduce_a_seeded_run():
    """``latents=`` replaces the seeded x_T; passing a run's own x_T back reproduces it."""
    p = make_pipe(steps=3)
    lr = torch.rand(3, 5, 7)
    shape = p.latent_shape(5, 7)
    assert shape == (3, 12, 16)  # LR padded to 6x8 (a multiple of the UNet divisor / 2)
    x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(42))
    seeded = p(lr)
    assert torch.equal(p(lr, latents=x_T[0]).image, seeded.image)
    other = p(lr, latents=torch.zeros(shape))
    assert not torch.equal(other.latent, seeded.latent)
    with pytest.raises(ValueError, match="latents must have shape"):
        p(lr, latents=torch.zeros(3, 8, 8))


def test_sampler_choice_and_its_checks():
    p = make_pipe(steps=5, sampler="unipc", spacing="quadratic")
    calls = []
    out = p(torch.rand(3, 4, 4), callback=lambda i, t, *_: calls.append(t))
    assert calls == [999, 639, 360, 160, 40]  # (k/5)^2 * 999, k = 5 .. 1
    assert out.image.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="deterministic"):
        p(torch.rand(3, 4, 4), eta=1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        p.set_sampler("euler")
    ddim = p(torch.rand(3, 4, 4), sampler="ddim", eta=0.0)  # per call
    assert ddim.image.shape == (3, 32, 32)


def test_memory_is_estimated_and_refused_before_any_work(monkeypatch):
    """A 4000x4000 LR input (32000x32000 output, ~12 GB as one float32 image) is refused with
    one line before the conditioning is built or any network runs."""
    import moe_sr.pipeline as pipeline_mod

    p = make_pipe(steps=2)
    est = p.memory_estimate(1, 8000, 8000)
    assert est.parts["output"] >= 3 * 32000**2 * 4 * 3  # result, blend, colour fix
    assert est.total > 40 * 2**30
    calls = []
    monkeypatch.setattr(pipeline_mod, "condition_x2", lambda *a: calls.append(a))
    monkeypatch.setattr(pipeline_mod, "available_bytes", lambda device: 24 * 2**30)
    lr = torch.zeros(4000, 4000, 3, dtype=torch.uint8).numpy()
    with pytest.raises(MemoryError, match=r"4000x4000 px needs about .* GB .* 24.0 GB free"):
        p(lr)
    assert calls == []
    monkeypatch.undo()
    p.check_memory = False
    monkeypatch.setattr(pipeline_mod, "available_bytes", lambda device: 1)
    assert p(torch.rand(3, 4, 4)).image.shape == (3, 32, 32)


def test_tiled_decode_reports_progress_and_builds_the_x8_input_per_tile(monkeypatch):
    import moe_sr.tiling as tiling_mod

    p = make_pipe(steps=1, vae=tiny_fa_vae())
    p.tiling = TilingConfig(mode="auto", latent_tile=64, vae_tile=16, vae_overlap=4)
    monkeypatch.setattr(tiling_mod, "encoder_input", None)  # the whole x8 input: never made
    seen = []
    out = p(torch.rand(3, 14, 12), decode_callback=lambda i, n: seen.append((i, n)))
    assert out.image.shape == (3, 112, 96)
    assert seen == [(i, 4) for i in range(1, 5)]  # latent 28x24 in 2x2 tiles
