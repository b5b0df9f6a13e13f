"""Test-only ComfyUI node pack: conditioning without a text encoder.

The Wan text encoder (umT5-XXL) cannot be made tiny, so CPU tests and workflows feed the
sampler zero or seeded-random conditioning of Wan's shape [B, 512, 4096] through this node.
Load it like any custom node folder (symlink/copy into ComfyUI's custom_nodes/, or
``nodes.load_custom_node(<this folder>)``). It imports nothing from the SALAD pack.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io

TEXT_TOKENS = 512
TEXT_DIM = 4096


class SaladTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaladTestConditioning",
            display_name="SALAD Test Conditioning",
            category="SALAD/testing",
            description="Zero or seeded-random Wan text conditioning [batch, 512, 4096] (tests only).",
            inputs=[
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="Batch size of the conditioning tensor."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for mode 'random'; ignored for 'zeros'."),
                io.Combo.Input("mode", options=["zeros", "random"], default="zeros",
                               tooltip="zeros: all-zero context; random: standard normal from the seed."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, batch: int, seed: int, mode: str) -> io.NodeOutput:
        if mode == "zeros":
            cond = torch.zeros(batch, TEXT_TOKENS, TEXT_DIM)
        elif mode == "random":
            gen = torch.Generator().manual_seed(int(seed))
            cond = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=gen)
        else:
            raise ValueError(f"Expected mode 'zeros' or 'random', got {mode!r}. Try 'zeros'.")
        return io.NodeOutput([[cond, {}]])


class SaladTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SaladTestConditioning]


async def comfy_entrypoint() -> SaladTestExtension:
    return SaladTestExtension()
