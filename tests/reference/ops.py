"""Autograd functions the tests use to inject gradients with a known closed form."""
import torch


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``factor`` (a layer whose local
    Jacobian blows up, e.g. an unsafe op near a singularity; a NaN factor makes it NaN; a huge finite
    one makes a huge but finite gradient)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None
