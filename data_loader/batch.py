"""What the loader hands out: one batch of fixed shape on a shared-memory slot, and its slot contract.

The tensors are zero-copy views of the slot. Batch.to(device) gives the step its tensors (the views
themselves on the CPU, copies on an accelerator) and Batch.release() hands the slot back to the
workers once nothing reads it any more; the loader also releases the held batch when the next one
is requested, as a safety net.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    image: torch.Tensor  # uint8 [B,H,W,3], BGR
    label: torch.Tensor  # uint8 [B,H,W]
    meta: dict
    _release: object = field(default=None, repr=False)
    _copy_event: object = field(default=None, repr=False)

    def to(self, device, non_blocking: bool = True):
        """(image, label) on `device`. On the CPU these are the slot's own zero-copy views; on an
        accelerator, copies (asynchronous from pinned slots: release() then waits for them). Either
        way call release() once nothing reads the views any more: that is the slot contract."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.image, self.label
        image = self.image.to(device, non_blocking=non_blocking)
        label = self.label.to(device, non_blocking=non_blocking)
        if non_blocking:
            self._copy_event = torch.Event(device=device)
            self._copy_event.record()
        return image, label

    def release(self) -> None:
        """Hand the slot back to the workers now (its views must not be used afterwards); waits
        for copies made by to() to finish reading it first."""
        if self._copy_event is not None:
            self._copy_event.synchronize()
            self._copy_event = None
        release, self._release = self._release, None
        if release is not None:
            release()


def collate_meta(batch_index: int, metas: list[dict]) -> dict:
    meta = {"batch_index": batch_index}
    for key in metas[0]:
        values = [m[key] for m in metas]
        meta[key] = torch.tensor(values, dtype=torch.int32) if key in ("valid_hw", "ori_hw") else values
    return meta
