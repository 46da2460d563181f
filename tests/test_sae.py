"""Stage 2: the Top-K SAE, its training step, dead-latent handling, metrics and train_sae.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import numpy as np

from conftest import DEVICE, ROOT
from selfexplain import artifacts, data
from selfexplain import sae as sae_module
from selfexplain import sae_train as st
from selfexplain.errors import UserError
from selfexplain.features import iter_feature_maps
from selfexplain.sae import TopKEncode, TopKSAE, fvu_loss, tokens_of, tokens_to_map


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


def test_tokens_and_maps_round_trip():
    fmap = torch.randn(3, 5, 2, 4)
    tokens = tokens_of(fmap)
    assert tokens.shape == (3 * 2 * 4, 5)
    assert torch.equal(tokens[1 * 8 + 1 * 4 + 2], fmap[1, :, 1, 2])  # row-major over (h, w)
    assert torch.equal(tokens_to_map(tokens, 3, 2, 4), fmap)


def _dense_reference_grads(sae, x, dead, k_aux, aux_coef):
    """The training loss through plain dense autograd: the reference for TopKEncode's sparse backward."""
    sae.zero_grad()
    pre = sae.pre_acts(x)
    top, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, torch.relu(top))
    recon = sae.decode(z)
    aux_top, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, torch.relu(aux_top))
    residual = (x - recon).detach()
    loss = fvu_loss(x, recon) + aux_coef * fvu_loss(residual, z_aux @ sae.D.t())
    loss.backward()
    return [p.grad.clone() for p in (sae.W_e, sae.b_e, sae.D, sae.b_d)]


def test_sparse_backward_matches_dense_autograd_with_auxk_and_duplicates(seed):
    """TopKEncode's CSR backward equals dense autograd, AuxK on, latents listed twice per token."""
    sae = _sae(d_in=16, m=32, k=4)
    x = torch.randn(40, 16)
    with torch.no_grad():
        sae.b_e[:6] += 3.0  # latents 0-5 sit in most tokens' top K ...
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True        # ... and are "dead" too: AuxK picks them again, duplicates in one row
    values, idx, aux_v, aux_idx = TopKEncode.apply(x, sae.W_e, sae.b_e, 4, 6, dead, None)
    ref_v, ref_i = sae.encode_topk(x)
    assert torch.equal(idx, ref_i) and torch.allclose(values, ref_v)
    shared = [(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, aux_idx)]
    assert sum(map(len, shared)) > 20, "the test needs latents in both the top K and the AuxK pick"
    recon = sae.decode_sparse(values, idx)
    residual = (x - recon).detach()
    (fvu_loss(x, recon) + 0.5 * fvu_loss(residual, sae.decode_sparse(aux_v, aux_idx, bias=False))).backward()
    fast = [p.grad.clone() for p in (sae.W_e, sae.b_e, sae.D, sae.b_d)]
    reference = _dense_reference_grads(sae, x, dead, 6, 0.5)
    for name, g, ref in zip(("W_e", "b_e", "D", "b_d"), fast, reference):
        assert ref.abs().sum() > 0 and torch.allclose(g, ref, atol=1e-6), name


