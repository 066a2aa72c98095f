"""scm.metrics: Fréchet distance, the shapes and DINOv2 extractors, torch-fidelity agreement, reference stats."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scm import metrics as M
from scm.data import generate_shapes


@pytest.fixture(scope="session")
def fast_extractor(tmp_path_factory):
    """A quickly trained shapes extractor (100 steps, ~3 s; the default artifact trains 500 on 8192 images)."""
    path = tmp_path_factory.getbasetemp() / "shapes-features-fast.pt"
    if not path.exists():
        M.train_shapes_extractor(path, steps=100, batch=64, train_images=2048, test_images=512)
    return path


@pytest.fixture(scope="module")
def real():
    return torch.from_numpy(generate_shapes(1024)[0])


def _ref(images, weights, cache, **kw):
    return M.make_reference("shapes", images, weights_path=weights, cache_dir=cache, **kw)


# ----------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_form():
    # Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s = standard deviations.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-12)
    # Full covariances: symmetric, zero on identical inputs, invariant under a common rotation.
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    d = M.frechet_distance(mu1[:1].repeat(6), s1, mu2[:1].repeat(6), s2)
    assert d == pytest.approx(M.frechet_distance(mu2[:1].repeat(6), s2, mu1[:1].repeat(6), s1), rel=1e-9)
    assert d == pytest.approx(M.frechet_distance(q @ mu1[:1].repeat(6), q @ s1 @ q.T,
                                                 q @ mu2[:1].repeat(6), q @ s2 @ q.T), rel=1e-9)
    assert abs(M.frechet_distance(mu1[:1].repeat(6), s1, mu1[:1].repeat(6), s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(ValueError, match="shapes differ"):
        M.frechet_distance(mu1, np.diag(v1), mu2[:4], np.diag(v2[:4]))


def test_summarize():
    s = M.summarize([3.0, 1.0, 2.0])
    assert s == {"min": 1.0, "mean": 2.0, "sd": pytest.approx(1.0)}
    assert M.summarize([4.0]) == {"min": 4.0, "mean": 4.0, "sd": None}
    assert M.summarize([None]) == {"min": None, "mean": None, "sd": None}


# ----------------------------------------------------------------------------
# The shapes extractor


def test_shapes_extractor_artifact_and_uint8_input(fast_extractor):
    net, meta = M.load_shapes_extractor(fast_extractor)
    assert meta["test_accuracy"] > 0.5 and meta["feature_dim"] == 128 and meta["steps"] == 100
    M.register_extractors()
    M.register_extractors()  # guarded: registering twice would raise in torch-fidelity
    fe = M.ShapesFeatureExtractor(M.SHAPES_EXTRACTOR, ["penultimate", "logits"],
                                  feature_extractor_weights_path=str(fast_extractor))
    x = torch.from_numpy(generate_shapes(16)[0])
    f, logits = fe(x)
    assert f.shape == (16, 128) and logits.shape == (16, 8)
    with pytest.raises(ValueError, match="uint8"):
        fe(x.float())
    with pytest.raises(ValueError, match="16x16"):
        fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_fid_of_shapes_against_itself_and_noise(fast_extractor, real, tmp_path):
    same = M.compute_metrics(real, _ref(real, fast_extractor, tmp_path), kid_subsets=10)
    halves = M.compute_metrics(real[512:], _ref(real[:512], fast_extractor, tmp_path), kid_subsets=10)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = M.compute_metrics(noise, _ref(real, fast_extractor, tmp_path), kid_subsets=10)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert 0 < halves["fid"] < 0.01 * far["fid"]
    assert far["fid"] > 10 and far["precision"] == 0.0 and far["kid"] > 10 * abs(halves["kid"])


def test_calculate_metrics_fid_equals_float64_fd_of_same_features(fast_extractor, real, tmp_path):
    # Generated stand-in: other shapes, slightly blurred (a clearly nonzero FID).
    gen = torch.from_numpy(generate_shapes(512, seed=3)[0])
    gen = F.avg_pool2d(gen.float(), 3, 1, 1).round().to(torch.uint8)
    ref = _ref(real, fast_extractor, tmp_path)
    main = M.compute_metrics(gen, ref, kid=False, prc=False)["fid"]
    # Direct: our extractor's features of both sets, statistics and FD in float64.
    direct = M.frechet_distance(*M.feature_statistics(M.extract_features(gen, ref)),
                                *M.feature_statistics(M.extract_features(real, ref)))
    assert main > 1 and main == pytest.approx(direct, rel=1e-3)
    # The cached .npz path (imported statistics, FD computed here) agrees too.
    mu, sigma, path = M.reference_stats(ref)
    assert path.name == f"{ref.name}.npz" and path.parent == tmp_path
    cached = M.compute_metrics(gen, _ref(None, fast_extractor, tmp_path, stats_path=path))
    assert cached["fid"] == pytest.approx(main, rel=1e-3) and cached["kid"] is None


# ----------------------------------------------------------------------------
# Reference statistics: names and files


def test_reference_name_is_a_content_hash(fast_extractor, real, tmp_path):
    name = _ref(real, fast_extractor, tmp_path).name
    assert name.startswith(f"shapes-{M.SHAPES_EXTRACTOR}-") and len(name.rsplit("-", 1)[1]) == 12
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
    path = M.save_ref_stats(tmp_path / "ref.npz", mu, sigma, {"dataset": "x"})
    mu2, sigma2, meta = M.load_ref_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta == {"dataset": "x"}
    with np.load(path) as z:  # EDM's reader: plain mu/sigma arrays, float64
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (7, 7)
    # An EDM-written file (mu, sigma only) and an EDM2 pickle import as well.
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert np.allclose(M.load_ref_stats(tmp_path / "edm.npz")[0], mu, atol=1e-6)
    with open(tmp_path / "edm2.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": -mu, "sigma": sigma}}, f)
    assert np.array_equal(M.load_ref_stats(tmp_path / "edm2.pkl", "fd_dinov2")[0], -mu)
    with pytest.raises(FileNotFoundError):
        M.load_ref_stats(tmp_path / "missing.npz")


def test_missing_weights_say_how_to_fetch(real, tmp_path):
    with pytest.raises(M.WeightsMissingError, match="fetch-weights inception"):
        M.make_reference("cifar10", real, weights_path=tmp_path / "nope.pth", cache_dir=tmp_path)
    with pytest.raises(M.WeightsMissingError, match="fetch-weights dinov2"):
        M.make_reference("shapes", real, M.DINOV2_EXTRACTOR, None, tmp_path)
    with pytest.raises(M.NoReferenceError, match="--ref-stats"):
        M.make_reference("imagenet512", None, weights_path=tmp_path / "x", cache_dir=tmp_path)


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
    M.register_extractors()
    from torch_fidelity.utils import create_feature_extractor

    fe = create_feature_extractor(M.DINOV2_EXTRACTOR, ["dinov2"], cuda=False,
                                  feature_extractor_weights_path=str(standin_file))
    # Constant images: bicubic resizing keeps the constant, so the features are known exactly.
    values = torch.tensor([0, 64, 200], dtype=torch.uint8)
    x = values[:, None, None, None].expand(3, 3, 16, 16).contiguous()
    (f,) = fe(x)
    mean, std = torch.tensor(M.IMAGENET_MEAN), torch.tensor(M.IMAGENET_STD)
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
    ref = M.make_reference("shapes", real[:128], M.DINOV2_EXTRACTOR, standin_file, tmp_path)
    assert ref.name.startswith(f"shapes-{M.DINOV2_EXTRACTOR}-")
    same = M.compute_metrics(real[:128], ref, kid=False, prc=False)["fid"]
    dark = M.compute_metrics(real[128:256] // 2, ref, kid=False, prc=False)["fid"]
    assert abs(same) < 1e-6 and dark > 0.1


def test_shapes_extractor_training_is_deterministic(tmp_path):
    kw = dict(steps=10, batch=32, train_images=256, test_images=64)
    a = M.train_shapes_extractor(tmp_path / "a.pt", **kw)
    b = M.train_shapes_extractor(tmp_path / "b.pt", **kw)
    assert a["test_accuracy"] == b["test_accuracy"] and a["final_loss"] == b["final_loss"]
    sa, sb = (torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("a.pt", "b.pt"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert M.file_fingerprint(tmp_path / "a.pt") == M.file_fingerprint(tmp_path / "b.pt")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])  # restored
