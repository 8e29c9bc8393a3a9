"""Where the stage expert UNets' weights live while sampling: all on the device, or one at a time.

Every stage expert's tensors (parameters and buffers) are held in ONE flat byte buffer laid out like
their storages (:class:`FlatLayout`): tensors that share a storage keep sharing it (the packed
FFN-MoE expert stacks stay packed), and every storage starts at a 256-byte boundary (separate
CUDA allocations start at 512, so kernels see the alignment they would see anyway). So:

* all resident: one device buffer per stage expert, filled once;
* ``offload=True``: each stage expert keeps a "home" buffer on ``offload_device`` (pinned when the
  device is a GPU) and the device holds one or two fixed *slots* of the largest stage expert's size,
  allocated once. A switch is ONE copy of one buffer into a slot and a re-pointing of the
  parameters at views of it; nothing is allocated or freed per switch, so the caching allocator
  never sees the weights move, and nothing is copied back (inference never changes weights).

With ``prefetch`` (default: on for CUDA) the stage expert of the next stage (DDIM runs from the last
stage down to stage 0) is copied into the second slot on a side stream while the current one
computes; the compute stream waits for that copy (an event) only when it switches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ALIGN", "ExpertResidency", "FlatLayout"]

#: byte alignment of every storage region inside a flat buffer
ALIGN = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in a fixed order (what a flat buffer holds)."""
    return [*module.parameters(), *module.buffers()]


class FlatLayout:
    """The byte layout of some tensors in one flat ``uint8`` buffer, mirroring their storages.

    Each distinct storage gets a region (256-byte aligned) as large as the storage; each tensor
    becomes a view with its own dtype, shape, strides and offset inside its storage's region.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._regions: list[tuple[int, torch.UntypedStorage]] = []
        #: per tensor: ``(dtype, size, stride, element offset in the buffer viewed as dtype)``
        self.specs: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]] = []
        start_of: dict[tuple[str, int], int] = {}
        nbytes = 0
        for i, t in enumerate(tensors):
            storage = t.untyped_storage()
            key = (str(storage.device), storage.data_ptr()) if storage.nbytes() else ("", -1 - i)
            if key not in start_of:
                start_of[key] = nbytes
                self._regions.append((nbytes, storage))
                nbytes += _round_up(storage.nbytes(), ALIGN)
            offset = start_of[key] // t.element_size() + t.storage_offset()
            self.specs.append((t.dtype, tuple(t.shape), tuple(t.stride()), offset))
        #: size of the buffer (a multiple of ALIGN, at least ALIGN)
        self.nbytes = max(nbytes, ALIGN)

    def fill(self, flat: torch.Tensor) -> None:
        """Copy the source storages into ``flat``, then forget them (they can be freed)."""
        if flat.dtype != torch.uint8 or flat.numel() < self.nbytes:
            raise ValueError(f"need a uint8 buffer of >= {self.nbytes} bytes")
        for start, storage in self._regions:
            if storage.nbytes():
                src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                flat[start : start + storage.nbytes()].copy_(src)
        self._regions = []

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors as views of ``flat`` (which must hold this layout from byte 0)."""
        typed: dict[torch.dtype, torch.Tensor] = {}
        out = []
        for dtype, size, stride, offset in self.specs:
            if dtype not in typed:
                typed[dtype] = flat.view(dtype)
            out.append(typed[dtype].as_strided(size, stride, offset))
        return out