@pytest.mark.parametrize("width", [3, 20])
def test_wide_and_narrow_codes_decode_alike(seed, monkeypatch, width):
    """decode_sparse's two routes (embedding_bag; dense scatter + matmul for wide codes) agree, gradients too."""
    sae = _sae(d_in=16, m=32, k=4)
    idx = torch.stack([torch.randperm(32)[:width] for _ in range(24)])
    code = torch.rand(24, width)
    gathers = []
    bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **kw: gathers.append(1) or bag(*a, **kw))
    out = {}
    for name, share in (("gather", 2.0), ("dense", 0.0)):
        monkeypatch.setattr(sae_module, "DENSE_DECODE_SHARE", share)
        values = code.clone().requires_grad_(True)
        sae.D.grad = None
        recon = sae.decode_sparse(values, idx, bias=(width == 3))
        (recon ** 2).sum().backward()
        out[name] = (recon.detach(), values.grad, sae.D.grad.clone())
    assert len(gathers) == 1, "the two settings must take different routes"
    for a, b in zip(out["gather"], out["dense"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_decoder_columns_stay_unit_norm(seed):
    sae = _sae()
    opt = st.make_sae_optimizer(sae, 1e-2)
    x = torch.randn(64, 16)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:8] = True
    for _ in range(5):
        out = st.train_step(sae, opt, x, dead=dead, k_aux=4, aux_coef=0.1)
    assert torch.allclose(sae.D.norm(dim=0), torch.ones(32), atol=1e-5)
    assert out["counts"].sum() <= 64 * 4 and out["loss"] < 1.5


def test_resampling_revives_dead_latents(seed):
    sae = _sae(d_in=16, m=32, k=4)
    opt = st.make_sae_optimizer(sae, 1e-3)
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
    assert (opt.state[sae.W_e]["exp_avg"][dead] == 0).all() and (opt.state[sae.D]["exp_avg"][:, dead] == 0).all()
    # the second moment restarts at the other latents' median, not at 0 (no giant first steps)
    live_median = opt.state[sae.W_e]["exp_avg_sq"][6:].median(0).values
    assert torch.equal(opt.state[sae.W_e]["exp_avg_sq"][dead], live_median.expand(6, -1))
    assert (opt.state[sae.D]["exp_avg_sq"][:, dead] > 0).all()


# ----------------------------------------------------------------------------- batchtopk
def test_batchtopk_keeps_exactly_k_times_b_in_a_training_batch(seed):
    sae = TopKSAE(16, 16, 4, arch="batchtopk")  # k_max = 4K = M: no per-token cap, plain BatchTopK
    with torch.no_grad():
        sae.b_e.fill_(5.0)  # every pre-activation positive: the batch has far more than K·B candidates
    x = torch.randn(100, 16) * torch.linspace(0.1, 3, 100)[:, None]  # loud and quiet tokens
    values, _, _, _ = TopKEncode.apply(x, sae.W_e, sae.b_e, sae.k_max, 0, torch.zeros(16, dtype=torch.bool), None,
                                       4 * 100)
    kept = values[values > 0]
    ref = sae.pre_acts(x).relu().flatten().topk(400).values  # BatchTopK by its definition
    assert torch.allclose(kept.sort().values, ref.sort().values)
    per_token = (values > 0).sum(1)
    assert per_token.min() < 4 < per_token.max()  # K·B codes spread unevenly over the tokens
    out = st.train_step(sae, st.make_sae_optimizer(sae, 1e-3), x, threshold_rate=1.0)
    assert out["counts"].sum() == 4 * 100  # exactly K·B codes in the training batch
    assert sae.threshold.item() == pytest.approx(kept.min().item())  # rate 1: θ = the smallest kept one


def test_batchtopk_threshold_gives_mean_l0_near_k_on_held_out_tokens(seed):
    """Trained on one sample, θ gives mean L0 ≈ K on another; the code is exactly what the SAE decodes."""
    basis = torch.randn(24, 16)
    def tokens(n):  # sparse mixtures of 24 directions, as an SAE likes them
        coef = torch.rand(n, 24) * (torch.rand(n, 24) < 0.15)
        return coef @ basis + 0.05 * torch.randn(n, 16)
    sae = TopKSAE(16, 48, 4, arch="batchtopk")
    opt = st.make_sae_optimizer(sae, 3e-3)
    train = tokens(8192)
    for step in range(300):
        st.train_step(sae, opt, train[torch.randint(0, len(train), (256,))], threshold_rate=max(0.02, 1 / (step + 1)))
    held_out = tokens(4096)
    with torch.no_grad():
        recon, values, indices = sae(held_out)
    assert values.shape[1] == 16  # k_max = BATCH_K_CAP · K
    l0 = (values > 0).sum(1).float()
    assert 3.0 <= l0.mean().item() <= 5.0  # K = 4 on average, from the threshold alone
    assert l0.std() > 0  # tokens differ in how many latents they use
    assert ((values > 0) <= (values > sae.threshold)).all()
    dense = sae.encode(held_out)
    assert torch.allclose(recon, sae.decode(dense), atol=1e-5)  # encode, encode_topk and forward agree
    assert torch.equal(dense > 0, sae.pre_acts(held_out) > sae.threshold.clamp_min(0))  # z = ReLU(s)·(s > θ)
    assert fvu_loss(held_out, recon) < 0.5


def test_batchtopk_checkpoint_keeps_arch_and_threshold(tmp_path, seed):
    sae = TopKSAE(8, 16, 2, arch="batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    ckpt = artifacts.sae_checkpoint(sae, classifier_fingerprint="f" * 16, classifier_path="x.pt", config={}, epoch=1,
                                    metrics={}, usage_ema=torch.zeros(16))
    artifacts.save_checkpoint(ckpt, tmp_path / "b.pt")
    again, saved = artifacts.load_sae(tmp_path / "b.pt")
    assert saved["arch"] == "batchtopk" and again.arch == "batchtopk" and again.threshold.item() == pytest.approx(0.3)
    fmap = torch.randn(2, 8, 3, 3)
    assert torch.equal(again.codes_for_map(fmap), sae.codes_for_map(fmap))


# ----------------------------------------------------------------------------- dead latents
def test_dead_is_counted_on_a_constructed_case():
    """Latents 0-2 fire, 3 fires once on the last token only, 4-5 never: 2 of 6 dead on all tokens."""
    values = torch.tensor([[1.0, 2.0], [0.5, 0.0], [3.0, 1.0], [0.0, 0.0], [0.2, 0.7]])
    indices = torch.tensor([[0, 1], [2, 5], [1, 0], [4, 5], [3, 2]])  # zero values do not count as firing
    x = torch.randn(5, 2)
    m = st.SAEMetrics(2, 6, "cpu")
    m.update(x, x, values, indices)
    assert m.compute()["dead_fraction"] == pytest.approx(2 / 6)
    m4 = st.SAEMetrics(2, 6, "cpu")
    m4.update(x[:4], x[:4], values[:4], indices[:4])
    assert m4.compute()["dead_fraction"] == pytest.approx(3 / 6)  # latent 3 unseen in the first 4 tokens
    assert st.dead_share(torch.tensor([0.0, 3, 0, 1])) == 0.5
    assert st.min_tokens_for_dead(256, 8) == 320 and st.min_tokens_for_dead(512, 8) == 640


def test_epoch_reports_dead_on_train_and_val(tiny_sae):
    metrics = json.loads((tiny_sae / "metrics.json").read_text())
    for row in metrics["history"]:
        assert 0 <= row["train_dead_fraction"] <= 1 and 0 <= row["val_dead_fraction"] <= 1
        assert row["train_tokens"] > row["val_n_tokens"] > 0
    assert metrics["dead_min_tokens"] == 10 * 64 // 4 and metrics["arch"] == "topk"
    assert "train_dead_fraction" in metrics
    # counted from the latents that fired (0.03 here): a loop that dropped the counts reported 1.0, in range
    assert metrics["history"][-1]["train_dead_fraction"] < 0.5 and metrics["train_dead_fraction"] < 0.5


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
    from selfexplain.features import standardization

    a = torch.randn(1000, 5, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    mu, sigma = standardization(len(a), a.sum(0), a.pow(2).sum(0), Runtime(torch.device("cpu")))
    assert torch.allclose(mu, a.mean(0).float(), atol=1e-5)
    assert torch.allclose(sigma, a.std(0, unbiased=False).float(), atol=1e-5)


# ----------------------------------------------------------------------------- the script
def _val_maps(clf_path, cache_dir):
    """The val split's layer4 maps, recomputed in fp32 from the classifier checkpoint."""
    model, clf = artifacts.load_classifier(clf_path)
    images = data.load_dataset(clf["dataset"], cache_dir, progress=False).images
    maps = [f for _, f, _ in iter_feature_maps(model, images, clf["split"]["val"].numpy(), clf["preprocess"], "cpu",
                                               amp="off")]
    return model, clf, torch.cat(maps)


def test_train_sae_outputs(tiny_sae, tiny_classifier, cache_dir):
    metrics = json.loads((tiny_sae / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert (tiny_sae / "config.json").is_file() and (tiny_sae / "last_sae.pt").is_file()
    model, clf, fmap = _val_maps(tiny_classifier / "best.pt", cache_dir)
    sae, ckpt = artifacts.load_sae(tiny_sae / "best_sae.pt", clf)
    assert (sae.n_latents, sae.k) == (64, 4) and ckpt["usage_ema"].shape == (64,)
    assert torch.allclose(sae.D.norm(dim=0), torch.ones(64), atol=1e-5)
    assert (sae.sigma > 0).all() and ckpt["classifier_fingerprint"] == clf["fingerprint"]
    assert ckpt["fingerprint"] == artifacts.tensor_fingerprint(sae.state_dict())
    # the reported figures, recomputed independently from the checkpoint on the val tokens
    with torch.no_grad():
        x = sae.map_to_tokens(fmap)
        recon, values, indices = sae(x)
        fvu = ((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        l0 = (values > 0).sum(1).float().mean().item()
        dead = 1 - len(indices[values > 0].unique()) / sae.n_latents
        labels = torch.from_numpy(data.load_dataset(clf["dataset"], cache_dir, progress=False).labels)
        y = labels[np.sort(clf["split"]["val"].numpy())]
        own = (model.head(fmap).argmax(1) == y).float().mean().item()
        spliced = (model.head(sae.reconstruct_map(fmap)).argmax(1) == y).float().mean().item()
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert metrics["val_fvu"] == best["val_fvu"] == pytest.approx(fvu, rel=0.02)
    fvus = [row["val_fvu"] for row in metrics["history"]]
    assert fvus == sorted(fvus, reverse=True) and fvus[-1] < fvus[0]  # training makes progress
    assert metrics["val_l0"] == pytest.approx(l0, abs=0.01) and 3 <= l0 <= 4  # K = 4: most codes positive
    assert metrics["val_dead_fraction"] == pytest.approx(dead, abs=1e-6) and dead < 0.5
    assert metrics["val_classifier_accuracy"] == pytest.approx(own)
    assert metrics["val_spliced_accuracy"] == pytest.approx(spliced, abs=1.5 / len(y))  # fp16 cache: one flip


def _tampered(clf: dict) -> dict:
    """The classifier with one weight changed and its fingerprint field kept."""
    return dict(clf, model=dict(clf["model"], **{"fc.bias": clf["model"]["fc.bias"] + 1.0}))


def test_sae_with_another_classifier_is_refused(tiny_sae, tiny_classifier):
    clf = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    other = _tampered(clf)
    other["fingerprint"] = artifacts.tensor_fingerprint(other["model"])  # an honestly different classifier
    with pytest.raises(UserError, match="trained on classifier"):
        artifacts.load_sae(tiny_sae / "best_sae.pt", other)
    with pytest.raises(UserError, match="do not match its recorded fingerprint"):
        artifacts.load_sae(tiny_sae / "best_sae.pt", _tampered(clf))  # the stored field is not trusted


def test_edited_sae_checkpoint_is_refused(tiny_sae, tmp_path):
    ckpt = artifacts.load_checkpoint(tiny_sae / "best_sae.pt", "sae")
    ckpt["state"]["D"][0, 0] += 1.0
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="modified after saving"):
        artifacts.load_sae(tmp_path / "edited.pt")


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


def test_resume_without_a_saved_epoch_says_so_before_the_token_pass(tiny_classifier, tmp_path, monkeypatch):
    import train_sae
    from selfexplain import sae_train

    def no_token_pass(*args, **kwargs):
        raise AssertionError("the missing last_sae.pt must be reported before caching tokens")

    monkeypatch.setattr(sae_train, "cache_split_tokens", no_token_pass)
    with pytest.raises(UserError, match="nothing to resume"):
        train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path), resume=True,
                       tensorboard=False)


def test_missing_classifier_is_a_clear_error(tmp_path):
    import train_sae

    with pytest.raises(UserError, match="run train_standard_cnn.py first"):
        train_sae.main(classifier_ckpt=str(tmp_path / "nope.pt"), out_dir=str(tmp_path), tensorboard=False)


def test_resume_continues_epochs_and_optimizer(tiny_classifier, tmp_path, cache_dir, capsys):
    import train_sae

    cfg = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path), cache_dir=str(cache_dir),
               latent_dim=32, top_k=4, batch_size=128, min_steps=0, tensorboard=False)
    train_sae.main(**cfg, epochs=2)
    with pytest.raises(UserError, match="holds an earlier run"):
        train_sae.main(**cfg, epochs=3)  # neither --resume nor --overwrite: the run is kept
    for bad in (dict(amp="fp8"), dict(feature_batch=0), dict(cache_dir=str(tmp_path / "no" / "cache"),
                                                         classifier_ckpt=str(tmp_path / "nope.pt"))):
        with pytest.raises(UserError):
            train_sae.main(**{**cfg, **bad}, epochs=3, overwrite=True)
        assert (tmp_path / "last_sae.pt").is_file()  # --overwrite with a mistake deletes nothing
    first = artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")
    from selfexplain import sae_train

    def no_token_pass(*args, **kwargs):
        raise AssertionError("a resume that cannot go on must be refused before caching tokens")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sae_train, "cache_split_tokens", no_token_pass)
        with pytest.raises(UserError, match="has M=32 K=4 ARCH=batchtopk; resume with --latent_dim=32"):
            train_sae.main(**{**cfg, "latent_dim": 64}, epochs=3, resume=True)
        with pytest.raises(UserError, match="trained with --batch_size=128, which set its learning-rate schedule"):
            train_sae.main(**{**cfg, "batch_size": 512}, epochs=3, resume=True)  # trained on at lr 0 before
    capsys.readouterr()
    metrics = train_sae.main(**cfg, epochs=3, resume=True)  # a longer run: said, since the schedule spans EPOCHS
    assert "after epoch 2 of EPOCHS=2; now EPOCHS=3: the learning-rate schedule is recomputed over 3 epochs, 1 more " \
           "epoch(s) (resume with --epochs=2 to keep it)" in capsys.readouterr().err
    last = artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][:2] == first["history"]
    steps = first["step"] // 2
    assert last["step"] == 3 * steps
    adam_steps = [float(s["step"]) for s in last["optimizer"]["state"].values()]
    assert adam_steps and all(s == 3 * steps for s in adam_steps)


