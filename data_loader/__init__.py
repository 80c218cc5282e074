"""Cityscapes-layout data: index and label maps (cityscapes), label conversion (convert), the
synthetic default dataset (synthetic), mmseg's train pipeline on the kernels (transforms), the
pre-decoded pack (pack) and the shared-memory worker loader (loader).

Import the submodule you need (e.g. `from data_loader.loader import build_train_loader`); this
package file imports nothing so that the command-line tools start without loading torch.
"""
