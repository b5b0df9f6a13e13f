"""Data preparation (issue 8) on CPU: tiny synthetic videos (PyAV) + captions -> sharded cached
latents/text embeddings with ComfyUI's VAE (tiny random Wan2.1-VAE weights), resumable; a
corrupt file and a caption-less one are reported and skipped. The umt5-xxl text encoder cannot
be made tiny (ComfyUI builds it from a fixed 4096-wide config), so a stub ``encode_text`` that
returns [1, 512, 4096] stands in for ``data.comfy_text_encoder``. Then the CLI trains from it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def write_video(path: Path, frames=12, size=(40, 56), fps=16):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(frames):
            img = np.zeros((*size, 3), np.uint8)
            img[..., 0] = (i * 20) % 255
            img[:, : size[1] // 2, 1] = 200
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def stub_text(text: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, text)))
    return torch.randn(1, 512, 4096, generator=g)


@pytest.fixture
def video_dir(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    for i in range(3):
        write_video(d / f"clip{i}.mp4")
        (d / f"clip{i}.txt").write_text(f"a test clip number {i}")
    (d / "broken.mp4").write_bytes(b"\x00\x00 not a video at all" * 50)
    (d / "broken.txt").write_text("broken")
    write_video(d / "nocaption.mp4")
    write_video(d / "short.mp4", frames=3)
    (d / "short.txt").write_text("too short")
    return d


@pytest.fixture
def tiny_vae(comfy, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from workflow_tools import write_tiny_vae

    from salad_core.train.data import comfy_vae

    return comfy_vae(str(write_tiny_vae(tmp_path / "vae.safetensors")))


def test_prepare_videos_reports_bad_and_resumes(video_dir, tiny_vae, tmp_path, caplog):
    from salad_core.train.data import CachedDataset, prepare_videos

    out = tmp_path / "data"
    calls = []
    with caplog.at_level(logging.WARNING, logger="salad.train"):
        index = prepare_videos(video_dir, out, tiny_vae, stub_text, frames=9, height=32, width=48,
                               shard_size=2, progress=lambda n, total: calls.append((n, total)))
    assert set(index["bad"]) == {"broken.mp4", "nocaption.mp4", "short.mp4"}
    assert "unreadable" in index["bad"]["broken.mp4"] and "caption" in index["bad"]["nocaption.mp4"]
    assert "too short" in index["bad"]["short.mp4"]
    for name in index["bad"]:
        assert name in caplog.text
    assert [s["count"] for s in index["shards"]] == [2, 1]
    assert calls[-1] == (6, 6)
    ds = CachedDataset(out)
    assert len(ds) == 3
    item = ds[0]
    assert item["latent"].shape == (16, 3, 4, 6) and item["context"].shape == (512, 4096)
    # resumable: a second run re-encodes nothing that finished
    encoded = []
    index2 = prepare_videos(video_dir, out, tiny_vae, lambda t: encoded.append(t) or stub_text(t),
                            frames=9, height=32, width=48, shard_size=2)
    assert encoded == [] and len(index2["shards"]) == 2
    with pytest.raises(ValueError, match="Expected a cache made with"):
        prepare_videos(video_dir, out, tiny_vae, stub_text, frames=13, height=32, width=48)


def test_cli_trains_from_prepared_videos_and_prompts(video_dir, tiny_vae, tiny_wan_path, comfy, tmp_path):
    from salad_core.train.data import prepare_prompts, prepare_videos
    from salad_core.weights import load_salad_weights

    vids = tmp_path / "vdata"
    prepare_videos(video_dir, vids, tiny_vae, stub_text, frames=9, height=32, width=48)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog on a beach\n")
    pdata = tmp_path / "pdata"
    prepare_prompts(prompts, pdata, stub_text)
    env = {**os.environ, "COMFYUI_PATH": str(comfy), "PYTHONPATH": str(REPO)}
    common = ["--model", str(tiny_wan_path), "--steps", "2", "--global-batch", "2", "--lora-rank", "4",
              "--block-size", "16", "--sparsity", "0.5", "--backend", "torch", "--save-every", "1"]
    for data, objective, extra in ((vids, "flow", []), (pdata, "distill", ["--frames", "9", "--height", "32", "--width", "48"])):
        out = tmp_path / f"run-{objective}"
        r = subprocess.run([sys.executable, "-m", "salad_core.train", "train", "--data", str(data), "--out", str(out),
                            "--objective", objective, *common, *extra], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        w = load_salad_weights(str(out / "salad.safetensors"))
        assert w.meta.trained_steps == 2 and w.meta.lora_rank == 4
        assert len((out / "loss.jsonl").read_text().splitlines()) == 2
