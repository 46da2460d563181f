"""Stage 2: the Top-K SAE, its training step, dead-latent handling, metrics and train_sae.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfexplain import artifacts
from selfexplain import sae_train as st
from selfexplain.errors import UserError
from selfexplain.sae import TopKSAE

from conftest import ROOT  # noqa: E402


def _sae(d_in=16, m=32, k=4):
    return TopKSAE(d_in, m, k)


# ----------------------------------------------------------------------------- codes
def test_topk_code_is_exact(seed):
    sae = _sae()
    with torch.no_grad():
        sae.b_e.fill_(10.0)  # every pre-activation positive: exactly K survive the ReLU
    x = torch.randn(50, 16)
    z = sae.encode(x)
    assert z.shape == (50, 32)
    assert ((z != 0).sum(1) == 4).all()
    dense = sae.dense_code(x)
    top = dense.topk(4, dim=1).values
    assert torch.allclose(z.sort(1, descending=True).values[:, :4], top)
    recon, values, indices = sae(x)
    assert recon.shape == (50, 16) and values.shape == indices.shape == (50, 4)
    assert torch.allclose(recon, sae.decode(z), atol=1e-5)


def test_training_path_matches_module_and_autograd(seed):
    """The sparse-backward encoder gives the module's codes and autograd's gradients."""
    sae = _sae()
    x = torch.randn(40, 16)
    values, idx, _, _ = st.TopKEncode.apply(x, sae.W_e, sae.b_e, 4, 0, torch.zeros(32, dtype=torch.bool), x.device, "off")
    ref_v, ref_i = sae.encode_topk(x)
    assert torch.equal(idx, ref_i) and torch.allclose(values, ref_v)
    st.fvu_loss(x, st.decode(values, idx, sae.D, sae.b_d)).backward()
    fast = [p.grad.clone() for p in (sae.W_e, sae.b_e, sae.D)]
    sae.zero_grad()
    recon, _, _ = sae(x)
    st.fvu_loss(x, recon).backward()
    for g, p in zip(fast, (sae.W_e, sae.b_e, sae.D)):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_decoder_columns_stay_unit_norm(seed):
    sae = _sae()
    opt = st.make_optimizer(sae, 1e-2)
    x = torch.randn(64, 16)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:8] = True
    for _ in range(5):
        out = st.train_step(sae, opt, x, dead=dead, k_aux=4, aux_coef=0.1)
    assert torch.allclose(sae.D.norm(dim=0), torch.ones(32), atol=1e-5)
    assert out["counts"].sum() <= 64 * 4 and out["loss"] < 1.5


def test_resampling_revives_dead_latents(seed):
    sae = _sae(d_in=16, m=32, k=4)
    opt = st.make_optimizer(sae, 1e-3)
    x = torch.randn(256, 16)
    st.train_step(sae, opt, x)  # creates Adam state to be reset
    dead = torch.arange(6)
    with torch.no_grad():
        sae.b_e[dead] = -1e4  # forced dead: never in any token's top K
    assert not torch.isin(sae.encode_topk(x)[1], dead).any()
    # a few tokens far off the data the SAE knows are the badly reconstructed ones
    bad = torch.zeros(6, 16)
    bad[torch.arange(6), torch.arange(6) + 8] = 25.0
    sample = torch.cat([x, bad])
    pick = st.resample_dead_(sae, opt, dead, sample, torch.Generator().manual_seed(0))
    assert (pick >= 256).float().mean() > 0.5  # chosen by reconstruction error
    values, idx = sae.encode_topk(sample[pick])
    for j, latent in enumerate(dead.tolist()):  # each revived latent fires on its token
        assert latent in idx[j][values[j] > 0].tolist()
    assert torch.allclose(sae.D.norm(dim=0), torch.ones(32), atol=1e-5)
    assert (opt.state[sae.W_e]["exp_avg"][dead] == 0).all()
    assert (opt.state[sae.D]["exp_avg_sq"][:, dead] == 0).all()


def test_usage_ema_marks_silent_latents_dead():
    ema = torch.full((8,), 4 / 8)
    counts = torch.tensor([100.0, 100, 100, 100, 0, 0, 0, 0])
    for _ in range(50):
        st.update_usage_ema(ema, counts, n_tokens=100, tau_tokens=200)
    assert torch.allclose(ema[:4], torch.ones(4), atol=1e-3)
    assert st.dead_mask(ema, k=4, threshold=0.01).tolist() == [False] * 4 + [True] * 4


# ----------------------------------------------------------------------------- metrics
def test_metrics_on_known_inputs():
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])  # mean 0, Σ||x||² = 8
    recon = 0.5 * x  # Σ||x - x̂||² = 2 -> FVU 0.25
    values = torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.0, 0.0], [1.0, 1.0]])  # L0 = 5 / 4
    indices = torch.tensor([[0, 1], [0, 2], [3, 4], [2, 0]])
    m = st.SAEMetrics(2, 6, "cpu")
    m.update(x[:2], recon[:2], values[:2], indices[:2])
    m.update(x[2:], recon[2:], values[2:], indices[2:])
    out = m.compute()
    assert out["fvu"] == pytest.approx(0.25)
    assert out["l0"] == pytest.approx(1.25)
    assert out["dead_fraction"] == pytest.approx(4 / 6)  # only latents 0 and 2 ever fire
    assert out["n_tokens"] == 4


def test_standardization_is_exact():
    from selfexplain.distributed import Runtime

    a = torch.randn(1000, 5, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    mu, sigma = st.standardization(len(a), a.sum(0), a.pow(2).sum(0), Runtime(torch.device("cpu")))
    assert torch.allclose(mu, a.mean(0).float(), atol=1e-5)
    assert torch.allclose(sigma, a.std(0, unbiased=False).float(), atol=1e-5)


# ----------------------------------------------------------------------------- the script
def test_train_sae_outputs(tiny_sae, tiny_classifier):
    metrics = json.loads((tiny_sae / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    for key in ("val_fvu", "val_l0", "val_dead_fraction", "val_spliced_accuracy", "val_classifier_accuracy"):
        assert key in metrics
    assert metrics["val_l0"] <= 4 and 0 <= metrics["val_dead_fraction"] <= 1
    assert (tiny_sae / "config.json").is_file() and (tiny_sae / "last_sae.pt").is_file()
    clf = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    sae, ckpt = artifacts.load_sae(tiny_sae / "best_sae.pt", clf)
    assert (sae.n_latents, sae.k) == (64, 4) and ckpt["usage_ema"].shape == (64,)
    assert torch.allclose(sae.D.norm(dim=0), torch.ones(64), atol=1e-5)
    assert (sae.sigma > 0).all() and ckpt["classifier_fingerprint"] == clf["fingerprint"]


def test_sae_with_another_classifier_is_refused(tiny_sae, tiny_classifier):
    other = dict(artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier"), fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="trained on classifier"):
        artifacts.load_sae(tiny_sae / "best_sae.pt", other)


def test_save_load_round_trip(tiny_sae, tmp_path, seed):
    sae, ckpt = artifacts.load_sae(tiny_sae / "best_sae.pt")
    again = artifacts.sae_checkpoint(sae, classifier_fingerprint=ckpt["classifier_fingerprint"],
                                     classifier_path=ckpt["classifier_path"], config=ckpt["config"],
                                     epoch=ckpt["epoch"], metrics=ckpt["metrics"], usage_ema=ckpt["usage_ema"])
    artifacts.save_checkpoint(again, tmp_path / "copy.pt")
    sae2, _ = artifacts.load_sae(tmp_path / "copy.pt")
    fmap = torch.rand(3, sae.d_in, 2, 2) * 4
    assert torch.equal(sae.reconstruct_map(fmap), sae2.reconstruct_map(fmap))
    assert torch.equal(sae.codes_for_map(fmap), sae2.codes_for_map(fmap))


def test_missing_classifier_is_a_clear_error(tmp_path):
    import train_sae

    with pytest.raises(UserError, match="run train_standard_cnn.py first"):
        train_sae.main(classifier_ckpt=str(tmp_path / "nope.pt"), out_dir=str(tmp_path), tensorboard=False)


def test_resume_continues_epochs_and_optimizer(tiny_classifier, tmp_path, cache_dir):
    import train_sae

    cfg = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path), cache_dir=str(cache_dir),
               latent_dim=32, top_k=4, batch_size=128, tensorboard=False)
    train_sae.main(**cfg, epochs=2)
    first = artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")
    metrics = train_sae.main(**cfg, epochs=3, resume=True)
    last = artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][:2] == first["history"]
    steps = first["step"] // 2
    assert last["step"] == 3 * steps
    adam_steps = [float(s["step"]) for s in last["optimizer"]["state"].values()]
    assert adam_steps and all(s == 3 * steps for s in adam_steps)


def test_tokens_spill_to_a_memmap(tiny_classifier, tmp_path, cache_dir):
    import train_sae

    train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path / "run"),
                   cache_dir=str(cache_dir), latent_dim=32, top_k=4, batch_size=128, epochs=1,
                   token_ram_gb=0.0, tensorboard=False)
    files = sorted(p.name for p in (Path(cache_dir) / "sae_tokens").glob("*.npy"))
    assert any("-train-" in f and f.endswith("-r0of1.npy") for f in files)
    assert any("-val-" in f and f.endswith("-r0of1.npy") for f in files)
    assert (tmp_path / "run" / "best_sae.pt").is_file()


def test_ddp_two_processes_gloo(tiny_classifier, tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_sae.py"), "--device=cpu", f"--classifier_ckpt={tiny_classifier / 'best.pt'}",
           f"--out_dir={tmp_path}", f"--cache_dir={cache_dir}", "--latent_dim=32", "--top_k=4",
           "--batch_size=64", "--epochs=2", "--tensorboard=False"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all 2 ranks hold identical SAE weights" in out.stdout
    assert out.stdout.count("best epoch") == 1  # only rank 0 reports and writes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    clf = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    assert metrics["history"][-1]["val_n_tokens"] == len(clf["split"]["val"]) * 4  # both shards evaluated
    artifacts.load_sae(tmp_path / "best_sae.pt", clf)