def test_small_token_sets_train_at_least_min_steps(tiny_classifier, tmp_path, cache_dir, capsys):
    """MIN_STEPS lengthens EPOCHS on a small token set (and only there); the log says so."""
    import train_sae

    cfg = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), cache_dir=str(cache_dir), latent_dim=32, top_k=4,
               batch_size=128, epochs=1, tensorboard=False)
    train_sae.main(**cfg, min_steps=0, out_dir=str(tmp_path / "one"))
    per_epoch = artifacts.load_checkpoint(tmp_path / "one" / "last_sae.pt", "sae")["step"]
    metrics = train_sae.main(**cfg, min_steps=2 * per_epoch + 1, out_dir=str(tmp_path / "more"))
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert "training 3 epochs (--min_steps=0 trains exactly EPOCHS)" in capsys.readouterr().err  # how to opt out
    assert artifacts.load_checkpoint(tmp_path / "more" / "last_sae.pt", "sae")["step"] == 3 * per_epoch
    assert artifacts.read_json(tmp_path / "more" / artifacts.CONFIG)["EPOCHS"] == 3  # the effective config: what ran
    assert artifacts.load_checkpoint(tmp_path / "more" / "best_sae.pt", "sae")["config"]["EPOCHS"] == 3  # was 1
    assert artifacts.read_json(tmp_path / "one" / artifacts.CONFIG)["EPOCHS"] == 1
    enough = train_sae.main(**cfg, min_steps=per_epoch, out_dir=str(tmp_path / "enough"))
    assert enough["epochs"] == 1  # already makes MIN_STEPS: EPOCHS is kept


