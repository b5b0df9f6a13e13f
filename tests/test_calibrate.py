"""SALAD calibration (issue 7): ST-SWA windows, gate thresholds, branch dropping, plots, errors.

Pure-tensor tests check the all-radii RSE computation against the real block-sparse kernel and
the spatial/temporal decision on synthetic heads; the rest runs the tiny random Wan through
ComfyUI's sampler on CPU.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import kernels
from salad_core.calibrate import (
    WindowErrors,
    band_density,
    band_errors,
    candidate_radii,
    select_by_delta,
    select_by_sparsity,
)

GRID = (5, 8, 8)  # latent 5 x 16 x 16 after the (1, 2, 2) patchify: 320 tokens
BS = 16  # 20 blocks: enough candidates on a tiny latent
LATENT = {"samples": torch.zeros(1, 16, 5, 16, 16)}
DELTA = 30.0  # random weights attend broadly; a loose bound gives a spread of windows


def conds(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 512, 4096, generator=g), {}] for _ in range(n)]


# --------------------------------------------------------------------------------------------
# pure tensor
# --------------------------------------------------------------------------------------------

def test_band_errors_match_block_sparse_kernel():
    torch.manual_seed(0)
    grid, n, bs = (3, 5, 7), 105, 16
    q, k, v = (torch.randn(2, 2, n, 32) * s for s in (2.0, 2.0, 1.0))
    radii = candidate_radii(7)
    err, ref = band_errors(q, k, v, grid, bs, radii, chunk_elements=3000)  # several chunks
    everything = torch.tensor([10**6, 10**6])
    dense_sel = kernels.sliding_window_blocks(2, grid, bs, everything, torch.tensor([False, False]), "cpu", backend="torch")
    dense, _ = kernels.block_sparse_attention(q, k, v, dense_sel, backend="torch")
    assert torch.allclose(ref, dense.double().pow(2).sum((-1, -2)), rtol=1e-5)
    for kind in (0, 1):
        for i, r in enumerate(radii):
            sel = kernels.sliding_window_blocks(2, grid, bs, torch.tensor([r * bs] * 2), torch.tensor([bool(kind)] * 2),
                                                "cpu", backend="torch")
            out, _ = kernels.block_sparse_attention(q, k, v, sel, backend="torch")
            want = (out.double() - dense.double()).pow(2).sum((-1, -2))
            assert torch.allclose(err[:, :, kind, i], want, rtol=1e-4, atol=1e-8), (kind, r)
    assert float(err[:, :, :, -1].max()) < 1e-8  # the last candidate is dense


def test_candidate_radii():
    assert candidate_radii(20) == list(range(1, 20))
    big = candidate_radii(512)
    assert big[:16] == list(range(1, 17)) and big[-1] == 511 and len(big) <= 64 and big == sorted(set(big))


def _synthetic_head(grid, temporal: bool, sharp: float = 30.0):
    """q = k = one-hot of the spatial position (temporal head: same place in every frame) or of
    the frame (spatial head: whole own frame), scaled so attention is sharp."""
    f, h, w = grid
    n = f * h * w
    ids = torch.arange(n)
    cls = ids % (h * w) if temporal else ids // (h * w)
    feats = torch.nn.functional.one_hot(cls, 128).float() * sharp
    v = torch.randn(n, 128, generator=torch.Generator().manual_seed(1))
    return feats, feats.clone(), v


def test_kind_detection_on_synthetic_heads():
    grid = (4, 4, 8)  # 128 tokens, 8 blocks of 16; a frame is 32 tokens = 2 blocks
    qt, kt, vt = _synthetic_head(grid, temporal=True)
    qs, ks, vs = _synthetic_head(grid, temporal=False)
    q, k, v = (torch.stack([a, b])[None] for a, b in ((qt, qs), (kt, ks), (vt, vs)))
    radii = candidate_radii(8)
    errors = WindowErrors(1, 2, 8, 16, grid, radii)
    errors.add(0, *band_errors(q, k, v, grid, 16, radii))
    result = select_by_delta(errors, 2.0)
    (temporal_head, spatial_head), = result.windows
    assert temporal_head.kind == "temporal" and result.radii[0][0] == 1  # 4 frames: one block
    assert spatial_head.kind == "spatial" and result.radii[0][1] <= 2  # a frame spans 2 blocks
    assert max(result.rse[0]) <= 2.0


def test_select_by_sparsity_meets_target_with_least_error():
    torch.manual_seed(0)
    radii = candidate_radii(20)
    errors = WindowErrors(3, 4, 20, 16, GRID, radii)
    for layer in range(3):
        curve = torch.rand(2, 4, 2, len(radii)).sort(-1, descending=True).values * 100
        curve[..., -1] = 0
        errors.add(layer, curve, torch.ones(2, 4))
    for target in (0.5, 0.8):
        res = select_by_sparsity(errors, target)
        assert 1.0 - sum(res.density) / 3 >= target - 1e-9
        # no uniform window of the same (or lower) density has a smaller total error
        total = sum(float(errors.rse_mean[l, h].min(0).values[radii.index(res.radii[l][h])]) for l in range(3) for h in range(4))
        for i, r in enumerate(radii):
            if band_density(20, r) <= 1 - target:
                assert total <= float(errors.rse_mean[..., i].min(-1).values.sum()) + 1e-9
    with pytest.raises(ValueError, match=r"Expected a target sparsity reachable.*Try"):
        select_by_sparsity(errors, 0.99)


# --------------------------------------------------------------------------------------------
# through ComfyUI's sampler (tiny random Wan, CPU)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(comfy, tiny_wan_path):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny_wan_path))


@pytest.fixture(scope="module")
def calibrated(tiny):
    from salad_core.calibrate import calibrate_windows

    return calibrate_windows(tiny, conds(2, seed=0), LATENT, steps=2, delta=DELTA, block_size=BS)


def test_windows_meet_bound_on_held_out_inputs_and_repeat(tiny, calibrated):
    from salad_core.calibrate import calibrate_windows, collect_window_errors

    res = calibrated
    assert len(res.windows) == 2 and all(len(layer) == 2 for layer in res.windows)
    assert max(max(r) for r in res.rse) <= DELTA
    assert res.sparsity > 0.2, res.summary()  # the bound is loose enough to give real windows
    held = collect_window_errors(tiny, conds(2, seed=99), LATENT, steps=2, block_size=BS, seed=7)
    kinds = {"spatial": 0, "temporal": 1}
    for layer, row in enumerate(res.windows):
        for head, w in enumerate(row):
            i = held.radii.index(w.window // BS)
            rse = float(held.rse_max[layer, head, kinds[w.kind], i])
            assert rse <= DELTA, f"layer {layer} head {head} {w}: held-out RSE {rse:.2f}% > {DELTA}%"
    again = calibrate_windows(tiny, conds(2, seed=0), LATENT, steps=2, delta=DELTA, block_size=BS)
    assert again == res


def test_target_sparsity_mode(tiny):
    from salad_core.calibrate import calibrate_windows, measured_sparsity

    res = calibrate_windows(tiny, conds(1, seed=0), LATENT, steps=1, target_sparsity=0.7, block_size=BS)
    assert res.sparsity >= 0.7 - 1e-9
    assert sum(measured_sparsity(res)) / 2 >= 0.65  # token-level, partial blocks included


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(conditioning=[]), r"Expected at least one conditioning.*Try"),
        (dict(steps=0), r"Expected steps >= 1, got 0\. Try"),
        (dict(delta=0.0), r"Expected delta > 0.*got 0\.0\. Try 2\.0"),
        (dict(delta=-1.0), r"Expected delta > 0.*Try"),
        (dict(latent={"samples": torch.zeros(1, 16, 16, 16)}), r"Expected a Wan video latent.*Try"),
    ],
)
def test_bad_inputs(tiny, kwargs, match):
    from salad_core.calibrate import calibrate_windows

    args = dict(conditioning=conds(1, 0), latent=LATENT, steps=1, delta=2.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_windows(tiny, args.pop("conditioning"), args.pop("latent"), **args)


def test_not_wan_model_and_missing_weights(tiny, comfy):
    import comfy.model_patcher

    from salad_core.calibrate import calibrate, calibrate_windows
    from salad_core.wan import NotWanModelError

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    fake = comfy.model_patcher.ModelPatcher(Fake(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(NotWanModelError, match=r"Expected a Wan2.1 diffusion model.*got Linear.*Try"):
        calibrate_windows(fake, conds(1, 0), LATENT, steps=1)
    with pytest.raises(ValueError, match=r"Expected trained SALAD weights.*got none.*Try"):
        calibrate(tiny, conds(1, 0), LATENT, steps=1, what="gate_thresholds")


def test_node_writes_file_plots_and_refuses_overwrite(tiny, comfy_nodes, run_wan, wan_inputs):
    import folder_paths

    from salad_core.config import SaladConfig
    from salad_core.patch import apply_salad
    from salad_core.weights import load_salad_weights

    node = comfy_nodes.NODE_CLASS_MAPPINGS["SaladCalibrate"]
    args = dict(model=tiny, positive=conds(2, 0), latent=LATENT, steps=1, delta=DELTA, target_sparsity=0.0,
                what="windows", output_name="tiny_calibrated", overwrite=False, seed=0)
    out = node.execute(**args)
    weights, images, summary = out.result
    path = os.path.join(folder_paths.get_folder_paths("salad")[0], "tiny_calibrated.safetensors")
    assert os.path.isfile(path) and "written" in summary
    assert images.shape == (2, 540, 960, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    pngs = os.path.join(folder_paths.get_output_directory(), "salad")
    assert sorted(os.listdir(pngs)) == ["tiny_calibrated_sparsity.png", "tiny_calibrated_windows.png"]
    loaded = load_salad_weights(path)
    assert loaded.meta.windows == weights.meta.windows and loaded.meta.sparse_mode == "st_swa"
    with pytest.raises(ValueError, match=r"Expected a new file name, got an existing file\. Try"):
        node.execute(**args)
    assert node.execute(**{**args, "overwrite": True}).result[0].meta.windows == loaded.meta.windows
    # the file drives ST-SWA in SALAD Apply's path
    patched = apply_salad(tiny, SaladConfig(sparse_mode="st_swa", backend="torch"), loaded)
    y = run_wan(patched, wan_inputs(tiny, frames=5, height=16, width=16))
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------
# gate thresholds and branch dropping (5 layers, so that 20% is one layer)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def five_layer(comfy, tmp_path_factory):
    import comfy.sd

    from salad_core.tiny_wan import WanShape, write_wan_checkpoint

    path = tmp_path_factory.mktemp("wan5") / "tiny5.safetensors"
    write_wan_checkpoint(path, WanShape(dim=256, ffn_dim=512, num_layers=5), seed=0, dtype=torch.float32)
    return comfy.sd.load_diffusion_model(str(path))


def trained_like(model):
    """A 'trained' file: non-zero projections, per-layer gate biases so the gates differ."""
    from salad_core.wan import wan_info
    from salad_core.weights import branch_key, fresh_salad_weights

    fresh = fresh_salad_weights(wan_info(model.model.diffusion_model))
    g = torch.Generator().manual_seed(0)
    tensors = dict(fresh.tensors)
    for layer in range(5):
        tensors[branch_key(layer, "proj.weight")] = torch.randn(256, 256, generator=g) * 0.01
        tensors[branch_key(layer, "gate.weight")] = torch.randn(1, 256, generator=g) * 0.01
        tensors[branch_key(layer, "gate.bias")] = torch.tensor([[-2.0, 1.0, -0.5, 0.5, 0.0][layer]])
    from dataclasses import replace

    return replace(fresh, tensors=tensors, source="trained-like")


def test_gate_thresholds_and_top20_drop_skips_exactly_that_branch(five_layer, monkeypatch, capsys):
    import comfy.sample

    from salad_core.calibrate import GATE_PERCENTILES, calibrate_gates, gate_weights, make_plots
    from salad_core.config import SaladConfig
    from salad_core.dropping import dropped_layers
    from salad_core.patch import apply_salad, salad_runtime

    weights = trained_like(five_layer)
    steps = 3
    # backend torch: under TRITON_INTERPRET=1 'auto' would run the Triton interpreter on CPU (slow)
    res = calibrate_gates(five_layer, weights, conds(2, 0), LATENT, steps=steps, config=SaladConfig(backend="torch"))
    assert list(res.thresholds) == [str(p) for p in GATE_PERCENTILES]
    vals = list(res.thresholds.values())
    assert vals == sorted(vals) and all(0 < v < 1 for v in vals)
    assert len(res.quantiles) == steps and len(res.gates) == 2 and len(res.means) == 5
    assert max(range(5), key=lambda i: res.means[i]) == 1  # gate bias +1.0
    calibrated = gate_weights(weights, res)
    assert calibrated.meta.gate_means == res.means
    assert set(make_plots(gates=res)) == {"gate_quintiles"}

    top = SaladConfig(gate_drop_percentile=20, gate_drop_plan="top")
    assert dropped_layers(top, calibrated, 5) == {1}
    assert dropped_layers(SaladConfig(gate_drop_percentile=20, gate_drop_plan="bottom"), calibrated, 5) == {0}
    assert len(dropped_layers(SaladConfig(gate_drop_percentile=20, gate_drop_plan="random"), calibrated, 5)) == 1

    calls = {"n": 0}
    real_linear, real_fused = kernels.linear_attention, kernels.salad_attention

    def count(fn):
        def wrapped(*a, **kw):
            calls["n"] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(kernels, "linear_attention", count(real_linear))
    monkeypatch.setattr(kernels, "salad_attention", count(real_fused))
    samples = LATENT["samples"]
    timings = {0: [], 20: []}
    for pct in (0, 20, 0, 20):  # alternate, keep the best of two: CPU timings are noisy
        model = apply_salad(five_layer, SaladConfig(gate_drop_percentile=pct, gate_drop_plan="top", backend="torch"), calibrated)
        calls["n"] = 0
        c = conds(1, 0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(model, comfy.sample.prepare_noise(samples, 0), steps, 1.0, "euler", "simple",
                                c, c, samples, disable_pbar=True)
        timings[pct].append(time.perf_counter() - t0)
        summary = salad_runtime(model).stats.summary()
        ran = {layer for step in summary.gates for layer, g in enumerate(step) if g is not None}
        if pct == 0:
            assert calls["n"] == 5 * steps and ran == set(range(5))
        else:
            assert calls["n"] == 4 * steps, "the dropped layer must launch no linear-attention kernel"
            assert ran == {0, 2, 3, 4}
    timings = {k: min(v) for k, v in timings.items()}
    with capsys.disabled():
        print(f"\n[calibrate] tiny 5-layer CPU sampling {steps} steps: keep all {timings[0] * 1e3:.0f} ms, "
              f"drop top 20% {timings[20] * 1e3:.0f} ms (saved {(timings[0] - timings[20]) * 1e3:.0f} ms)")
    assert timings[0] > 0 and timings[20] > 0


def test_gate_thresholds_refuse_training_free_weights(five_layer):
    from salad_core.calibrate import calibrate_gates
    from salad_core.wan import wan_info
    from salad_core.weights import SaladWeightsError, fresh_salad_weights

    fresh = fresh_salad_weights(wan_info(five_layer.model.diffusion_model))
    with pytest.raises(SaladWeightsError, match=r"Expected a trained file.*Try"):
        calibrate_gates(five_layer, fresh, conds(1, 0), LATENT, steps=1)


@pytest.mark.parametrize("query_block, block_size, group", [
    (128, 64, 2), (64, 64, 1), (64, 32, 2), (32, 32, 1),
    (None, 64, 2),  # not recorded: the default
    (96, 64, 2), (256, 64, 2), (32, 64, 2),  # no query_group makes it from this block size: the default
])
def test_gate_calibration_takes_the_files_query_block(query_block, block_size, group):
    from salad_core.calibrate.run import file_query_group
    from salad_core.weights import SaladMeta

    meta = SaladMeta(base_model="wan2.1_t2v_1.3B", dim=64, layers=2, heads=2, block_size=block_size,
                     query_block=query_block)
    assert file_query_group(meta) == group
