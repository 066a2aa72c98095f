"""scm.metrics: Fréchet distance, the shapes and DINOv2 extractors, torch-fidelity agreement, reference stats."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scm import calibration, extractors, metrics
from scm.fileio import file_fingerprint
from scm.shapes import SHAPES_VERSIONS, generate_shapes


@pytest.fixture(scope="session")
def fast_extractor(tmp_path_factory):
    """A quickly trained shapes extractor (FAST settings; the default artifact trains longer on more images)."""
    path = tmp_path_factory.getbasetemp() / "shapes-features-fast.pt"
    if not path.exists():
        extractors.train_shapes_extractor(path, **FAST)
    return path


# Shared with tests/integration/test_evaluate.py (the same session-wide file).
FAST = dict(steps=300, batch=64, train_images=2048, test_images=512)


@pytest.fixture(scope="module")
def real():
    return torch.from_numpy(generate_shapes(1024)[0])


def _ref(images, weights, cache, **kw):
    return metrics.make_reference("shapes", images, weights_path=weights, cache_dir=cache, **kw)


# ----------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_form():
    # Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s = standard deviations.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-12)
    # Full covariances: symmetric, zero on identical inputs, invariant under a common rotation.
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    d = metrics.frechet_distance(mu1[:1].repeat(6), s1, mu2[:1].repeat(6), s2)
    assert d == pytest.approx(metrics.frechet_distance(mu2[:1].repeat(6), s2, mu1[:1].repeat(6), s1), rel=1e-9)
    assert d == pytest.approx(metrics.frechet_distance(q @ mu1[:1].repeat(6), q @ s1 @ q.T,
                                                       q @ mu2[:1].repeat(6), q @ s2 @ q.T), rel=1e-9)
    assert abs(metrics.frechet_distance(mu1[:1].repeat(6), s1, mu1[:1].repeat(6), s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.frechet_distance(mu1, np.diag(v1), mu2[:4], np.diag(v2[:4]))


def test_summarize():
    s = metrics.summarize([3.0, 1.0, 2.0])
    assert s == {"min": 1.0, "max": 3.0, "mean": 2.0, "sd": pytest.approx(1.0)}
    assert metrics.summarize([4.0]) == {"min": 4.0, "max": 4.0, "mean": 4.0, "sd": None}
    assert metrics.summarize([None]) == {"min": None, "max": None, "mean": None, "sd": None}


# ----------------------------------------------------------------------------
# The shapes extractor


def test_shapes_extractor_artifact_and_uint8_input(fast_extractor):
    net, meta = extractors.load_shapes_extractor(fast_extractor)
    assert meta["test_accuracy"] > 0.95 and meta["steps"] == FAST["steps"]
    stats = extractors.NUM_IMAGE_STATISTICS + extractors.NUM_NOISE_STATISTICS
    assert meta["feature_dim"] == meta["code_dim"] + stats == 149
    assert meta["shapes_version"] == 1 and meta["version"] == extractors.SHAPES_EXTRACTOR_VERSION
    extractors.register_extractors()
    extractors.register_extractors()  # guarded: registering twice would raise in torch-fidelity
    fe = extractors.ShapesFeatureExtractor(extractors.SHAPES_EXTRACTOR, ["penultimate", "logits"],
                                  feature_extractor_weights_path=str(fast_extractor))
    x = torch.from_numpy(generate_shapes(16)[0])
    f, logits = fe(x)
    assert f.shape == (16, 149) and logits.shape == (16, 8)
    # The last 3 features are the noise levels, computed from the pixels (weighted as the artifact says).
    want = meta["noise_feature_weight"] * extractors.noise_statistics(x.float() / 127.5 - 1)
    assert torch.allclose(f[:, -3:], want, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        fe(x.float())
    with pytest.raises(ValueError, match="16x16"):
        fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_fid_of_shapes_against_itself_and_noise(fast_extractor, real, tmp_path):
    same = metrics.compute_metrics(real, _ref(real, fast_extractor, tmp_path), kid_subsets=10)
    halves = metrics.compute_metrics(real[512:], _ref(real[:512], fast_extractor, tmp_path), kid_subsets=10)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = metrics.compute_metrics(noise, _ref(real, fast_extractor, tmp_path), kid_subsets=10)
    assert abs(same["fid"]) < 1e-4 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert 0 < halves["fid"] < 0.05 * far["fid"]
    # Noise images look alike to the network (their features bunch up), so precision need not be 0; recall is.
    assert far["fid"] > 10 and far["recall"] < 0.05 and far["kid"] > 10 * abs(halves["kid"])


def test_calculate_metrics_fid_equals_float64_fd_of_same_features(fast_extractor, real, tmp_path):
    # Generated stand-in: other shapes, slightly blurred (a clearly nonzero FID).
    gen = torch.from_numpy(generate_shapes(512, seed=3)[0])
    gen = F.avg_pool2d(gen.float(), 3, 1, 1).round().to(torch.uint8)
    ref = _ref(real, fast_extractor, tmp_path)
    main = metrics.compute_metrics(gen, ref, kid=False, prc=False)["fid"]
    # Direct: our extractor's features of both sets, statistics and FD in float64.
    direct = metrics.frechet_distance(*metrics.feature_statistics(metrics.extract_features(gen, ref)),
                                      *metrics.feature_statistics(metrics.extract_features(real, ref)))
    assert main > 1 and main == pytest.approx(direct, rel=1e-3)
    # The cached .npz path (imported statistics, FD computed here) agrees too.
    mu, sigma, path = metrics.reference_stats(ref)
    assert path.name == f"{ref.name}.npz" and path.parent == tmp_path
    cached = metrics.compute_metrics(gen, _ref(None, fast_extractor, tmp_path, stats_path=path))
    assert cached["fid"] == pytest.approx(main, rel=1e-3) and cached["kid"] is None


# ----------------------------------------------------------------------------
# Reference statistics: names and files


def test_reference_name_is_a_content_hash(fast_extractor, real, tmp_path):
    name = _ref(real, fast_extractor, tmp_path).name
    assert name.startswith(f"shapes-data1-{extractors.SHAPES_EXTRACTOR}-") and len(name.rsplit("-", 1)[1]) == 12
    assert _ref(real.clone(), fast_extractor, tmp_path).name == name
    changed = real.clone()
    changed[0, 0, 0, 0] ^= 1
    assert _ref(changed, fast_extractor, tmp_path).name != name
    assert _ref(real[:-1], fast_extractor, tmp_path).name != name
    other_weights = tmp_path / "other.pt"
    other_weights.write_bytes(fast_extractor.read_bytes() + b"\0")
    assert _ref(real, other_weights, tmp_path).name != name


def test_ref_stats_npz_round_trip_and_edm2_pkl(tmp_path):
    rng = np.random.default_rng(1)
    mu, a = rng.normal(size=7), rng.normal(size=(7, 7))
    sigma = a @ a.T
    path = metrics.save_ref_stats(tmp_path / "ref.npz", mu, sigma, {"dataset": "x"})
    mu2, sigma2, meta = metrics.load_ref_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta == {"dataset": "x"}
    with np.load(path) as z:  # EDM's reader: plain mu/sigma arrays, float64
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (7, 7)
    # An EDM-written file (mu, sigma only) and an EDM2 pickle import as well.
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert np.allclose(metrics.load_ref_stats(tmp_path / "edm.npz")[0], mu, atol=1e-6)
    with open(tmp_path / "edm2.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": -mu, "sigma": sigma}}, f)
    assert np.array_equal(metrics.load_ref_stats(tmp_path / "edm2.pkl", "fd_dinov2")[0], -mu)
    with pytest.raises(FileNotFoundError):
        metrics.load_ref_stats(tmp_path / "missing.npz")


def test_missing_weights_say_how_to_fetch(real, tmp_path):
    with pytest.raises(extractors.WeightsMissingError, match="fetch-weights inception"):
        metrics.make_reference("cifar10", real, weights_path=tmp_path / "nope.pth", cache_dir=tmp_path)
    with pytest.raises(extractors.WeightsMissingError, match="fetch-weights dinov2"):
        metrics.make_reference("shapes", real, extractors.DINOV2_EXTRACTOR, None, tmp_path)
    with pytest.raises(metrics.NoReferenceError, match="--ref-stats"):
        metrics.make_reference("imagenet512", None, weights_path=tmp_path / "x", cache_dir=tmp_path)


# ----------------------------------------------------------------------------
# FD_DINOv2 preprocessing, with a stand-in network that reports what it receives


class _StandIn(torch.nn.Module):
    """Features = per-channel mean and std of its input, then its height and width (traceable)."""

    def forward(self, x):
        h = torch.ones_like(x[:, 0, :, 0]).sum(-1, keepdim=True)
        w = torch.ones_like(x[:, 0, 0, :]).sum(-1, keepdim=True)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), h, w], dim=1)


@pytest.fixture(scope="module")
def standin_file(tmp_path_factory):
    import warnings

    path = tmp_path_factory.mktemp("dino") / "standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_StandIn(), torch.zeros(2, 3, 224, 224)).save(str(path))
    return path


def test_dinov2_extractor_resizes_and_normalizes(standin_file):
    extractors.register_extractors()
    from torch_fidelity.utils import create_feature_extractor

    fe = create_feature_extractor(extractors.DINOV2_EXTRACTOR, ["dinov2"], cuda=False,
                                  feature_extractor_weights_path=str(standin_file))
    # Constant images: bicubic resizing keeps the constant, so the features are known exactly.
    values = torch.tensor([0, 64, 200], dtype=torch.uint8)
    x = values[:, None, None, None].expand(3, 3, 16, 16).contiguous()
    (f,) = fe(x)
    mean, std = torch.tensor(extractors.IMAGENET_MEAN), torch.tensor(extractors.IMAGENET_STD)
    want = (values[:, None].float() / 255 - mean) / std
    assert torch.allclose(f[:, :3], want, atol=1e-5) and torch.all(f[:, 3:6] < 1e-4)
    assert torch.equal(f[:, 6:], torch.full((3, 2), 224.0))
    # Random images: EDM2's recipe (bicubic antialiased 224, /255, ImageNet mean/std), computed here.
    y = torch.from_numpy(generate_shapes(4)[0])
    r = F.interpolate(y.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    r = (r - mean[None, :, None, None]) / std[None, :, None, None]
    (g,) = fe(y)
    assert torch.allclose(g[:, :3], r.mean((2, 3)), atol=1e-5) and torch.allclose(g[:, 3:6], r.std((2, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        fe(y.float())


def test_fd_dinov2_through_calculate_metrics(standin_file, real, tmp_path):
    ref = metrics.make_reference("shapes", real[:128], extractors.DINOV2_EXTRACTOR, standin_file, tmp_path)
    assert ref.name.startswith(f"shapes-{extractors.DINOV2_EXTRACTOR}-")
    same = metrics.compute_metrics(real[:128], ref, kid=False, prc=False)["fid"]
    dark = metrics.compute_metrics(real[128:256] // 2, ref, kid=False, prc=False)["fid"]
    assert abs(same) < 1e-6 and dark > 0.1


def test_shapes_extractor_training_is_deterministic(tmp_path):
    kw = dict(steps=10, batch=32, train_images=256, test_images=64)
    a = extractors.train_shapes_extractor(tmp_path / "a.pt", **kw)
    b = extractors.train_shapes_extractor(tmp_path / "b.pt", **kw)
    assert a["test_accuracy"] == b["test_accuracy"] and a["final_ce"] == b["final_ce"]
    assert a["final_mse"] == b["final_mse"]
    sa, sb = (torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("a.pt", "b.pt"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert file_fingerprint(tmp_path / "a.pt") == file_fingerprint(tmp_path / "b.pt")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])  # restored


# ----------------------------------------------------------------------------
# Extractor versions: one network per renderer version, named after both


@pytest.mark.parametrize("version", sorted(SHAPES_VERSIONS))
def test_extractor_per_renderer_version(version, tmp_path):
    path = extractors.shapes_extractor_path(version, tmp_path)
    assert path.name == f"shapes-features-v{extractors.SHAPES_EXTRACTOR_VERSION}-data{version}.pt"
    meta = extractors.train_shapes_extractor(path, version, steps=2, batch=8, train_images=64, test_images=16)
    assert meta["shapes_version"] == version and extractors.load_shapes_extractor(path, version)[1] == {
        k: v for k, v in meta.items() if k not in ("train_seconds", "job_seconds")}
    with pytest.raises(ValueError, match=f"trained on data.shapes_version {version}"):
        extractors.load_shapes_extractor(path, version + 1)
    real = torch.from_numpy(generate_shapes(32, version=version)[0])
    ref = metrics.make_reference("shapes", real, weights_path=path, cache_dir=tmp_path, shapes_version=version)
    assert ref.name.startswith(f"shapes-data{version}-{extractors.SHAPES_EXTRACTOR}-")
    with pytest.raises(ValueError, match="--extractor-weights"):  # an extractor of another renderer
        metrics.make_reference("shapes", real, weights_path=path, cache_dir=tmp_path, shapes_version=version + 1)


# ----------------------------------------------------------------------------
# Class accuracy and the Fréchet joint distance


def test_class_accuracy_is_one_on_real_images_and_chance_on_noise(fast_extractor, tmp_path):
    # Real images of a seed no extractor or reference saw, with the labels they were drawn with.
    x, y = (torch.from_numpy(a) for a in generate_shapes(2048, seed=77))
    ref = _ref(x[:64], fast_extractor, tmp_path)
    assert metrics.class_accuracy(x, y, ref) >= 0.98
    # Uniform noise against uniform labels: Binomial(2048, 1/8) / 2048 whatever the classifier says.
    noise = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 8, (2048,), generator=torch.Generator().manual_seed(2))
    assert abs(metrics.class_accuracy(noise, labels, ref) - 1 / 8) < 4 * math.sqrt(1 / 8 * 7 / 8 / 2048)
    # compute_metrics reports it (and FJD) only when given the conditioning labels.
    m = metrics.compute_metrics(x[:256], metrics.make_reference("shapes", x[256:], weights_path=fast_extractor,
                                                                cache_dir=tmp_path, labels=y[256:]),
                                kid=False, prc=False, labels=y[:256])
    assert m["class_accuracy"] == pytest.approx(float((metrics.extract_features(x[:256], ref, layer="logits")
                                                       .argmax(1) == y[:256]).double().mean()))
    assert m["fjd"] >= m["fid"] - 1e-6
    assert metrics.compute_metrics(x[:256], ref, kid=False, prc=False)["class_accuracy"] is None


def test_frechet_joint_distance_bounds_and_label_swaps():
    rng = np.random.default_rng(0)
    n, d, k = 4000, 6, 4
    y = torch.from_numpy(rng.integers(0, k, n))
    centres = rng.normal(size=(k, d)) * 2
    f = centres[y.numpy()] + rng.normal(size=(n, d))
    y2 = torch.from_numpy(rng.integers(0, k, n))
    f2 = centres[y2.numpy()] + rng.normal(size=(n, d))
    alpha = math.sqrt((f2**2).sum(1).mean())
    same = metrics.frechet_joint_distance(f, y, f2, y2, k)
    swapped = metrics.frechet_joint_distance(f, (y + 1) % k, f2, y2, k)
    # Projections do not increase the 2-Wasserstein distance of Gaussians: FJD >= FD of either marginal.
    fd = metrics.frechet_distance(*metrics.feature_statistics(f), *metrics.feature_statistics(f2))
    assert same >= fd - 1e-9 and swapped >= fd - 1e-9
    # The marginals are equal up to sampling either way; only the pairing differs.
    assert same < 0.5 and swapped > 20 * same and swapped > 1
    assert abs(metrics.frechet_joint_distance(f2, y2, f2, y2, k)) < 1e-6 * alpha**2


# ----------------------------------------------------------------------------
# Degradations used by the calibration: checked against what they must do


def test_degradations():
    x = torch.from_numpy(generate_shapes(64, seed=5)[0])
    flat = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    assert torch.equal(calibration.gaussian_blur(flat, 1.0), flat)  # a blur keeps constants
    impulse = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    impulse[..., 8, 8] = 255
    b = calibration.gaussian_blur(impulse, 1.0).double()
    g = np.exp(-np.arange(-3, 4) ** 2 / 2)
    g = g / g.sum()
    assert b[0, 0, 8, 5:12].numpy() == pytest.approx(np.round(255 * g[3] * g), abs=0.51)  # the separable kernel
    noisy = calibration.gaussian_noise(flat, 0.1, seed=3).double() / 255
    assert noisy.std().item() == pytest.approx(0.1, rel=0.1)
    assert noisy.mean().item() == pytest.approx(100 / 255, abs=0.01)
    shifted = calibration.colour_shift(flat, 0.1).double() - 100  # +-0.1 of the range = +-25.5 levels, rounded
    assert (shifted[:, 0] - 25.5).abs().max() <= 0.5 and (shifted[:, 2] + 25.5).abs().max() <= 0.5
    assert torch.equal(calibration.colour_shift(flat, 0.1)[:, 1], flat[:, 1])
    # A plane with a square on it: the background alone is the plane again, the flat background its mean.
    v, u = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    plane = (0.5 + 0.2 * u - 0.1 * v).double()
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:9, 6:12] = True
    img = calibration._uint8(torch.where(mask, 0.95, plane).expand(1, 3, 16, 16))
    assert (calibration.background_only(img, mask).double() - (plane * 255).round()).abs().max() <= 1
    fb = calibration.flat_background(img, mask)
    assert torch.equal(fb[mask.expand_as(fb)], img[mask.expand_as(img)])
    assert fb[~mask.expand_as(fb)].unique().numel() == 1
    # The renderer's shapes: every image has shape and background pixels.
    images, labels, q = generate_shapes(64, seed=5, return_factors=True)
    m = calibration.shape_mask(q, labels, 16, 1)
    assert torch.all(m.sum((1, 2, 3)) > 4) and torch.all((~m).sum((1, 2, 3)) > 16)
    y = torch.arange(16) % 8
    assert torch.all(calibration.wrong_labels(y, 8) != y) and calibration.wrong_labels(y, 8).max() < 8
    assert x.dtype == torch.uint8


# ----------------------------------------------------------------------------
# Calibration: the floor is real vs real; every degradation a person rates as bad scores above it


def test_noise_statistics_closed_form():
    # A flat grey image plus Gaussian noise of sd sigma (rounded to uint8): the 4-neighbour Laplacian of the
    # noise is N(0, 20 (sigma^2 + q^2 / 12)) in grey levels (q = 1 level), so the 10% quantile of its absolute
    # value is 0.1257 sqrt(20) sd (the half-normal's 10% point, erf(z / sqrt 2) = 0.1 at z = 0.12566).
    flat = torch.full((256, 3, 16, 16), 128, dtype=torch.uint8)
    assert torch.all(extractors.noise_statistics(flat.float() / 127.5 - 1) == 0)
    for sigma in (0.02, 0.05, 0.1):
        x = calibration.gaussian_noise(flat, sigma, seed=1).float() / 127.5 - 1
        want = 0.12566 * math.sqrt(20 * ((sigma * 255) ** 2 + 1 / 12))
        assert extractors.noise_statistics(x).expm1().mean().item() == pytest.approx(want, rel=0.03)
    # Real shapes of renderer version 2 are flat away from their edges: noise level 0 on every image.
    real2 = torch.from_numpy(generate_shapes(256, version=2)[0]).float() / 127.5 - 1
    assert extractors.noise_statistics(real2).abs().max().item() < 1e-3


def test_calibration_fid_rises_with_every_degradation(fast_extractor, tmp_path):
    rows = {r["case"]: r for r in calibration.calibrate(fast_extractor, num=512, ref_images=2048, seed_sets=2,
                                                cache_dir=tmp_path)}
    fid = lambda case: rows[case]["fid_mean"]
    floor = fid("real, disjoint seeds (the floor)")
    floor_sd = rows["real, disjoint seeds (the floor)"]["fid_sd"]
    assert rows["real, disjoint seeds (the floor)"]["class_accuracy_mean"] >= 0.97  # the quickly trained network
    # Pixel noise: each level clearly above the one before (by more than 2 sd of the floor over seed sets,
    # and by 20% of the floor, so a near-zero sd cannot make a tie pass), the first clearly above the floor.
    noise = [floor] + [fid(f"Gaussian noise sigma={s}") for s in calibration.NOISE_SIGMAS]
    steps = np.diff(noise)
    assert np.all(steps > 2 * floor_sd) and np.all(steps > 0.2 * floor), (noise, floor_sd)
    assert noise[1] > 1.5 * floor and noise[4] > 4 * floor
    blur = [fid(f"Gaussian blur sigma={s} px") for s in calibration.BLUR_SIGMAS]
    assert blur == sorted(blur) and blur[0] > 1.5 * floor and blur[1] > 8 * floor
    shift = [fid(f"colour shift +-{d} (R+, B-)") for d in calibration.COLOUR_SHIFTS]
    assert shift == sorted(shift) and shift[0] > 1.5 * floor and shift[1] > 3 * floor
    assert fid("blank background (grey)") > 3 * floor
    assert min(fid("background only (no shape)"), fid("uniform noise")) > 30 * floor
    # Wrong classes: the unconditional FID cannot see them (same images); FJD and class accuracy do.
    wrong = rows["wrong class (labels swapped)"]
    assert wrong["fid_mean"] == pytest.approx(floor, rel=1e-6)
    assert wrong["fjd_mean"] > 10 * rows["real, disjoint seeds (the floor)"]["fjd_mean"]
    assert wrong["class_accuracy_mean"] < 0.02
    assert abs(rows["uniform noise"]["class_accuracy_mean"] - 1 / 8) < 0.06
    table = calibration.markdown_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 2 and "| wrong class (labels swapped) |" in table


def test_build_extractor_writes_its_record(tmp_path):
    from scm.cli import main

    out, record = tmp_path / "x.pt", tmp_path / "x.json"
    assert main(["data", "build-extractor", "--shapes-version", "2", "--steps", "2", "--out", str(out),
                 "--record", str(record)]) == 0
    meta = json.loads(record.read_text())
    assert meta["steps"] == 2 and meta["shapes_version"] == 2
    assert 0 < meta["train_seconds"] <= meta["job_seconds"]  # the loop is part of the job
    assert extractors.load_shapes_extractor(out, 2)[1]["test_accuracy"] == meta["test_accuracy"]
    # an artifact already there is reused: its record says so, with no training time
    record.unlink()
    assert main(["data", "build-extractor", "--shapes-version", "2", "--out", str(out), "--record", str(record)]) == 0
    again = json.loads(record.read_text())
    assert again["reused"] and again["train_seconds"] == 0.0 and again["test_accuracy"] == meta["test_accuracy"]