def test_a_channel_start_puts_each_latent_on_its_channel(seed):
    sae = TopKSAE(16, 24, 4)
    random_part = sae.D[:, 16:].clone()
    sae.start_at_channels_()
    assert torch.equal(sae.D[:, :16], torch.eye(16)) and torch.equal(sae.D[:, 16:], random_part)  # the rest random
    x = torch.randn(50, 16)
    # at the start latent i reads channel i alone (ReLU'd, at the encoder's scale) and writes it back
    assert torch.allclose(sae.dense_code(x)[:, :16], torch.relu(x) * sae_module.ENCODER_INIT_SCALE)
    z = torch.zeros(1, 24)
    z[0, 3] = 2.0
    assert torch.allclose(sae.decode(z)[0], 2.0 * torch.eye(16)[3])
    with pytest.raises(ValueError, match="M >= C"):
        TopKSAE(16, 8, 4).start_at_channels_()


def test_init_channels_trains_from_the_channels_and_is_recorded(tiny_classifier, tmp_path, cache_dir, monkeypatch):
    import train_sae

    cfg = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), cache_dir=str(cache_dir), top_k=4, batch_size=256,
               epochs=1, min_steps=0, tensorboard=False, init="Channels")  # any case, as the other choices
    with pytest.raises(UserError, match="INIT=channels .* needs LATENT_DIM >= the classifier's 512 channels, got 64"):
        train_sae.main(**cfg, latent_dim=64, out_dir=str(tmp_path / "few"))
    assert not (tmp_path / "few" / "last_sae.pt").exists()
    starts, real = [], st.new_sae

    def recording(*args):
        sae, usage = real(*args)
        starts.append(sae.D.detach().clone())
        return sae, usage

    monkeypatch.setattr(st, "new_sae", recording)
    metrics = train_sae.main(**cfg, latent_dim=512, out_dir=str(tmp_path / "run"))
    assert torch.equal(starts[0], torch.eye(512))
    ckpt = artifacts.load_checkpoint(tmp_path / "run" / "best_sae.pt", "sae")
    assert ckpt["config"]["INIT"] == "channels" and np.isfinite(metrics["val_fvu"]) and metrics["val_fvu"] < 1
    assert not torch.equal(ckpt["state"]["D"], torch.eye(512))  # it trained away from the start


