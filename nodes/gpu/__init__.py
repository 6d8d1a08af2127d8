"""The physical GPU: backend `sim` (a model) or `vfio` (a real device)."""
