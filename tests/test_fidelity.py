"""Issue 10 pipeline (bench/fidelity) at micro scale on CPU: data, pretraining + exact resume,
the structure metric, the comparison rows, the metrics, and the fixed-gate ablation option."""

from __future__ import annotations

import math

import pytest
import torch

SPEC = dict(frames=3, height=16, width=16)  # 3 x 8 x 8 = 192 tokens, 12 blocks of 16


@pytest.fixture
def fid(comfy):
    import bench.fidelity.compare as compare
    import bench.fidelity.data as data
    import bench.fidelity.pretrain as pretrain
    import bench.fidelity.structure as structure

    return type("F", (), dict(data=data, pretrain=pretrain, structure=structure, compare=compare))


def _pcfg(fid, **kw):
    return fid.pretrain.PretrainConfig(shape="micro", batch=2, lr=1e-3, warmup=1, log_every=1, **{**SPEC, **kw})


def test_data_is_deterministic_and_shaped(fid):
    d = fid.data
    spec = d.ClipSpec(**SPEC)
    a, b = d.ToyVideos(spec)[3], d.ToyVideos(spec)[3]
    assert a["latent"].shape == (16, 3, 16, 16) and a["context"].shape == (512, 4096)
    assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["context"], b["context"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["latent"], d.ToyVideos(spec)[4]["latent"])
    assert not torch.equal(a["latent"], d.ToyVideos(spec, "test")[3]["latent"])
    n_words = len(a["caption"].split())
    assert a["context"][:n_words].abs().sum(1).min() > 0 and a["context"][n_words:].abs().sum() == 0
    # objects move: frames differ
    assert (a["latent"][:, 0] - a["latent"][:, -1]).abs().max() > 0.1


def test_pretrain_reduces_loss_and_resumes_exactly(fid, tmp_path):
    from safetensors.torch import load_file

    cfg = _pcfg(fid)
    tr, losses = fid.pretrain.pretrain(cfg, tmp_path / "a", steps=12, device="cpu")
    assert math.isfinite(losses[-1]) and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    # exact resume: 4 steps in one go == 2 + 2 steps across a save/load
    fid.pretrain.pretrain(cfg, tmp_path / "b", steps=4, device="cpu")
    fid.pretrain.pretrain(cfg, tmp_path / "c", steps=2, device="cpu")
    tr_c, _ = fid.pretrain.pretrain(cfg, tmp_path / "c", steps=2, device="cpu")
    assert tr_c.step == 4
    sb, sc = load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(sb[k], sc[k]) for k in sb)
    # carried bf16 copy round-trips (optimizer state dropped)
    files = fid.pretrain.export_carry(tmp_path / "c", tmp_path / "carry", shard_bytes=2 * 2**20)
    assert len(files) > 2 and all(f.stat().st_size <= 2 * 2**20 + 4096 for f in files)
    assert fid.pretrain.import_carry(tmp_path / "carry", tmp_path / "d") == 4
    sd = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert all(torch.equal(sd[k], sc[k].bfloat16().float()) for k in sc)
    tr_d, _ = fid.pretrain.pretrain(cfg, tmp_path / "d", steps=1, device="cpu")
    assert tr_d.step == 5 and tr_d.state["adam_start"] == 4


def _explicit_share(q, k, bs, frac=0.1):
    h, n, d = q.shape
    p = torch.softmax(q.double() @ k.double().transpose(1, 2) / math.sqrt(d), -1)  # explicit [H, N, N]
    nb = math.ceil(n / bs)
    a = torch.zeros(h, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            a[:, i, j] = p[:, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].sum(-1).mean(-1)
    kk = max(1, math.ceil(frac * nb))
    return a, a.topk(kk, -1).values.sum(-1).mean(-1)


def test_structure_metric_matches_explicit(fid):
    s = fid.structure
    g = torch.Generator().manual_seed(0)
    n, bs = 200, 16  # 13 blocks, the last partial
    # a local pattern: q ~ k of nearby tokens -> strong diagonal blocks in head 0; random in head 1
    pos = torch.arange(n).float()
    local = torch.stack([torch.sin(pos[:, None] / 8 * f) for f in torch.linspace(0.2, 3, 32)], -1).squeeze(1)
    q = torch.stack([local * 6, torch.randn(n, 32, generator=g) * 0.1])
    k = torch.stack([local * 6, torch.randn(n, 32, generator=g) * 0.1])
    a, frame = s.block_attention_map(q, k, bs, chunk=37, frame_tokens=50)
    share = s.top_share(a)
    a_ref, share_ref = _explicit_share(q, k, bs)
    torch.testing.assert_close(a.double(), a_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.top_share(a).double(), share_ref, atol=1e-5, rtol=1e-4)
    assert share[0] > 0.5 and abs(float(share[1]) - 2 / 13) < 0.05  # near-uniform: 2 of 13 blocks
    assert abs(float(frame[1]) - 0.25) < 0.05 and frame[0] > frame[1]
    torch.testing.assert_close(a.sum(-1), torch.ones(2, a.shape[1]), atol=1e-4, rtol=0)


def test_metric_functions(fid):
    c = fid.compare
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    x = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert c.rel_l2(x, ref) == pytest.approx(0.2 / math.sqrt(14))
    assert c.psnr(x, ref) == pytest.approx(10 * math.log10(9 / 0.01))
    assert c.psnr(ref, ref) == math.inf and c.rel_l2(ref, ref) == 0.0
    sig = c.sigma_schedule(4)
    assert float(sig[0]) == pytest.approx(1.0) and float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())


