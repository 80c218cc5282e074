"""Small in-memory datasets shared by the trainer tests (no files, no loader)."""
import numpy as np
import torch


def blocks_dataset(n, h=64, w=64, num_classes=5, seed=0):
    """Coloured rectangles on noise; the label is the rectangle's class (a few pixels ignored)."""
    g = np.random.default_rng(seed)
    imgs = np.zeros((n, h, w, 3), np.uint8)
    labels = np.zeros((n, h, w), np.uint8)
    colors = g.integers(0, 256, (num_classes, 3))
    for i in range(n):
        for _ in range(6):
            c = g.integers(0, num_classes)
            y, x = g.integers(0, h - 8), g.integers(0, w - 8)
            hh, ww = g.integers(8, h // 2, 2)
            imgs[i, y:y + hh, x:x + ww] = colors[c]
            labels[i, y:y + hh, x:x + ww] = c
    imgs = np.clip(imgs + g.normal(0, 10, imgs.shape), 0, 255).astype(np.uint8)
    labels[g.random(labels.shape) < 0.05] = 255
    return torch.from_numpy(imgs), torch.from_numpy(labels)