def test_tokens_spill_to_a_memmap(tiny_classifier, tmp_path, cache_dir):
    import train_sae

    train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path / "run"),
                   cache_dir=str(cache_dir), latent_dim=32, top_k=4, batch_size=128, epochs=1, min_steps=0,
                   token_ram_gb=0.0, tensorboard=False)
    files = sorted(p.name for p in (Path(cache_dir) / "sae_tokens").glob("*.npy"))
    assert any("-train-" in f and f.endswith("-r0of1.npy") for f in files)
    assert any("-val-" in f and f.endswith("-r0of1.npy") for f in files)
    assert not any(".tmp" in f for f in files)
    assert (tmp_path / "run" / "best_sae.pt").is_file()


def test_a_second_run_reuses_the_spilled_tokens_and_their_sums(tiny_classifier, tmp_path, cache_dir, monkeypatch):
    """The train split's memmap comes back with its (Σa, Σa²): no backbone pass, the same μ, σ and SAE."""
    import train_sae
    from selfexplain import features

    run = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), cache_dir=str(cache_dir), latent_dim=32, top_k=4,
               batch_size=16, epochs=1, min_steps=0, token_ram_gb=0.0, max_images=20, tensorboard=False)
    train_sae.main(**run, out_dir=str(tmp_path / "a"))
    assert list((Path(cache_dir) / "sae_tokens").glob("*-train-n20-*.sums.npz"))

    def no_backbone(*args, **kwargs):
        raise AssertionError("cached tokens must be reused")

    monkeypatch.setattr(features, "_fill_tokens", no_backbone)
    train_sae.main(**run, out_dir=str(tmp_path / "b"))
    first, second = (artifacts.load_checkpoint(tmp_path / d / "best_sae.pt", "sae") for d in ("a", "b"))
    for key in ("mu", "sigma", "W_e", "D"):
        assert torch.equal(first["state"][key], second["state"][key]), key


