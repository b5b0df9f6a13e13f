"""The run's RoPE table (salad_core.rope_table): made once per sampling run by SALAD's model
wrapper, read by every call, identical to the stock table; other arguments use the stock one."""

import torch

from salad_core import SaladConfig
from salad_core.patch import ROPE_KEY, apply_salad
from salad_core.rope_table import cached_rope_encode, rope_key
from salad_core.runtime import CALL_KEY, CallInfo


def sample(model, steps=3):
    import comfy.sample

    latent = torch.zeros(1, 16, 3, 8, 8)
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(0)), {}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 1.0, "euler", "simple", cond, cond,
                               latent, disable_pbar=True)


def test_rope_table_made_once_per_run_and_equal_to_the_stock_one(tiny_wan_path, load_wan, monkeypatch):
    base = load_wan(tiny_wan_path)
    model_cls = type(base.model.diffusion_model)
    stock, calls = model_cls.rope_encode, []

    def counted(self, *args, **kwargs):
        calls.append(args)
        return stock(self, *args, **kwargs)

    monkeypatch.setattr(model_cls, "rope_encode", counted)
    patched = apply_salad(base, SaladConfig(block_size=16, sparsity=0.5, backend="torch"))
    cached = sample(patched)
    assert len(calls) == 1, f"the stock rope_encode ran {len(calls)} times in a 3-step run"
    sample(patched)
    assert len(calls) == 2, "a new run makes its table again (none is kept between runs)"
    assert patched.get_attachment("salad_runtime")._rope is None

    calls.clear()
    patched.object_patches.pop(ROPE_KEY)  # the stock table at every call
    assert torch.equal(sample(patched), cached)
    assert len(calls) == 4  # the wrapper's table, then one per step


def test_other_arguments_or_rope_options_use_the_stock_function():
    made = []

    def stock(*args, **kwargs):
        made.append((args, kwargs))
        return "stock"

    rope_encode = cached_rope_encode(stock)
    device, dtype = torch.device("cpu"), torch.bfloat16
    key = rope_key((3, 8, 8), {"device": device, "dtype": dtype, "transformer_options": {}})
    options = {CALL_KEY: CallInfo(rope=(key, "table"))}
    assert rope_encode(3, 8, 8, device=device, dtype=dtype, transformer_options=options) == "table"
    assert not made
    assert rope_encode(3, 8, 8, t_start=5, device=device, dtype=dtype, transformer_options=options) == "stock"
    assert rope_encode(4, 8, 8, device=device, dtype=dtype, transformer_options=options) == "stock"
    scaled = {**options, "rope_options": {"scale_t": 2.0}}
    assert rope_encode(3, 8, 8, device=device, dtype=dtype, transformer_options=scaled) == "stock"
    assert rope_encode(3, 8, 8, device=device, dtype=dtype) == "stock"  # outside a SALAD call
    assert len(made) == 4
    assert cached_rope_encode(rope_encode).salad_stock is stock  # SALAD over SALAD wraps the stock one
