"""A device end to end and streamed data: the protector's data view, uint8 masks, compact noise, the
release made batch by batch, memory-mapped files, and the device choice (CPU here; CUDA by monkeypatch
or the meta device, never a real GPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import salm_fast.api as api
from salm_fast import protect
from salm_fast.bilevel import BiLevelConfig, BiLevelTrainer
from salm_fast.data import load_medmnist, make_synthetic, save_medmnist, storage_to_nchw
from salm_fast.data.dataset import stored_npy_memmap
from salm_fast.data.view import ImageView, pass_batch
from salm_fast.generator import NoiseGenerator
from salm_fast.methods import make_method
from salm_fast.noise import GeneratorNoise, SampleWiseNoise
from salm_fast.release import budget_levels, quantize_release
from salm_fast.runtime import choose_precision, resolve_device
from salm_fast.surrogate import build_surrogate, saliency_mask

EPS = 8 / 255


def tiny_loop(**kw) -> BiLevelConfig:
    return BiLevelConfig(**{"max_rounds": 2, "surrogate_steps": 2, "batch_size": 16, "min_rounds": 1,
                            "precision": "fp32", **kw})


@pytest.fixture(scope="module")
def rgb():
    return make_synthetic(n_train=40, n_val=12, n_test=12, size=28, channels=3, seed=4)


def assert_stored_budget(clean: np.ndarray, release: np.ndarray, eps: float, k: int | None) -> None:
    """|release - clean| <= the budget in levels and (masked) at most k pixels changed per image."""
    assert release.dtype == np.uint8  # the [0, 255] range, i.e. [0, 1]
    diff = np.abs(release.astype(np.int16) - clean.astype(np.int16))
    assert int(diff.max()) <= budget_levels(eps) and int(diff.max()) > 0
    if k is not None:
        changed = diff.max(axis=-1) if diff.ndim == 4 else diff
        assert int((changed > 0).reshape(len(diff), -1).sum(1).max()) <= k


# ------------------------------------------------------------------------------ the data view
@pytest.mark.parametrize("channels", [1, 3])
def test_view_batches_are_the_whole_float_tensor_bit_for_bit(channels):
    ds = make_synthetic(n_train=30, n_val=7, n_test=5, size=16, channels=channels, seed=1)
    parts = [ds["train"].images, ds["val"].images]
    whole = torch.cat([storage_to_nchw(p) for p in parts])
    view = ImageView(parts)
    assert view.shape == whole.shape and len(view) == 37 and view.is_uint8
    idx = torch.tensor([36, 0, 29, 30, 5, 31])  # both parts, out of order, across the boundary
    assert torch.equal(view[idx], (whole.float() / 255)[idx])
    assert torch.equal(view[25:34], (whole.float() / 255)[25:34])  # a slice straddling the parts
    assert view[idx].is_contiguous() and view[idx].dtype == torch.float32
    assert torch.equal(view.u8(idx), whole[idx])
    assert torch.equal(view.full(), whole.float() / 255)
    assert view.digest() == ImageView(whole).digest()  # the same bytes, however they are held


def test_view_of_a_float_tensor_only_indexes_it():
    x = torch.rand(10, 1, 8, 8)
    view = ImageView(x)
    assert not view.is_uint8 and view.stored_dtype == "float32"
    assert torch.equal(view[torch.tensor([3, 1])], x[[3, 1]])
    with pytest.raises(TypeError, match="not stored bytes"):
        view.u8([0])


def test_pass_batches_shrink_with_the_image_size():
    assert pass_batch((5000, 1, 28, 28)) == 1024  # unchanged at MedMNIST size
    assert pass_batch((5000, 3, 28, 28)) == 1024
    assert pass_batch((5000, 3, 224, 224)) == 16
    assert pass_batch((5, 3, 4096, 4096)) == 1


# ------------------------------------------------------------------------------ memory-mapped files
def test_an_uncompressed_npz_is_memory_mapped_and_a_compressed_one_read(rgb, tmp_path):
    arrays = {f"{s}_images": rgb[s].images for s in rgb.splits}
    arrays.update({f"{s}_labels": rgb[s].labels.astype(np.uint8) for s in rgb.splits})
    np.savez(tmp_path / "plain.npz", **arrays)
    mapped = stored_npy_memmap(tmp_path / "plain.npz", "train_images.npy")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, rgb["train"].images)
    loaded = load_medmnist(tmp_path / "plain.npz")
    assert isinstance(loaded["train"].images, np.memmap) and not loaded["train"].images.flags.writeable
    assert np.array_equal(loaded["test"].images, rgb["test"].images)
    save_medmnist(rgb, tmp_path / "packed.npz")  # deflated, as MedMNIST ships: no map, read whole
    assert stored_npy_memmap(tmp_path / "packed.npz", "train_images.npy") is None
    assert not isinstance(load_medmnist(tmp_path / "packed.npz")["train"].images, np.memmap)
    # A protection straight from the mapped file: the same release bytes as from memory.
    a = protect(loaded, "random", out=tmp_path / "a", eps=EPS, seed=1, figure=False, audit=False, splits="train")
    b = protect(rgb, "random", out=tmp_path / "b", eps=EPS, seed=1, figure=False, audit=False, splits="train")
    assert np.array_equal(a.release["train"].images, b.release["train"].images)


# ------------------------------------------------------------------------------ a device, end to end (CPU)
def test_protect_on_the_cpu_device_end_to_end(rgb, tmp_path):
    k = 40
    r = protect(rgb, "salm", out=tmp_path / "out", k=k, eps=EPS, seed=2, device="cpu", figure=False, audit=False,
                loop=tiny_loop(), mask_epochs=1, generator_steps=2, width=8)
    assert r.summary["device"] == "cpu" and r.summary["protection"]["device"] == "cpu"
    assert r.summary["precision"]["used"] == "fp32"
    for split in r.summary["splits"]:
        assert_stored_budget(rgb[split].images, r.release[split].images, EPS, k)
    assert r.mask.dtype == torch.uint8 and r.mask.shape == (64, 1, 28, 28)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["device"] == "cpu"


def test_an_unavailable_cuda_device_is_refused_before_anything_is_written(rgb, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        protect(rgb, "random", out=tmp_path / "out", eps=EPS, device="cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda"):
        protect(rgb, "random", out=tmp_path / "out", eps=EPS, device="tpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path):
    for argv in (["protect", "--data", "synthetic:n=40", "--method", "random", "--out", str(tmp_path / "o")],
                 ["evaluate", "--clean", "synthetic:n=40", "--release", "synthetic:n=40", "--out", str(tmp_path / "e")],
                 ["experiment", "--root", str(tmp_path / "g"), "--datasets", "synthetic:n=40", "--methods", "random"]):
        res = subprocess.run([sys.executable, "-m", "salm_fast", *argv, "--device", "cuda"], capture_output=True,
                             text=True, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("salm-fast: error: device 'cuda': CUDA is not available")
    assert list(tmp_path.iterdir()) == []


def test_a_forced_backend_must_run_on_the_device(rgb, tmp_path):
    with pytest.raises(ValueError, match="backend cpp runs on CPU tensors"):
        api._check_backend_device("cpp", torch.device("cuda"))
    api._check_backend_device("cpp", torch.device("cpu"))
    api._check_backend_device(None, torch.device("cuda"))


def fake_cuda(monkeypatch, bf16: bool = True) -> None:
    """A machine that says it has one CUDA device (nothing is ever allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 1 << 30))  # no room: nothing copied there


