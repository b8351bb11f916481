"""Fused operations: the same math as the plain PyTorch composition, in fewer memory passes."""
