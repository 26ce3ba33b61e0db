"""The embedded backend reads a repository the way Triton does."""

import shutil

import pytest

from services.runtime.repository import ModelRepository, RepositoryError


def _copy_model(src_repo, name, dst_repo):
    shutil.copytree(src_repo / name, dst_repo / name)
    return dst_repo / name


def test_demo_repository_specs(repository):
    repo = ModelRepository(repository)
    assert {"dcgan_digits", "cgan_digits"} <= set(repo.models)
    spec = repo["cgan_digits"]
    assert spec.version == "1" and spec.max_batch_size == 16
    assert spec.input("class_label").reshape == ()
    assert spec.parameters["genserve.pipeline"] == "gan"
    assert spec.model_file.name == "model.onnx"


def test_latest_version_is_served(repository, tmp_path):
    model = _copy_model(repository, "dcgan_digits", tmp_path)
    shutil.copytree(model / "1", model / "3")
    (model / "2").mkdir()  # a folder without a model file is not a version
    assert ModelRepository(tmp_path)["dcgan_digits"].version == "3"


def test_specific_version_policy(repository, tmp_path):
    model = _copy_model(repository, "dcgan_digits", tmp_path)
    shutil.copytree(model / "1", model / "2")
    text = (model / "config.pbtxt").read_text()
    text = text.replace("latest {\n    num_versions: 1\n  }", "specific {\n    versions: 1\n  }")
    (model / "config.pbtxt").write_text(text)
    assert ModelRepository(tmp_path)["dcgan_digits"].version == "1"


def test_errors_name_the_problem(repository, tmp_path):
    with pytest.raises(RepositoryError, match="make model-repository"):
        ModelRepository(tmp_path / "missing")
    model = _copy_model(repository, "dcgan_digits", tmp_path)
    model.rename(tmp_path / "renamed")
    with pytest.raises(RepositoryError, match="differs from its folder"):
        ModelRepository(tmp_path)
    shutil.rmtree(tmp_path / "renamed")
    model = _copy_model(repository, "dcgan_digits", tmp_path)
    shutil.rmtree(model / "1")
    with pytest.raises(RepositoryError, match="no version folder"):
        ModelRepository(tmp_path)