def test_in_ram_batches_are_a_permutation_without_a_full_copy(seed):
    """Batches gather rows of one permutation: the same batches as shuffling a copy, every row at most once."""
    from selfexplain.features import TokenStore

    tokens = np.arange(1000 * 4, dtype=np.float16).reshape(1000, 4)
    store = TokenStore(tokens, np.arange(250), (2, 2))
    batches = list(store.iter_batches(64, [0, 1], n_batches=100))
    assert len(batches) == 1000 // 64
    order = np.random.default_rng([0, 1]).permutation(1000)
    assert np.array_equal(torch.cat(batches).numpy(), tokens[order][:len(batches) * 64])


def test_token_cache_is_fp32_and_keyed_by_the_chosen_images(tiny_classifier, tmp_path, cache_dir):
    """AMP=bf16 still caches fp32 features; another SEED's --max_images subset never reuses old tokens."""
    import train_sae

    run = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), cache_dir=str(cache_dir), latent_dim=32, top_k=4,
               batch_size=16, epochs=0, token_ram_gb=0.0, max_images=10, amp="bf16", tensorboard=False)
    tokens = Path(cache_dir) / "sae_tokens"
    before = set(tokens.glob("*-val-n10-*.npy"))
    train_sae.main(**run, seed=1, out_dir=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # a cache-only run writes nothing into OUT_DIR
    first = set(tokens.glob("*-val-n10-*.npy")) - before
    train_sae.main(**run, seed=2, out_dir=str(tmp_path / "b"))
    second = set(tokens.glob("*-val-n10-*.npy")) - before - first
    assert len(first) == 1 and len(second) == 1  # the second seed built its own cache

    model, clf = artifacts.load_classifier(tiny_classifier / "best.pt", DEVICE)  # where train_sae ran (auto)
    model = model.to(memory_format=torch.channels_last)  # as train_sae runs it: same kernels, same rounding
    chosen = st.subsample(clf["split"]["val"].numpy(), 10, 2)
    images = data.load_dataset(clf["dataset"], cache_dir, progress=False).images
    fmap = torch.cat([f.cpu() for _, f, _ in iter_feature_maps(model, images, chosen, clf["preprocess"], DEVICE,
                                                               amp="off")])
    cached = torch.from_numpy(np.load(second.pop())).float()
    assert torch.equal(cached, tokens_of(fmap).half().float())  # the fp32 features, stored as fp16


def test_ddp_two_processes_gloo(tiny_classifier, tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_sae.py"), "--device=cpu", f"--classifier_ckpt={tiny_classifier / 'best.pt'}",
           f"--out_dir={tmp_path}", f"--cache_dir={cache_dir}", "--latent_dim=32", "--top_k=4",
           "--batch_size=64", "--epochs=2", "--min_steps=0", "--tensorboard=False"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all 2 ranks hold identical SAE weights" in out.stderr
    assert "world 2 (DDP on gloo), precision " in out.stderr  # the group and the encoder precision are named
    assert out.stderr.count("best epoch") == 1  # only rank 0 reports and writes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    clf = artifacts.load_checkpoint(tiny_classifier / "best.pt", "classifier")
    assert metrics["history"][-1]["val_n_tokens"] == len(clf["split"]["val"]) * 4  # both shards evaluated
    artifacts.load_sae(tmp_path / "best_sae.pt", clf)


def test_ddp_with_one_validation_image_counts_every_rank(tiny_classifier, tmp_path, cache_dir):
    """With one image per split, rank 1's val shard is empty: it called the split empty (exit 1, a gloo
    traceback on rank 0), and the log counted a rank's tokens times the world (8 for 4)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_sae.py"), "--device=cpu", f"--classifier_ckpt={tiny_classifier / 'best.pt'}",
           f"--out_dir={tmp_path}", f"--cache_dir={cache_dir}", "--latent_dim=8", "--top_k=2", "--max_images=1",
           "--batch_size=2", "--epochs=1", "--min_steps=0", "--tensorboard=False"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "cached 4 train / 4 val tokens (2x2 per image)" in out.stderr, out.stderr[-2000:]
    assert "empty validation split" not in out.stderr
    # rank 1 holds no training image: both ranks say so alike (rank 0 spoke of its own 4 tokens)
    assert out.stderr.count("larger than the 0 training tokens of the smallest of 2 processes' shares") == 2


def test_a_cache_only_run_says_whether_it_kept_the_tokens(tiny_classifier, tmp_path, cache_dir, capsys):
    import train_sae

    run = dict(classifier_ckpt=str(tiny_classifier / "best.pt"), cache_dir=str(cache_dir), latent_dim=32, top_k=4,
               epochs=0, max_images=10, tensorboard=False, out_dir=str(tmp_path / "run"))
    train_sae.main(**run, token_ram_gb=4.0)
    assert "no tokens are kept: they fit in TOKEN_RAM_GB" in capsys.readouterr().err
    train_sae.main(**run, token_ram_gb=0.0)
    assert f"the tokens are cached in {Path(cache_dir) / 'sae_tokens'}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_batchtopk_threshold_under_ddp_moves_to_the_mean_of_the_ranks_values():
    """Each rank's smallest kept value; their minimum (used before) sat lower the more ranks there were."""
    sae = TopKSAE(8, 16, 2, arch="batchtopk")
    other_rank = torch.tensor([3.0, 1.0])                       # another rank's smallest kept value, and "found"

    def reduce_sum(t):                                           # what all_reduce_sum does with two ranks
        t += other_rank
        return t

    sae.update_threshold_(torch.tensor([[0.0, 1.0, 5.0]]), rate=1.0, reduce_sum=reduce_sum)
    assert float(sae.threshold) == pytest.approx(2.0)            # (1 + 3) / 2, not min(1, 3)
    sae.update_threshold_(torch.tensor([[0.0, 0.0]]), rate=1.0, reduce_sum=lambda t: t)  # nothing kept anywhere
    assert float(sae.threshold) == pytest.approx(2.0)
    sae.update_threshold_(torch.tensor([[0.0, 4.0]]), rate=0.5)  # one process: halfway towards its own value
    assert float(sae.threshold) == pytest.approx(3.0)


def test_a_token_cache_the_disk_cannot_hold_is_a_one_line_error(tmp_path, monkeypatch):
    from selfexplain import features

    path = tmp_path / "tokens.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1000, 8))

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(features.os, "posix_fallocate", full, raising=False)
    with pytest.raises(UserError, match=r"cannot cache tokens in .*: No space left on device \(need 0.0 GiB"):
        features.reserve_disk(path)


def test_resampling_under_batchtopk_is_refused_before_any_work():
    """Revived latents cleared θ on most tokens: validation FVU 0.44 against 0.03 with AuxK, without a word."""
    for dead in ("resample", "both"):
        with pytest.raises(UserError, match="works with ARCH=topk only"):
            st.SAETrainSettings(out_dir="x", classifier_ckpt="y", arch="batchtopk", dead_latents=dead).check()
    st.SAETrainSettings(out_dir="x", classifier_ckpt="y", arch="topk", dead_latents="both").check()


def test_a_dead_share_above_the_target_says_what_to_try():
    """15.6% dead on validation read as fine beside the atlas's "4 dead" (another count: training images)."""
    assert st.dead_note(0.05, 4600, 256, 8) == ""
    assert st.dead_note(0.172, 300, 256, 8) == ""  # under 10·M/K = 320 tokens: "mostly chance" was said already
    note = st.dead_note(0.156, 4600, 256, 8)
    assert note.startswith("warning: 15.6% of the 256 latents fired on none of the 4600 validation tokens")
    assert "--latent_dim" in note and "stage 3 counts as dead only" in note


def test_best_sae_is_the_epoch_with_the_lowest_validation_fvu(tiny_classifier, tmp_path, cache_dir, monkeypatch):
    """Every later stage reads best_sae.pt: with validation improving every epoch, best and last were one file,
    and a loop that saved every epoch as best passed every test."""
    import train_sae

    real, fvus = st.evaluate_sae, iter([0.5, 0.3, 0.4])

    def scripted(*args, **kwargs):  # the real metrics, with the FVU a bumpy run would report
        return {**real(*args, **kwargs), "fvu": next(fvus)}

    monkeypatch.setattr(st, "evaluate_sae", scripted)
    train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path), cache_dir=str(cache_dir),
                   latent_dim=16, top_k=2, batch_size=64, epochs=3, min_steps=0, tensorboard=False)
    assert artifacts.load_checkpoint(tmp_path / "best_sae.pt", "sae")["epoch"] == 2
    assert artifacts.load_checkpoint(tmp_path / "last_sae.pt", "sae")["epoch"] == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["val_fvu"] == 0.3