def test_auto_picks_cuda_where_there_is_one_and_precision_follows_the_device(monkeypatch, rgb, tmp_path):
    fake_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    assert choose_precision("auto", "cuda")[0] == "bf16"
    fake_cuda(monkeypatch, bf16=False)
    assert choose_precision("auto", "cuda")[0] == "fp32"
    job = api.plan(rgb, "random", out=tmp_path / "out", eps=EPS, device="auto")
    assert job.device == torch.device("cuda")
    seen = {}

    def fit(x, y, n_classes, **kw):  # what protect hands the method: where it must run
        seen.update(kw, x=x)
        raise KeyboardInterrupt

    monkeypatch.setattr(job.method, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        api.fit(job)
    assert seen["device"] == torch.device("cuda") and isinstance(seen["x"], ImageView)


def test_evaluate_trains_the_victims_on_its_device_at_that_device_s_precision(monkeypatch, rgb):
    import salm_fast.victims as victims

    calls = []

    def train_victim(*args, **kw):
        calls.append(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(victims, "train_victim", train_victim)
    fake_cuda(monkeypatch, bf16=True)
    with pytest.raises(KeyboardInterrupt):
        api.evaluate(rgb, rgb, victim="cnn", device="cuda", precision="auto")
    assert calls[-1]["device"] == torch.device("cuda") and calls[-1]["precision"] == "bf16"
    fake_cuda(monkeypatch, bf16=False)
    with pytest.raises(KeyboardInterrupt):
        api.evaluate(rgb, rgb, victim="cnn", device="auto", precision="auto")
    assert calls[-1]["device"] == torch.device("cuda") and calls[-1]["precision"] == "fp32"
    with pytest.raises(KeyboardInterrupt):
        api.evaluate(rgb, rgb, victim="cnn", device="cpu", precision="fp32")
    assert calls[-1]["device"] == torch.device("cpu") and calls[-1]["precision"] == "fp32"


def test_the_grid_takes_a_device_and_refuses_one_that_is_not_here(tmp_path, monkeypatch):
    from salm_fast.experiment import Grid

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Grid(tmp_path / "g", ["synthetic:n=40"], ["random"], ["cnn"], device="cuda")
    grid = Grid(tmp_path / "g", ["synthetic:n=40"], ["random"], ["cnn"], device="cpu")
    assert grid.device == torch.device("cpu") and "--device cpu" in grid.command(grid.cells()[0])


def test_the_loop_s_tensors_follow_its_device():
    """On the meta device (shapes only) every piece the loop builds must land there: a piece made on the
    CPU would not mix with meta tensors, or would come out on the CPU."""
    meta = torch.device("meta")
    u8 = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(20) % 2
    view = ImageView(u8, meta)
    x_cpu = ImageView(u8)
    for method in ("samplewise", "classwise", "generator"):
        noise = make_method(method, eps=EPS).make_noise(view, y.to(meta), 2, torch.ones(20, 1, 28, 28))
        state = [t for t in noise.state_dict().values() if isinstance(t, torch.Tensor)]
        state += list(noise.net.parameters()) if isinstance(noise, GeneratorNoise) else []
        assert state and all(t.device == meta for t in state), method
    noise = SampleWiseNoise(tuple(view.shape), EPS, device=meta)
    trainer = BiLevelTrainer(lambda: build_surrogate("cnn-half", 1, 2, 28), noise, view, y, torch.ones(20, 1, 28, 28),
                             tiny_loop(), device=meta)
    idx = torch.tensor([3, 7, 1])
    assert all(p.device == meta for p in trainer.model.parameters())
    assert trainer.mask.device == meta and trainer.mask.dtype == torch.uint8 and trainer.y.device == meta
    xb = trainer.x[idx]
    d = noise.delta(idx, xb, trainer.y[idx], trainer.mask[idx])
    assert xb.device == meta and d.device == meta and trainer.loss(xb + d, trainer.y[idx]).device == meta
    mask = saliency_mask(trainer.model, trainer.x, trainer.y, 0.1, window=5)
    assert mask.device == meta and mask.dtype == torch.uint8
    assert x_cpu[idx].device == torch.device("cpu")  # the same images, on the CPU when asked


# ------------------------------------------------------------------------------ streamed release
def test_the_release_is_made_batch_by_batch_across_splits(rgb, tmp_path, monkeypatch):
    """Small batches (forced) straddle the train/val boundary; the bytes are those of the whole perturbation."""
    import salm_fast.data.view as view_module

    monkeypatch.setattr(view_module, "PASS_ELEMENTS", 7 * 3 * 28 * 28)  # 7 images a batch
    monkeypatch.setattr(api, "MEASURE_ELEMENTS", 5 * 3 * 28 * 28)  # the budget measured 5 images at a time
    job = api.plan(rgb, "samplewise", out=tmp_path / "out", eps=EPS, seed=3, splits=["train", "val"], figure=False,
                   audit=False, loop=tiny_loop(), steps=2)
    fitted = api.fit(job)
    p = fitted.protection
    assert p.streamed
    batches = list(p.batches())
    assert [sl.stop - sl.start for sl, _ in batches[:2]] == [7, 7] and batches[-1][0].stop == 52
    whole = torch.cat([storage_to_nchw(rgb[s].images) for s in ("train", "val")])
    expected = quantize_release(whole, p.delta, EPS)
    assert torch.equal(torch.cat([storage_to_nchw(fitted.release[s]) for s in ("train", "val")]), expected)
    released, per_split = api._release(job, fitted)
    from salm_fast.release import measure_budget

    for s in ("train", "val"):
        one = measure_budget(rgb[s].images, released[s].images).as_dict()
        assert {k: v for k, v in per_split[s].items() if k != "l0_fraction"} == \
            {k: v for k, v in one.items() if k != "l0_fraction"}
        assert per_split[s]["l0_fraction"] == pytest.approx(one["l0_fraction"], rel=1e-6)  # a float32 mean
    from salm_fast.victims.metrics import perturbation_metrics

    whole_q = perturbation_metrics(whole, expected)
    chunked = api._quality(job, fitted)
    assert chunked["linf_255"] == whole_q["linf_255"]
    for key in ("l0", "psnr_db", "ssim"):
        assert chunked[key] == pytest.approx(whole_q[key], rel=1e-9)


def test_a_streamed_protection_checks_each_batch_against_the_budget(rgb):
    x, y = rgb["train"].to_tensors()
    m = make_method("samplewise", eps=EPS, seed=1, loop=tiny_loop(max_rounds=1), steps=1)
    p = m.fit(x, y, 2)
    assert p.streamed and torch.equal(torch.cat([d for _, d in p.batches()]), p.delta)
    p2 = m.fit(x, y, 2)
    p2._delta_of = lambda idx: torch.full((len(idx), 3, 28, 28), 2 * EPS)  # a broken noise
    with pytest.raises(RuntimeError, match="violates its budget"):
        list(p2.batches())


# ------------------------------------------------------------------------------ compact per-image noise
def test_int8_noise_stores_exactly_the_levels_the_release_keeps(rgb, tmp_path):
    x_u8 = storage_to_nchw(rgb["train"].images)
    x, y = x_u8.float() / 255, torch.from_numpy(rgb["train"].labels[:, 0].copy())
    m = make_method("samplewise", eps=EPS, seed=1, loop=tiny_loop(), steps=3, noise_storage="int8")
    p = m.fit(x_u8, y, 2)
    assert p.info["noise_storage"] == "int8"
    # The trained noise behind the streamed protection.
    buffer = next(c.cell_contents for c in p._delta_of.__closure__ if isinstance(c.cell_contents, SampleWiseNoise)).buffer
    assert buffer.dtype == torch.int8
    assert int(buffer.abs().max()) <= budget_levels(EPS) and bool((buffer != 0).any())
    release = quantize_release(x_u8, p.delta, EPS)
    assert torch.equal(release.to(torch.int16) - x_u8.to(torch.int16), buffer.to(torch.int16))
    assert float(p.delta.abs().max()) <= EPS and 0 <= float((x + p.delta).min()) and float((x + p.delta).max()) <= 1
    # float storage: the default here (a small set), and a checkpoint of one kind does not resume the other
    r = protect(rgb, "samplewise", out=tmp_path / "f", eps=EPS, seed=1, figure=False, audit=False, splits="train",
                loop=tiny_loop(), steps=2)
    assert r.summary["protection"]["noise_storage"] == "float" and r.summary["options"]["noise_storage"] == "auto"
    noise = SampleWiseNoise((4, 1, 2, 2), EPS, storage="int8")
    with pytest.raises(ValueError, match="checkpoint stores float noise, this run int8"):
        noise.load_state_dict(SampleWiseNoise((4, 1, 2, 2), EPS).state_dict())
    with pytest.raises(ValueError, match="noise_storage must be one of"):
        make_method("samplewise", noise_storage="half")


def test_int8_noise_protects_within_the_budget_on_the_stored_bytes(rgb, tmp_path):
    k = 60
    r = protect(rgb, "salm", out=tmp_path / "out", k=k, eps=EPS, seed=2, figure=False, audit=False,
                loop=tiny_loop(), mask_epochs=1, noise="pgd", pgd_steps=2, noise_storage="int8")
    assert r.summary["protection"]["noise_storage"] == "int8"
    for split in r.summary["splits"]:
        assert_stored_budget(rgb[split].images, r.release[split].images, EPS, k)


def test_a_generator_trainer_keeps_its_mask_as_uint8(rgb):
    x, y = rgb["train"].to_tensors()
    noise = GeneratorNoise(NoiseGenerator(3, 2, EPS, width=4), EPS, steps=1)
    trainer = BiLevelTrainer(lambda: build_surrogate("cnn-half", 3, 2, 28), noise, x, y, torch.ones(40, 1, 28, 28),
                             tiny_loop(max_rounds=1))
    assert trainer.mask.dtype == torch.uint8 and isinstance(trainer.x, ImageView)
    trainer.run()
    assert len(trainer.history) == 1


# ------------------------------------------------------------------------------ threads
def test_threads_are_chosen_by_a_measurement_and_restored(monkeypatch, rgb):
    import salm_fast.runtime as runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    model = build_surrogate("cnn-half", 3, 2, 28)
    shape = (128, 3, 28, 28)
    assert runtime.choose_threads(3)[0] == 3 and runtime.choose_threads("auto", model=model)[0] is None
    with pytest.raises(ValueError, match="threads must be auto or an integer"):
        runtime.choose_threads(0)
    speed = {"speedup": 0.3}
    monkeypatch.setattr(runtime, "calibrate_threads", lambda *a, **k: {"one_img_s": 100.0, "all_img_s": 100.0 *
                                                                        speed["speedup"], **speed})
    monkeypatch.setattr(runtime, "_threads_cache", {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert runtime.choose_threads("auto", "cpu", model=model, sample_shape=shape)[0] == 1
        assert runtime.choose_threads("auto", "cuda", model=model, sample_shape=shape)[0] is None
        monkeypatch.setattr(runtime, "_threads_cache", {})
        speed["speedup"] = 1.6
        assert runtime.choose_threads("auto", "cpu", model=model, sample_shape=shape)[0] == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        threads, reason = runtime.choose_threads("auto", "cpu", model=model, sample_shape=shape)
        assert threads is None and "OMP_NUM_THREADS" in reason
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime, "_threads_cache", {})
        speed["speedup"] = 0.3
        x, y = rgb["train"].to_tensors()
        p = make_method("samplewise", eps=EPS, seed=1, loop=tiny_loop(max_rounds=1), steps=1).fit(x, y, 2)
        assert p.info["threads"] == 1 and "1 thread" in p.info["threads_reason"]
        assert torch.get_num_threads() == 2  # the caller's count, restored
    finally:
        torch.set_num_threads(before)


def test_samplewise_pgd_steps_large_batches_in_parts_to_the_same_noise(monkeypatch):
    """Large images step in parts of fewer images (noise.grad_batch): the surrogate is in eval mode and a step
    takes the gradient's sign, so each image's perturbation is the one a whole batch gives."""
    import salm_fast.noise as noise_module
    from salm_fast.noise import LoopView, grad_batch

    assert grad_batch((9, 3, 224, 224), 256) == 20 and grad_batch((9, 3, 64, 64), 256) == 256
    assert grad_batch((9, 1, 28, 28), 256) == 256 and grad_batch((9, 3, 4096, 4096), 256) == 1
    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 28, 28), torch.arange(24) % 2
    mask = (torch.rand(24, 1, 28, 28) < 0.3).to(torch.uint8)
    model = build_surrogate("cnn-half", 3, 2, 28).eval()

    def run():
        noise = SampleWiseNoise(tuple(x.shape), EPS, steps=3, step_size=2 / 255, storage="int8")
        loss = lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb)  # noqa: E731
        noise.optimize(LoopView(x, y, mask, torch.Generator().manual_seed(1), loss, lambda: None))
        return noise.buffer.clone()

    whole = run()
    monkeypatch.setattr(noise_module, "GRAD_ELEMENTS", 5 * 3 * 28 * 28)  # parts of 5 images
    assert torch.equal(run(), whole) and whole.abs().max() > 0
    assert int(whole.abs().max()) <= round(EPS * 255) and not bool(whole[mask.expand_as(whole) == 0].any())


def test_classwise_gradient_of_a_large_batch_is_taken_in_parts(monkeypatch):
    """ClassWiseNoise steps once per batch; a batch of large images sums its gradient over parts (weighted by
    their share): the same gradient and loss, the very same bits when the batch fits in one part."""
    import salm_fast.noise as noise_module
    from salm_fast.noise import ClassWiseNoise, LoopView

    torch.manual_seed(0)
    x, y = torch.rand(23, 3, 28, 28), torch.arange(23) % 3
    mask = (torch.rand(23, 1, 28, 28) < 0.3).float()
    model = build_surrogate("cnn-half", 3, 3, 28).eval()
    loss = lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb)  # noqa: E731
    loop = LoopView(x, y, mask, torch.Generator().manual_seed(1), loss, lambda: None)
    noise = ClassWiseNoise(3, (3, 28, 28), EPS)
    noise.patterns.uniform_(-EPS, EPS)
    p = noise.patterns.detach().requires_grad_(True)
    lo = loss(x + noise_module.ops.masked_linf_project(x, p[y], mask, EPS), y)
    (g_ref,) = torch.autograd.grad(lo, p)
    g_whole, l_whole = noise._pattern_grad(loop, x, y, mask)
    assert torch.equal(g_whole, g_ref) and l_whole == float(lo.detach())
    monkeypatch.setattr(noise_module, "GRAD_ELEMENTS", 5 * 3 * 28 * 28)  # parts of 5, 5, 5, 5 and 3 images
    g_parts, l_parts = noise._pattern_grad(loop, x, y, mask)
    assert torch.allclose(g_parts, g_whole, rtol=1e-3, atol=1e-5 * float(g_whole.abs().max()))  # float rounding
    assert l_parts == pytest.approx(l_whole, rel=1e-5)


def test_an_unmasked_method_keeps_no_per_image_mask():
    """samplewise / classwise / generator perturb every pixel: their mask is one image's ones expanded to N."""
    u8 = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(40) % 2
    loop = BiLevelConfig(max_rounds=1, surrogate_steps=1, batch_size=16)
    protection = make_method("samplewise", eps=EPS, steps=1, loop=loop).fit(ImageView(u8), y, 2)
    mask = protection.mask
    assert mask.shape == (40, 1, 28, 28) and mask.dtype == torch.uint8 and bool((mask == 1).all())
    assert mask.untyped_storage().nbytes() == 28 * 28  # not 40 images' worth
    for sl, d in protection.batches(limit=16):
        x = u8[sl].float() / 255
        assert float(d.abs().max()) <= EPS and float((x + d).min()) >= 0 and float((x + d).max()) <= 1