def _point(module: nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    for t, new in zip(module_tensors(module), tensors, strict=True):
        t.data = new


def _flat_copy(layout: FlatLayout, device: torch.device, pin: bool = False) -> torch.Tensor:
    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
    layout.fill(flat)
    return flat


class ExpertResidency:
    """Keeps the stage experts on ``device`` (default), or with ``offload=True`` only the active one
    (plus, with ``prefetch``, the next one) in device slots and the others at home.

    :meth:`on_switch` is the router's hook (``on_switch(prev_stage, new_stage)``). 3 switches per
    image for four stages, plus one when the next image starts again at the last stage. The
    residency owns the stage experts' storage: moving or casting a stage expert afterwards
    (``.to()``) is undone at its next switch.

    Args:
        unets: the stage experts, in stage order; cast to ``dtype`` (in place) first.
        device: the compute device.
        offload: keep only the active stage expert on the device.
        offload_device: where the others live (``"cpu"``).
        prefetch: copy the next stage's expert ahead on a side stream (default: on for CUDA).
    """

    def __init__(
        self,
        unets: Sequence[nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        *,
        offload: bool = False,
        offload_device: str | torch.device = "cpu",
        prefetch: bool | None = None,
    ) -> None:
        self.unets = list(unets)
        self.device, self.dtype = device, dtype
        self.offload_device = torch.device(offload_device)
        self.offload = offload
        # side streams, events and pinned memory are the CUDA API's; elsewhere copies are plain
        cuda = device.type == "cuda"
        self.prefetch = offload and (cuda if prefetch is None else prefetch)
        self.active: int | None = None
        self.switches = 0
        self.switch_seconds = 0.0
        layouts = []
        for u in self.unets:
            u.to(dtype=dtype).eval().requires_grad_(False)  # no-op (keeps storages) if already
            layouts.append(FlatLayout(module_tensors(u)))
        self._layouts = layouts
        #: device buffers that hold stage expert weights (resident: one per stage expert; offload:
        #: slots)
        self._buffers: list[torch.Tensor] = []
        self._home_flat: list[torch.Tensor] = []  # offload: one home buffer per stage expert
        self._home: list[list[torch.Tensor]] = []  # ... and the stage expert's tensors as its views
        if not offload:
            for u, layout in zip(self.unets, layouts):
                flat = _flat_copy(layout, device)
                _point(u, layout.views(flat))
                self._buffers.append(flat)
        else:
            pin = cuda and self.offload_device.type == "cpu"
            for u, layout in zip(self.unets, layouts):
                flat = _flat_copy(layout, self.offload_device, pin)
                self._home_flat.append(flat)
                self._home.append(layout.views(flat))
                _point(u, self._home[-1])
        num_slots = (2 if self.prefetch else 1) if offload else 0
        self._slot_bytes = max(layout.nbytes for layout in layouts)
        self._slots: list[torch.Tensor | None] = [None] * num_slots
        self._owner: list[int | None] = [None] * num_slots
        self._ready: list[Any] = [None] * num_slots  # CUDA event of a side-stream copy
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(device) if self.prefetch and cuda else None
        #: the most stage expert weight bytes that were on the device at once
        self.peak_resident_bytes = self.resident_bytes()

    # ------------------------------------------------------------------ queries
    def next_stage(self, k: int) -> int:
        """The stage sampled after ``k`` (descending; after stage 0 the next image's last)."""
        return k - 1 if k > 0 else len(self.unets) - 1

    def staged(self) -> list[int]:
        """Stage experts copied ahead into a slot (prefetched), not active yet."""
        return sorted(k for k in self._owner if k is not None and k != self.active)

    def resident_bytes(self) -> int:
        """Bytes of device buffers holding stage expert weights (resident buffers or slots)."""
        buffers = self._buffers + [s for s in self._slots if s is not None]
        return sum(b.numel() for b in buffers)

    # ------------------------------------------------------------------ switching
    def on_switch(self, prev: int | None, new: int) -> None:
        if not self.offload or new == self.active:
            return
        start = time.perf_counter()
        slot = self._owner.index(new) if new in self._owner else None
        if slot is None:  # not prefetched: copy now, in order on the compute stream
            slot = self._free_slot()
            self._wait(slot)  # a side-stream copy into this slot must not land afterwards
            self._copy(new, slot, stream=None)
        else:
            self._wait(slot)
        if self.active is not None:
            self._evict(self.active)
        _point(self.unets[new], self._views(slot, new))
        self.active = new
        nxt = self.next_stage(new)
        if self.prefetch and nxt != new and nxt not in self._owner:
            target = self._free_slot()
            self._allocate(target)  # before the wait below, so the new memory is covered too
            if self._stream is not None:
                # the copy must wait for every kernel already queued that reads the slot
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._copy(nxt, target, stream=self._stream)
        self.switches += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes())
        self.switch_seconds += time.perf_counter() - start

    def _free_slot(self) -> int:
        """A slot not holding the active stage expert (the only slot when there is one)."""
        for s, owner in enumerate(self._owner):
            if owner is None or owner != self.active:
                return s
        return 0

    def _wait(self, slot: int) -> None:
        event, self._ready[slot] = self._ready[slot], None
        if event is not None:  # GPU side: the compute stream waits for the side-stream copy
            torch.cuda.current_stream(self.device).wait_event(event)

    def _allocate(self, slot: int) -> None:
        if self._slots[slot] is None:  # once per slot, on the compute stream
            self._slots[slot] = torch.empty(self._slot_bytes, dtype=torch.uint8, device=self.device)

    def _copy(self, k: int, slot: int, stream: Any) -> None:
        self._allocate(slot)
        home = self._home_flat[k]
        dst = self._slots[slot][: home.numel()]  # type: ignore[index]
        if stream is None:
            dst.copy_(home, non_blocking=True)
        else:
            with torch.cuda.stream(stream):
                dst.copy_(home, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            self._ready[slot] = event
        self._owner[slot] = k

    def _views(self, slot: int, k: int) -> list[torch.Tensor]:
        key = (slot, k)
        if key not in self._slot_views:
            self._slot_views[key] = self._layouts[k].views(self._slots[slot])  # type: ignore[arg-type]
        return self._slot_views[key]

    def _evict(self, k: int) -> None:
        unet = self.unets[k]
        _point(unet, self._home[k])
        self._owner = [None if o == k else o for o in self._owner]
        if hasattr(unet, "ffn_moe_layers"):
            for layer in unet.ffn_moe_layers():  # drop stacked weights held on the device
                layer.clear_cache()