def test_too_few_tokens_for_a_batch_names_a_batch_size_that_fits():
    from types import SimpleNamespace

    from selfexplain.distributed import Runtime

    cpu = Runtime(torch.device("cpu"))
    with pytest.raises(UserError, match=r"BATCH_SIZE=512 is larger than the 128 training tokens per process: lower "
                                        r"--batch_size to 128 or less \(--batch_size=32 makes about four steps"):
        st.steps_per_epoch(SimpleNamespace(n_tokens=128), 512, cpu)  # 2 classes x 6 images at 64 px
    assert st.steps_per_epoch(SimpleNamespace(n_tokens=128), 32, cpu) == 4
    with pytest.raises(UserError, match=r"the 0 training tokens per process: add images$"):
        st.steps_per_epoch(SimpleNamespace(n_tokens=0), 512, cpu)


# ----------------------------------------------------------------------------- gaps a mutation run found (session 23)
def test_codes_are_never_negative_even_where_every_pre_activation_is(seed):
    """Dropping the ReLU after Top-K passed every test: their biases kept all pre-activations positive."""
    for arch in ("topk", "batchtopk"):
        sae = TopKSAE(4, 6, k=4, arch=arch)
        x = torch.randn(5, 4)
        with torch.no_grad():
            sae.b_e.fill_(-10.0)  # every pre-activation negative: nothing fires
        recon, values, _ = sae(x)
        assert torch.count_nonzero(sae.encode(x)) == 0 and (values >= 0).all()
        assert torch.allclose(recon, sae.b_d.expand_as(recon))  # the reconstruction is the bias alone
        with torch.no_grad():
            sae.W_e.zero_()
            sae.b_e.copy_(torch.tensor([1.0, 2.0, -1.0, -2.0, -3.0, -4.0]))  # 2 positive among the top 4
        assert (torch.count_nonzero(sae.encode(x), dim=1) == 2).all()
        values, _, _, _ = TopKEncode.apply(x, sae.W_e, sae.b_e, 4, 0, torch.zeros(6, dtype=torch.bool), None, 0)
        assert (values >= 0).all() and (torch.count_nonzero(values, dim=1) == 2).all()  # training's code too


