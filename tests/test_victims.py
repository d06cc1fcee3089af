"""The victim side: settings, training loop, counter-measures, metrics, precision choice, the attacker's moves."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

from salm_fast.models import build_model
from salm_fast.victims import (
    VictimConfig,
    auc_score,
    balanced_accuracy,
    choose_precision,
    classification_metrics,
    make_defense,
    parse_defenses,
    perturbation_metrics,
    protection_auc,
    ssim,
    train_victim,
)
from salm_fast.victims.defenses import AdversarialTraining, CropFlip, CutMix, Cutout, Mixup
from salm_fast.victims.train import as_uint8_images


def squares(n: int, seed: int, channels: int = 1, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise plus a bright 8 px square: top-left for class 0, bottom-right for class 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, channels, size, size, generator=g) * 60).to(torch.uint8)
    x[y == 0, :, 2:10, 2:10] += 150
    x[y == 1, :, size - 10:size - 2, size - 10:size - 2] += 150
    return x, y


def rand_u8(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


FAST = dict(batch_size=16, precision="fp32", eval_train=False)




# --------------------------------------------------------------------------------------------
# Training loop

def test_learns_a_separable_task_quickly():
    x, y = squares(96, seed=0)
    xt, yt = squares(64, seed=1)
    r = train_victim("cnn", x, y, xt, yt, epochs=3, lr=3e-3, seed=0, **FAST)
    assert r.test["acc"] >= 0.95 and r.test["auc"] >= 0.99
    assert len(r.history) == 3 and r.history[-1]["train_acc"] >= 0.9
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    assert r.precision == "fp32" and r.model_name == "cnn" and r.images_per_s > 0
    assert r.settings["optimizer"] == "adam" and r.settings["epochs"] == 3


def test_same_seed_same_history_and_other_seed_differs():
    x, y = squares(64, seed=0)
    xt, yt = squares(32, seed=1)
    kw = dict(epochs=2, seed=3, defense="crop_flip+cutout+mixup", **FAST)
    runs = [train_victim("cnn", x, y, xt, yt, **kw) for _ in range(2)]
    other = train_victim("cnn", x, y, xt, yt, **{**kw, "seed": 4})

    def strip(r):
        return [{k: v for k, v in row.items() if k != "epoch_s"} for row in r.history]

    assert strip(runs[0]) == strip(runs[1]) and runs[0].test == runs[1].test
    assert strip(other) != strip(runs[0])


def test_caller_rng_is_left_untouched():
    x, y = squares(32, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_victim("cnn", x, y, x, y, epochs=1, **FAST)
    assert torch.equal(torch.rand(3), expected)


def test_inputs_layouts_and_validation():
    x, y = squares(32, seed=0)
    r = train_victim("cnn", x[:, 0].numpy(), y.numpy()[:, None], x.float() / 255, y, epochs=1, eval_every=0,
                     val_x=x, val_y=y, select="best_val", **FAST)
    assert r.val is not None and r.test["n"] == 32 and r.history[-1]["val_auc"] is not None
    rgb_hwc = rand_u8((4, 28, 28, 3))
    assert as_uint8_images(rgb_hwc).shape == (4, 3, 28, 28)
    assert torch.equal(as_uint8_images(torch.tensor([[[0.0, 1.0]]]).expand(1, 2, 2)),
                       torch.tensor([[[[0, 255], [0, 255]]]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        train_victim("cnn", x, y[:-1], x, y, epochs=1, **FAST)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_victim("cnn", x.float(), y, x, y, epochs=1, **FAST)
    with pytest.raises(ValueError, match="unknown model"):
        train_victim("resnet7", x, y, x, y, epochs=1, **FAST)
    with pytest.raises(ValueError, match="best_val"):
        train_victim("cnn", x, y, x, y, epochs=1, select="best_val", **FAST)


def test_trains_a_given_module_with_bf16_and_data_defense():
    x, y = squares(32, seed=0, channels=3)
    torch.manual_seed(0)
    net = build_model("cnn", 3, 2)
    r = train_victim(net, x, y, x, y, epochs=1, batch_size=16, precision="bf16", threads=1,
                     defense="grayscale+bitdepth-3", optimizer="sgd", lr=0.01)
    assert r.precision == "bf16" and r.model_name == "SmallCNN" and r.defense == "grayscale+bitdepth-3"
    assert r.model[1] is net and r.train is not None and math.isfinite(r.history[0]["train_loss"])
    assert "model" not in r.to_dict()


# --------------------------------------------------------------------------------------------
# Data-level defenses

def test_jpeg_changes_pixels_keeps_shape_and_matches_pil():
    for c in (1, 3):
        x = rand_u8((3, c, 28, 28), seed=c)
        out = make_defense("jpeg-50")(x)
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert (out != x).float().mean() > 0.5
    img = x[0].permute(1, 2, 0).numpy()
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=50)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected)


def test_bitdepth_leaves_at_most_2_to_the_bits_levels():
    x = rand_u8((4, 3, 28, 28))
    for bits in range(1, 8):
        out = make_defense(f"bitdepth-{bits}")(x)
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert out.unique().numel() <= 2**bits
        step = 255 / (2**bits - 1)
        assert (out.double() - x.double()).abs().max() <= step / 2 + 0.5
    assert torch.equal(make_defense("bitdepth-8")(x), x)


def test_grayscale_gives_equal_channels_like_pil_and_noop_on_gray():
    x = rand_u8((3, 3, 28, 28))
    g = make_defense("grayscale")
    out = g(x)
    assert out.shape == x.shape and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    pil = np.asarray(Image.fromarray(x[0].permute(1, 2, 0).numpy()).convert("L")).astype(int)
    assert np.abs(out[0, 0].numpy().astype(int) - pil).max() <= 1  # PIL rounds in fixed point
    gray = rand_u8((2, 1, 28, 28))
    assert torch.equal(g(gray), gray) and "no-op" in g.note(1) and g.note(3) is None
    assert parse_defenses("iss").notes(1) and not parse_defenses("iss").notes(3)


def test_iss_chains_grayscale_jpeg_bitdepth():
    x = rand_u8((2, 3, 28, 28))
    out = make_defense("iss")(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 2]) and out.unique().numel() <= 16
    assert make_defense("iss-30-2")(x).unique().numel() <= 4


def test_blur_is_a_normalized_gaussian():
    flat = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    assert torch.equal(make_defense("blur")(flat), flat)
    impulse = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    impulse[0, 0, 10, 10] = 200
    out = make_defense("blur-1")(impulse)[0, 0].double()
    k = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) ** 2)
    k = k / k.sum()
    expected = torch.zeros(28, 28, dtype=torch.float64)
    expected[9:12, 9:12] = (200 * k[:, None] * k[None, :]).round()
    assert torch.equal(out, expected)
    assert make_defense("blur-0.5")(impulse)[0, 0, 10, 10] > out[10, 10]


# --------------------------------------------------------------------------------------------
# Training-time defenses

def onehot(n: int, k: int) -> torch.Tensor:
    return F.one_hot(torch.arange(n) % k, k).float()


def test_crop_flip_is_a_shift_or_a_flipped_shift_of_each_image():
    x = torch.rand(6, 2, 28, 28, generator=torch.Generator().manual_seed(0))
    out, t = CropFlip()(x, onehot(6, 2), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(t, onehot(6, 2))
    padded = F.pad(x, (4, 4, 4, 4))
    flipped_any = False
    for i in range(6):
        crops = {(dy, dx): padded[i][:, dy:dy + 28, dx:dx + 28] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, f) for (dy, dx), crop in crops.items() for f in (False, True)
                   if torch.equal(out[i], crop.flip(-1) if f else crop)]
        assert matches, f"image {i} is not a shifted (flipped) copy"
        flipped_any |= any(f for _, _, f in matches)
    assert flipped_any


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(64, 1, 28, 28)
    out, _ = Cutout(8)(x, onehot(64, 2), torch.Generator().manual_seed(0))
    full = 0
    for i in range(64):
        holes = out[i, 0] == 0
        rows, cols = holes.any(1).nonzero()[:, 0], holes.any(0).nonzero()[:, 0]
        assert rows.numel() > 0 and rows.numel() <= 8 and cols.numel() <= 8
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        assert holes.sum() == rows.numel() * cols.numel()  # a full rectangle
        full += int(holes.sum()) == 64
        assert (out[i, 0][~holes] == 1).all()
    assert full > 0
    assert Cutout()(x, onehot(64, 2), torch.Generator().manual_seed(0))[0].eq(0).sum(dim=(1, 2, 3)).max() == 14 * 14


@pytest.mark.parametrize("mix", [Mixup(1.0), CutMix(1.0, prob=1.0)])
def test_mixing_gives_soft_targets_that_sum_to_one_and_match_the_pixels(mix):
    n = 16
    values = torch.linspace(0.0, 1.0, n)
    x = values.view(n, 1, 1, 1).expand(n, 3, 28, 28).contiguous()
    targets = torch.eye(n)  # each image its own class: the mixed target says where its pixels came from
    out, t = mix(x, targets, torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(t.sum(1), torch.ones(n)) and (t >= 0).all()
    assert ((t > 0) & (t < 1)).any()  # soft
    assert torch.allclose(out.mean(dim=(1, 2, 3)), t @ values, atol=1e-6)


def test_cutmix_probability_zero_is_identity():
    x = torch.rand(4, 1, 28, 28)
    out, t = CutMix(prob=0.0)(x, onehot(4, 2), torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and torch.equal(t, onehot(4, 2))


def test_adversarial_training_stays_in_budget_and_raises_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 2))
    x = torch.rand(8, 1, 28, 28)
    t = onehot(8, 2)
    adv = make_defense("adv-8")
    assert isinstance(adv, AdversarialTraining) and adv.eps == pytest.approx(8 / 255) and adv.steps == 5

    def loss_fn(logits, targets):
        return -(targets * logits.log_softmax(1)).sum(1).mean()

    net.train()
    x_adv = adv.perturb(net, x, t, loss_fn, torch.Generator().manual_seed(0))
    assert net.training and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert loss_fn(net(x_adv), t) > loss_fn(net(x), t)
    assert all(p.grad is None for p in net.parameters())
    xs, ys = squares(32, seed=0)
    r = train_victim("cnn", xs, ys, xs, ys, epochs=1, defense="adv-4", **FAST)
    assert r.defense == "adv-4" and math.isfinite(r.history[0]["train_loss"])


def test_defense_names_parse_and_bad_names_list_the_valid_ones():
    plan = parse_defenses("mixup+jpeg-50+crop_flip+adv-8+blur-0.5")
    assert [d.name for d in plan.data] == ["jpeg-50", "blur-0.5"]
    assert [b.name for b in plan.batch] == ["crop_flip", "mixup"]  # pipeline order, not written order
    assert plan.adversarial.name == "adv-8" and plan.name == "jpeg-50+blur-0.5+crop_flip+mixup+adv-8"
    assert parse_defenses(None).name == parse_defenses("none").name == "none"
    assert parse_defenses(["cutout-6", "cutmix"]).name == "cutout-6+cutmix"
    for bad in ("jpeg", "jpeg-500", "foo", "jpeg50", "bitdepth-0", "adv-8-3", "crop_flip+crop_flip"):
        with pytest.raises(ValueError):
            parse_defenses(bad)
    with pytest.raises(ValueError, match="jpeg-<quality") as e:
        parse_defenses("crop_flip+median")
    assert "adv-<eps" in str(e.value) and "cutmix" in str(e.value)


# --------------------------------------------------------------------------------------------
# Metrics

def test_auc_against_hand_computed_cases():
    # 4 positive-negative pairs; (0.4 neg > 0.35 pos) is the only misordered one: 3 / 4.
    assert auc_score(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]), [0, 0, 1, 1]) == 0.75
    # A tie between a negative and a positive counts 1/2: (0.5 + 0.5 + 1) / 3.
    assert auc_score(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]]), [0, 1, 1, 1]) == \
        pytest.approx(2 / 3)
    # Three classes, macro one-vs-rest. Class 0: 0.8 beats all three negatives -> 1. Class 1:
    # positives 0.5, 0.3 vs negatives 0.1, 0.4 -> 3 of 4 pairs. Class 2: positive 0.5 vs
    # negatives 0.1, 0.4, 0.6 -> 2 of 3. Mean: (1 + 3/4 + 2/3) / 3 = 29/36.
    p = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.5, 0.4], [0.1, 0.4, 0.5], [0.1, 0.3, 0.6]])
    assert auc_score(p, torch.tensor([0, 1, 2, 1])) == pytest.approx(29 / 36)
    assert math.isnan(auc_score(torch.tensor([[0.3, 0.7], [0.6, 0.4]]), [1, 1]))


def test_accuracy_and_balanced_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 0])  # class 0: 2 of 3 right; class 1: 1 of 2; class 2 absent
    m = classification_metrics(logits, y)
    assert m["acc"] == pytest.approx(3 / 5) and m["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["n"] == 5 and balanced_accuracy(torch.tensor([1, 1]), torch.tensor([1, 1]), 2) == 1.0


def test_perturbation_metrics_by_hand():
    clean = np.zeros((2, 3, 28, 28), dtype=np.uint8) + 100
    released = clean.copy()
    released[0, 1, 3, 4] += 8           # one pixel, one channel
    released[1, :, 5, 6] -= 4           # one pixel, three channels
    m = perturbation_metrics(clean, released)
    assert m["linf_255"] == 8 and m["linf"] == pytest.approx(8 / 255)
    assert m["l0"] == pytest.approx(2 / (2 * 28 * 28))
    mse = (8**2 + 3 * 4**2) / 255**2 / clean.size
    assert m["psnr_db"] == pytest.approx(10 * math.log10(1 / mse))
    assert 0.9 < m["ssim"] < 1
    same = perturbation_metrics(clean, clean)
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["l0"] == 0
    with pytest.raises(ValueError, match="shape"):
        perturbation_metrics(clean, clean[:1])


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    for c in (1, 3):
        a = torch.rand(3, c, 28, 28, generator=g, dtype=torch.float64)
        b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        ours = ssim(a, b)
        for i in range(3):
            ref = structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, channel_axis=0)
            assert float(ours[i]) == pytest.approx(ref, abs=1e-10)


# --------------------------------------------------------------------------------------------
# Precision

def test_precision_choice_is_valid_and_explained():
    p, reason = choose_precision("auto")
    assert p in ("fp32", "bf16") and reason
    assert choose_precision("fp32")[0] == "fp32" and choose_precision("bf16")[0] == "bf16"
    with pytest.raises(ValueError):
        choose_precision("fp16")


def test_bf16_calibration_runs_on_one_thread_and_is_cached(monkeypatch):
    """The bf16 / fp32 ratio is measured on one thread (contending threads on a shared CPU made it a coin
    flip, see salm_fast.runtime), whatever the caller's count, which is restored."""
    import salm_fast.runtime as runtime

    seen = []

    def fake(model, **kw):
        seen.append((torch.get_num_threads(), kw.get("steps", runtime.BF16_CALIBRATION_STEPS)))
        return {"fp32_img_s": 100.0, "bf16_img_s": 180.0, "speedup": 1.8, "loss_rel_diff": 1e-6}

    monkeypatch.setattr(runtime, "calibrate_bf16", fake)
    monkeypatch.setattr(runtime, "cpu_features", lambda: {"amx": False, "avx512_bf16": True, "capability": "AVX512"})
    monkeypatch.setattr(runtime, "_calibration_cache", {})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7 * 7, 2))
    with runtime.intra_op_threads(2):
        p, reason = runtime.choose_precision("auto", model=model, sample_shape=(32, 1, 7, 7))
        assert torch.get_num_threads() == 2
        assert runtime.choose_precision("auto", model=model, sample_shape=(32, 1, 7, 7))[0] == "bf16"
    assert p == "bf16" and "1 thread" in reason and "1.80x" in reason
    assert seen == [(1, runtime.BF16_CALIBRATION_STEPS)]  # once: the second choice came from the cache


