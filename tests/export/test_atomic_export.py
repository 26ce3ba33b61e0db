"""A folder export writes the repository atomically and says what it verified
(export.staging, export.diffusers_folder.export_folder)."""

import json

import pytest

from export.diffusers_folder import export_folder
from export.onnx_export import ParityError
from export.staging import REPORT_FILE
from export.verification import GraphOptions
from tests.fixtures.vae_folder import build_random_vae_folder

pytestmark = pytest.mark.slow


def _snapshot(repository):
    return {str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*")) if p.is_file()}


def test_a_failing_export_leaves_the_repository_as_it_was(tmp_path, monkeypatch):
    import export.core as core

    repository = tmp_path / "repo"
    export_folder(build_random_vae_folder(tmp_path / "a", seed=0), repository, "v", family="vae",
                  progress=lambda _: None)
    before = _snapshot(repository)
    assert {"v_vae_encoder/1/model.onnx", "v_vae_decoder/config.pbtxt", REPORT_FILE} <= set(before)

    real = core.verify_onnx

    def fail_on_the_decoder(module, path, inputs, **kwargs):
        if "vae_decoder" in str(path):
            raise ParityError(f"{path}: output differs")
        return real(module, path, inputs, **kwargs)

    monkeypatch.setattr(core, "verify_onnx", fail_on_the_decoder)
    # Another VAE under the same name: its encoder exports and verifies, its decoder fails.
    with pytest.raises(ParityError):
        export_folder(build_random_vae_folder(tmp_path / "b", seed=1), repository, "v", family="vae",
                      progress=lambda _: None)
    assert _snapshot(repository) == before  # not the new encoder, not a half-written decoder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "repo"]  # no staging folder left


def test_a_successful_export_replaces_its_models_and_reports_them(tmp_path):
    repository = tmp_path / "repo"
    (repository / "other_model" / "1").mkdir(parents=True)  # another pipeline's model stays
    (repository / "other_model" / "config.pbtxt").write_text('name: "other_model"')
    export_folder(build_random_vae_folder(tmp_path / "a", seed=0), repository, "v", family="vae",
                  progress=lambda _: None)
    first = (repository / "v_vae_decoder" / "1" / "model.onnx").read_bytes()
    _, reports = export_folder(build_random_vae_folder(tmp_path / "b", seed=1), repository, "v", family="vae",
                               progress=lambda _: None)
    assert (repository / "v_vae_decoder" / "1" / "model.onnx").read_bytes() != first
    assert (repository / "other_model" / "config.pbtxt").exists()
    assert all(r.onnx_path.is_relative_to(repository) and r.onnx_path.exists() for r in reports)

    report = json.loads((repository / REPORT_FILE).read_text())["v"]
    assert report["family"] == "vae" and report["peak_rss_gib"] > 0
    rows = {row["component"]: row for row in report["components"]}
    assert set(rows) == {"v_vae_encoder", "v_vae_decoder"}
    for row in rows.values():
        # The VAE's native grid is 8 x 8 latents: the dynamic-axes check at a small non-square
        # grid, then twice the size at batch 3 (tiny activations).
        assert "batch 3 at grid 2x3 (dynamic axes" in row["verified"]
        assert "batch 3 at grid 16x16 (twice the size" in row["verified"]
        assert 0 <= row["max_abs_error"] < 1e-3 and row["wall_s"] > 0 and row["peak_rss_gib"] > 0


def test_verify_off_and_small_say_so(tmp_path):
    repository = tmp_path / "repo"
    _, reports = export_folder(build_random_vae_folder(tmp_path / "a"), repository, "v", family="vae",
                               progress=lambda _: None, graphs=GraphOptions(verify="off"))
    assert all(r.verified == "not verified: verification off (--verify off)" for r in reports)
    _, reports = export_folder(build_random_vae_folder(tmp_path / "a"), repository, "v", family="vae",
                               progress=lambda _: None, graphs=GraphOptions(verify="small"))
    assert all("dynamic axes" in r.verified and "served size" not in r.verified and "twice" not in r.verified
               for r in reports)
