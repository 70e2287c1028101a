"""The landscape study: noisy BatchNorm, the probing hook, and the study end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import normlab.nn as lnn
from normlab.lab.studies import CARD_VERDICTS, get_study
from normlab.lab.studies.landscape import BatchNoise, _LandscapeHook, noisy_bn_model
from normlab.lab.sweep import run_sweep
from normlab.lab.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_batch_noise_is_fixed_between_resamples_and_off_in_eval():
    noise = BatchNoise(3, scale=0.5, shift=0.5, mean_range=1.0, var_range=(0.5, 1.5), seed=0)
    y = torch.randn(8, 3, 4, 4)
    a, b = noise(y), noise(y)
    assert torch.equal(a, b) and not torch.equal(a, y)  # same draws within a step
    noise.resample()
    assert not torch.equal(noise(y), a)  # new step, new distribution
    noise.eval()
    assert torch.equal(noise(y), y)  # inference: plain BN


def test_batch_noise_of_training_does_not_depend_on_probe_passes():
    a = BatchNoise(3, scale=0.5, shift=0.5, mean_range=1.0, var_range=(0.5, 1.5), seed=0)
    b = BatchNoise(3, scale=0.5, shift=0.5, mean_range=1.0, var_range=(0.5, 1.5), seed=0)
    y = torch.randn(8, 3)
    for _ in range(3):
        b(torch.randn(5, 3))  # a probe on other samples: draws for another shape
        assert torch.equal(a(y), b(y))
        a.resample()
        b.resample()


def test_batch_noise_moves_each_channels_distribution():
    noise = BatchNoise(4, scale=0.0, shift=1.0, mean_range=1.0, var_range=(1e-6, 2e-6), seed=1)
    y = torch.zeros(256, 4)
    out = noise(y)
    mean_c, _ = noise._params[1]
    # Additive noise only, almost no variance: each channel is shifted by its own m_c.
    torch.testing.assert_close(out.mean(0), mean_c, atol=1e-2, rtol=0)
    assert mean_c.abs().max() <= 1.0 and mean_c.std() > 0


def test_noisy_bn_model_wraps_every_batchnorm():
    model = noisy_bn_model(norm="bn", input_shape=(1, 8, 8), num_classes=10, base="cnn", noise_seed=3)
    noises = [m for m in model.modules() if isinstance(m, BatchNoise)]
    bns = [m for m in model.modules() if isinstance(m, lnn.BatchNorm2d)]
    assert len(noises) == len(bns) == 3
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="no BatchNorm"):
        noisy_bn_model(norm="ln", input_shape=(1, 8, 8), num_classes=10, base="cnn")


@pytest.mark.parametrize("model,noisy", [("mlp", False), ("cnn", False), ("cnn", True)])
def test_probing_does_not_change_training(model, noisy):
    cfg = dict(data="digits", model=model, norm="bn", epochs=1, max_steps=12, batch_size=16,
               optimizer="sgd", lr=0.05, lr_scaling="none", data_options={"limit": 200})
    if noisy:
        cfg.update(model="normlab.lab.studies.landscape:noisy_bn_model", model_options={"base": model})

        class Resample:  # what the probing hook does to the noise, without the probes
            def on_train_start(self, m, config, data):
                self.noise = [x for x in m.modules() if isinstance(x, BatchNoise)]
                self.on_step()

            def on_step(self, *args):
                for x in self.noise:
                    x.resample()

        plain = train(cfg, hooks=[Resample()])
    else:
        plain = train(cfg)
    hook = _LandscapeHook(every=4, scales=[0.5, 1.0, 2.0], act_samples=32)
    probed = train(cfg, hooks=[hook])
    # Probes run the model at other parameters and in train mode (BN statistics): all undone.
    assert probed["final_val_loss"] == plain["final_val_loss"]
    assert probed["final_train_loss"] == plain["final_train_loss"]
    summary = hook.summary()
    assert summary["probes"] == 4  # steps 1, 4, 8, 12
    assert summary["trace_step"] == [1, 4, 8, 12]
    assert summary["loss_range"] > 0 and summary["beta_smoothness"] > 0
    assert 0 < summary["ics_cos"] <= 1 + 1e-9
    assert len(summary["ics_l2_by_layer"]) == (2 if model == "mlp" else 3)  # layers after the first


def test_landscape_study_end_to_end(tmp_path):
    study = get_study("landscape")
    cfg = dataclasses.replace(study.default_config(quick=True), models=("mlp", "cnn"), seeds=(0, 1),
                              epochs=2, max_steps=12,
                              probe_every=4, limit=192, act_samples=48)
    study.validate(cfg)
    configs = study.runs(cfg)
    assert len(configs) == 2 * 3 * 2
    results = run_sweep(study.name, configs, tmp_path, workers=1, progress=False)
    assert all(r.done for r in results), [r.error for r in results if not r.done]
    for r in results:
        assert r.final["probes"] == 4 and r.final["act_instability"] >= 0
        assert len(r.epochs) == 2 and "probe_loss_range" in r.epochs[0]  # 192 samples: 6 steps/epoch
    noisy = [r.final["act_instability"] for r in results if r.config["norm"] == "noisy-bn"]
    plain = [r.final["act_instability"] for r in results if r.config["norm"] == "bn"]
    assert min(noisy) > max(plain)  # the injected noise makes the distributions move
    cards = study.analyze(results, cfg)
    assert len(cards) == 6  # three claims per model
    for c in cards:
        assert c.verdict in CARD_VERDICTS and c.measurement and c.verdict != "answer"
    figs = study.plot(results, cfg, tmp_path / "figs")
    assert len(figs) == 4
    for f in figs:
        assert f.path.read_bytes()[:8] == PNG


def test_validate_rejects_unknown_settings():
    study = get_study("landscape")
    cfg = study.default_config(quick=True)
    with pytest.raises(ValueError, match="norm"):
        study.validate(dataclasses.replace(cfg, norms=("bn", "gn")))
    with pytest.raises(ValueError, match="model"):
        study.validate(dataclasses.replace(cfg, models=("resnet",)))