def test_default_batch_shrinks_on_small_training_sets():
    from salm_fast.victims.train import MIN_STEPS_PER_EPOCH, VICTIM_DEFAULTS

    g = torch.Generator().manual_seed(0)
    for n, want in ((100, 16), (400, 400 // MIN_STEPS_PER_EPOCH)):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.arange(n) % 2
        r = train_victim("cnn", x, y, x[:8], y[:8], epochs=1, precision="fp32", eval_train=False)
        assert r.settings["batch_size"] == want < VICTIM_DEFAULTS["cnn"].batch_size
    r = train_victim("cnn", x, y, x[:8], y[:8], epochs=1, batch_size=64, precision="fp32", eval_train=False)
    assert r.settings["batch_size"] == 64  # an explicit batch is kept


# --------------------------------------------------------------------------------------------
# Settings (VictimConfig) and keyword overrides

@pytest.mark.parametrize("name,value", [
    ("epochs", 1.5), ("epochs", 0), ("epochs", True), ("epochs", "3"), ("seed", 1.5), ("seed", -1),
    ("seed", False), ("batch_size", 1), ("batch_size", True), ("eval_every", -1), ("num_classes", 1),
    ("threads", 0), ("lr", 0), ("lr", float("nan")), ("lr", True), ("weight_decay", -1e-4),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("warmup_frac", 1.5), ("optimizer", "rmsprop"),
    ("precision", "fp16"), ("select", "best"), ("augment", "cutout"), ("channels_last", 1),
    ("eval_train", "yes"), ("defense", "median"), ("defense", 5), ("device", "tpu"), ("device", "cuda:99"),
])
def test_victim_config_refuses_a_bad_setting_in_one_line_naming_it(name, value):
    with pytest.raises(ValueError) as e:
        VictimConfig(**{name: value})
    message = str(e.value)
    assert "\n" not in message and name in message
    with pytest.raises(ValueError):  # the same check guards dataclasses.replace
        replace(VictimConfig(), **{name: value})


def test_victim_config_keeps_valid_settings_as_plain_python_types():
    cfg = VictimConfig(epochs=np.int64(3), lr=1, seed=np.int32(7), weight_decay=0, defense=["jpeg-50", "cutout"],
                       device=None)
    assert cfg.epochs == 3 and type(cfg.epochs) is int and type(cfg.seed) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.weight_decay) is float
    assert cfg.defense_plan().name == "jpeg-50+cutout"
    assert [b.name for b in replace(cfg, augment="crop_flip").defense_plan().batch] == ["crop_flip", "cutout"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4


def test_config_and_keyword_overrides_give_the_same_run():
    x, y = squares(48, seed=0)
    xt, yt = squares(16, seed=1)
    cfg = VictimConfig(epochs=2, batch_size=16, precision="fp32", eval_train=False, seed=5, lr=2e-3)
    by_config = train_victim("cnn", x, y, xt, yt, config=cfg)
    by_keywords = train_victim("cnn", x, y, xt, yt, epochs=2, batch_size=16, precision="fp32", eval_train=False,
                               seed=5, lr=2e-3)
    mixed = train_victim("cnn", x, y, xt, yt, config=replace(cfg, seed=0, lr=1e-3), seed=5, lr=2e-3)

    def strip(r):
        return [{k: v for k, v in row.items() if k != "epoch_s"} for row in r.history]

    assert strip(by_config) == strip(by_keywords) == strip(mixed)
    assert by_config.test == by_keywords.test == mixed.test
    assert cfg.seed == 5 and mixed.settings["seed"] == 5 and mixed.settings["lr"] == 2e-3


def test_overrides_refuse_unknown_names_and_bad_values_before_training():
    x, y = squares(32, seed=0)
    with pytest.raises(TypeError, match="unknown victim setting.*epoch, sed;") as e:
        train_victim("cnn", x, y, x, y, epoch=1, sed=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="epochs must be an int"):
        train_victim("cnn", x, y, x, y, epochs=1.5)
    with pytest.raises(ValueError, match="epochs must be an int"):
        train_victim("cnn", x, y, x, y, config=VictimConfig(epochs=2), epochs=0)
    with pytest.raises(TypeError, match="config must be a VictimConfig"):
        train_victim("cnn", x, y, x, y, config={"epochs": 1})
    with pytest.raises(ValueError, match="progress"):
        train_victim("cnn", x, y, x, y, epochs=1, progress="yes", **FAST)
    with pytest.raises(ValueError, match="val_x and val_y"):
        train_victim("cnn", x, y, x, y, epochs=1, val_x=x, **FAST)
    with pytest.raises(ValueError, match="validation images"):
        train_victim("cnn", x, y, x, y, epochs=1, val_x=x[:, :, :20, :20], val_y=y, **FAST)
    with pytest.raises(ValueError, match="two classes"):
        train_victim("cnn", x, y, x, y, epochs=1, val_x=x[y == 1], val_y=y[y == 1], select="best_val", **FAST)


def test_runs_on_the_resolved_device_and_restores_threads_and_denormals():
    from salm_fast.runtime import _flush_denormal_state

    x, y = squares(32, seed=0)
    threads, denormal = torch.get_num_threads(), _flush_denormal_state()
    r = train_victim("cnn", x, y, x, y, epochs=1, threads=threads + 1, device="cpu", **FAST)
    assert r.settings["device"] == "cpu" and r.settings["threads"] == threads + 1
    assert next(r.model.parameters()).device.type == "cpu"
    assert torch.get_num_threads() == threads and _flush_denormal_state() == denormal
    auto = train_victim("cnn", x, y, x, y, epochs=1, **FAST)
    assert auto.settings["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# What an attacker adds: early stopping on clean labeled images, flipping an inverted ranking

def faint_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``squares`` but a faint square (+25) on strong noise: learned over a few epochs, not one step."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 28, 28, generator=g) * 120).to(torch.uint8)
    x[y == 0, :, 2:10, 2:10] += 25
    x[y == 1, :, 18:26, 18:26] += 25
    return x, y


def test_best_val_keeps_the_epoch_of_best_validation_auc_and_records_it():
    x, y = faint_squares(64, seed=0)
    xv, yv = faint_squares(32, seed=2)
    # Validation labels inverted: the better the victim learns, the lower its validation AUC, so the
    # best epoch is an early one and the kept weights are not the final ones.
    r = train_victim("cnn", x, y, xv, yv, epochs=5, lr=1e-3, val_x=xv, val_y=1 - yv, select="best_val", **FAST)
    val_aucs = [row["val_auc"] for row in r.history]
    best = val_aucs.index(max(val_aucs)) + 1
    assert r.best_epoch == best < len(r.history) and r.to_dict()["best_epoch"] == best
    assert [row.get("selected", False) for row in r.history] == [e == best for e in range(1, 6)]
    kept = r.history[best - 1]
    assert r.val["auc"] == kept["val_auc"] and r.test["auc"] == kept["test_auc"] and r.test["acc"] == kept["test_acc"]
    assert r.test["auc"] != r.history[-1]["test_auc"]
    last = train_victim("cnn", x, y, xv, yv, epochs=1, val_x=xv, val_y=1 - yv, **FAST)
    assert last.best_epoch is None and last.val is not None


def test_protection_auc_flips_binary_rankings_only():
    assert protection_auc(0.3) == pytest.approx(0.7) and protection_auc(0.8) == 0.8 and protection_auc(0.5) == 0.5
    assert protection_auc(0.0) == 1.0 and math.isnan(protection_auc(math.nan))
    assert protection_auc(0.3, num_classes=3) == 0.3
    with pytest.raises(ValueError, match="auc"):
        protection_auc(1.5)
    with pytest.raises(ValueError, match="num_classes"):
        protection_auc(0.5, num_classes=1)


def test_binary_test_metrics_carry_the_flipped_auc():
    x, y = squares(64, seed=0)
    xt, yt = squares(32, seed=1)
    r = train_victim("cnn", x, y, xt, 1 - yt, epochs=2, lr=3e-3, **FAST)  # an inverted test ranking
    assert r.test["auc"] < 0.5 and r.test["auc_flipped"] == 1 - r.test["auc"]
    assert list(r.test)[:3] == ["acc", "auc", "auc_flipped"]
    assert "auc_flipped" not in r.history[-1] and (r.val is None)
    from salm_fast.data import make_synthetic

    ds = make_synthetic(n_train=48, n_val=4, n_test=24, n_classes=3, seed=0)
    multi = train_victim("cnn", ds["train"].images, ds["train"].labels, ds["test"].images, ds["test"].labels,
                         epochs=1, **FAST)
    assert "auc_flipped" not in multi.test and multi.settings["num_classes"] == 3


#: Test ACC / AUC of a small fixed-seed run (``cnn``, fp32, 2 epochs, one thread), recorded before the
#: training loop was split into steps: the refactor must not change what a victim learns. fp32
#: convolutions differ per instruction set (oneDNN), hence one entry per CPU capability.
PINNED_VICTIM = {"AVX512": {"acc": 0.5, "auc": 0.3984375, "auc_flipped": 0.6015625}}


def test_fixed_seed_victim_metrics_are_pinned():
    from salm_fast.data import make_synthetic

    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in PINNED_VICTIM:
        pytest.skip(f"no pinned victim metrics for CPU capability {cap}")
    ds = make_synthetic(n_train=64, n_val=16, n_test=32, seed=1)
    r = train_victim("cnn", ds["train"].images, ds["train"].labels, ds["test"].images, ds["test"].labels,
                     epochs=2, precision="fp32", threads=1, device="cpu")
    assert {k: r.test[k] for k in PINNED_VICTIM[cap]} == PINNED_VICTIM[cap]
