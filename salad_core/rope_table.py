"""Wan's RoPE table, made once per sampling run instead of at every model call.

ComfyUI's WanModel rebuilds its RoPE table (cos and sin of every token position, in fp64) at
every call, and only self-attention reads it. Under torch.compile, Inductor fuses that into one
kernel that recomputes the fp64 powers, cos and sin for every output element: 13.6 ms per step
at 1.3B 832x480x81 on an H100, about 6 % of a SALAD step (e2e-NOTES session 8). SALAD's model
wrapper builds the table eagerly, once per run, with the model's own ``rope_encode``, and hands
it to the layers' call through the call info; ``cached_rope_encode`` (an object patch on the
model's ``rope_encode``) returns it when the arguments match and runs the stock function
otherwise (other callers, other arguments)."""

from __future__ import annotations

from typing import Callable

from .runtime import CALL_KEY


def rope_key(args: tuple, kwargs: dict) -> tuple:
    """What the table depends on: rope_encode's arguments and the call's rope_options."""
    options = kwargs.get("transformer_options") or {}
    rope_options = options.get("rope_options")
    rest = tuple(sorted((k, v) for k, v in kwargs.items() if k != "transformer_options"))
    return args, rest, None if rope_options is None else tuple(sorted(rope_options.items()))


def cached_rope_encode(stock: Callable) -> Callable:
    """``stock`` (a WanModel's bound rope_encode), answering from the call's table when it was
    made for these arguments."""
    stock = getattr(stock, "salad_stock", stock)  # SALAD applied over SALAD: wrap the stock one

    def rope_encode(*args, **kwargs):
        call = (kwargs.get("transformer_options") or {}).get(CALL_KEY)
        table = None if call is None else call.rope
        if table is not None and table[0] == rope_key(args, kwargs):
            return table[1]
        return stock(*args, **kwargs)

    rope_encode.salad_stock = stock
    return rope_encode


def model_rope_args(model, x, time_dim_concat, transformer_options: dict, kwargs: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) WanModel._forward (ComfyUI 0.3.75) passes to rope_encode for this call.
    A later ComfyUI that passes others only misses the table (the stock function runs)."""
    import comfy.ldm.common_dit

    t_len = x.shape[2]
    if time_dim_concat is not None:
        padded = [comfy.ldm.common_dit.pad_to_patch_size(t, model.patch_size) for t in (x, time_dim_concat)]
        t_len = padded[0].shape[2] + padded[1].shape[2]
    if getattr(model, "ref_conv", None) is not None and "reference_latent" in kwargs:
        t_len += 1
    return (t_len, x.shape[3], x.shape[4]), {"device": x.device, "dtype": x.dtype, "transformer_options": transformer_options}