def test_fvu_is_against_each_channels_own_mean():
    """FVU's denominator is the variance around each channel's mean: predicting that mean explains nothing
    (1.0). Around the grand mean (a mutation that passed: standardised tokens hide it) this read 0.024."""
    x = torch.tensor([[0.0, 10.0], [2.0, 10.0]])
    assert fvu_loss(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)
    assert fvu_loss(x, x).item() == 0.0


def test_auxk_reconstructs_the_residual_without_the_decoder_bias(seed):
    """AuxK's dead latents fit the residual x - x̂, which has no bias in it: adding b_d there (a mutation that
    passed) pulls b_d towards the residual and misreports train_aux_loss."""
    sae = TopKSAE(3, 4, k=1)
    with torch.no_grad():
        sae.b_d.copy_(torch.tensor([5.0, -4.0, 3.0]))  # large: with it, the aux loss would be far off
        sae.b_e.copy_(torch.tensor([3.0, 0.0, 0.0, 0.5]))  # latent 0 wins every token; 3 is dead, positive
    x = torch.randn(8, 3)
    dead = torch.tensor([False, False, False, True])
    with torch.no_grad():
        pre = sae.pre_acts(x)
        recon = sae.b_d + pre[:, :1].clamp_min(0) * sae.D[:, 0]
        want = fvu_loss(x - recon, pre[:, 3:].clamp_min(0) * sae.D[:, 3])
    out = st.train_step(sae, torch.optim.SGD(sae.parameters(), lr=0.0), x, dead=dead, k_aux=1, aux_coef=1.0)
    assert out["aux_loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_batchtopk_threshold_starts_at_the_first_batch_so_a_short_run_keeps_about_k(tiny_classifier, tmp_path,
                                                                                     cache_dir):
    """θ's running mean starts as the first batch's smallest kept code (weight 1/(step + 1)): started from 0 at
    the EMA's 1% (a mutation that passed), a short run's θ stays near 0 and inference keeps up to 4K per token."""
    import train_sae

    metrics = train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(tmp_path),
                             cache_dir=str(cache_dir), latent_dim=32, top_k=4, arch="batchtopk", epochs=1,
                             min_steps=0, batch_size=128, tensorboard=False)
    assert 2.0 <= metrics["val_l0"] <= 6.0  # K = 4 on average