def test_compare_all_rows_finite(fid, tmp_path):
    tr, _ = fid.pretrain.pretrain(_pcfg(fid), tmp_path / "run", steps=6, device="cpu")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "run" / "model.safetensors"))
    cfg = fid.compare.CompareConfig(block_size=16, steps=2, batch=1, lr=1e-3, lora_rank=4, eval_clips=1,
                                    eval_sigmas=(0.5,), sample_clips=1, sample_steps=2, backend="torch", gate_clips=1, **SPEC)
    rows = fid.compare.run_compare(sd, cfg, device="cpu")
    got = {(r["mode"], r["variant"]) for r in rows}
    modes, variants = fid.compare.MODES, fid.compare.VARIANTS
    assert got == ({("dense", "dense"), (modes[0], "dense_lora")}
                   | {(m, v) for m in modes for v in variants if v != "dense_lora"})
    for r in rows:
        assert math.isfinite(r["fm_loss"]) and math.isfinite(r["rel_l2"])
        assert r["mode"] == "dense" or math.isfinite(r["psnr"])
    by = {(r["mode"], r["variant"]): r for r in rows}
    assert by[("topk", "sparse_only")]["trainable"] == 0
    assert by[("topk", "dense_lora")]["trainable"] == by[("topk", "lora")]["trainable"]
    assert by[("topk", "salad")]["trainable"] > by[("topk", "lora")]["trainable"]
    assert by[("topk", "salad_drop20")]["dropped_layers"] == [by[("topk", "salad_drop20")]["gate_means"].index(
        max(by[("topk", "salad_drop20")]["gate_means"]))]


def test_fixed_gate_option(comfy, load_wan, tiny_wan_path):
    """SaladTrainModel(fixed_gate=c): the branch coefficient is exactly c (no gate params trained,
    no export); the default keeps the learned gate."""
    from salad_core.config import SaladConfig
    from salad_core.train.model import SaladTrainModel

    dm = load_wan(tiny_wan_path).model.diffusion_model
    m = SaladTrainModel(dm, SaladConfig(sparsity=0.5, block_size=16, backend="torch"), 2, fixed_gate=0.5)
    x = torch.randn(2, 7, dm.dim)
    br = m.attn[0].salad
    assert torch.equal(br.gate_value(x), torch.full((2,), 0.5))
    assert not br.gate.weight.requires_grad and br.proj.weight.requires_grad
    with torch.no_grad():
        br.gate.weight.normal_()
    assert torch.equal(br.gate_value(x), torch.full((2,), 0.5))
    br.fixed_gate = None
    from salad_core.gate import scalar_gate

    assert torch.equal(br.gate_value(x), scalar_gate(x, br.gate))
    with pytest.raises(ValueError, match="fixed-gate"):
        m.export_weights()


def test_distill_objective_trains_the_student_towards_the_dense_teacher(fid, tmp_path, monkeypatch):
    """objective="distill": data-free distillation. Its first loss is the student-vs-teacher gap
    (> 0 for a sparse student) and training lowers the loss on repeated inputs."""
    from safetensors.torch import load_file

    fid.pretrain.pretrain(_pcfg(fid), tmp_path / "run", steps=4, device="cpu")
    sd = load_file(str(tmp_path / "run" / "model.safetensors"))
    cfg = fid.compare.CompareConfig(block_size=16, sparsity=0.75, steps=12, batch=1, lr=3e-3, lora_rank=4,
                                    backend="torch", objective="distill", **SPEC)
    dm, _ = fid.compare.load_toy(sd, "cpu")
    model = fid.compare.variant_model(dm, cfg, "topk", "salad")
    # the same clip and noise every step, so the loss curve is the fit, not sampling noise
    original = fid.compare.flow_batch
    monkeypatch.setattr(fid.compare, "flow_batch", lambda ds, pos, seed, device: original(ds, [0], seed, device))
    from salad_core.train.losses import distillation_loss

    _, ctx, noise, sigma = original(fid.data.ToyVideos(cfg.spec, "train", 10**8), [0], cfg.seed, "cpu")
    with torch.no_grad():  # independent of finetune(): the objective's value before any step
        first = float(distillation_loss(lambda x, s, c: model(x, s, c), lambda x, s, c: model(x, s, c, dense=True),
                                        None, ctx, noise, sigma))
    losses, _ = fid.compare.finetune(model, cfg, torch.device("cpu"))
    assert losses[0] == pytest.approx(first, rel=1e-4) and first > 0
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses
