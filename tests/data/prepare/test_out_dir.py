"""Tests for wf_data.data.prepare.out_dir: the swap of a finished build into --out, and recovery."""

import pytest

from wf_data.data.prepare import out_dir as out_dir_lib


def _dataset(path, marker):
    path.mkdir()
    (path / "manifest.json").write_text(marker)
    (path / "data-00000-of-00001.array_record").write_text(marker)
    return path


@pytest.mark.parametrize("existing", ["absent", "empty", "dataset"])
def test_swap_in(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "empty":
        out.mkdir()
    elif existing == "dataset":
        _dataset(out, "old")
    build = _dataset(out_dir_lib.build_dir(out), "new")
    out_dir_lib.swap_in(build, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no build, no replaced


def test_swap_without_exchange_and_recovery(tmp_path, monkeypatch):
    out = _dataset(tmp_path / "out", "old")
    monkeypatch.setattr(out_dir_lib, "_exchange", lambda a, b: False)  # as on macOS
    out_dir_lib.swap_in(_dataset(out_dir_lib.build_dir(out), "new"), out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dataset_files_only(tmp_path):
    out = tmp_path / "out"
    assert out_dir_lib.dataset_files_only(out) is False
    out.mkdir()
    assert out_dir_lib.dataset_files_only(out) is False
    _dataset(out / ".wf-prepare", "work")
    (out / "lengths.npy").write_bytes(b"")
    assert out_dir_lib.dataset_files_only(out) is True
    (out / "README.md").write_text("mine")
    with pytest.raises(out_dir_lib.OutDirError, match=r"holds files prepare did not write"):
        out_dir_lib.dataset_files_only(out)
    with pytest.raises(out_dir_lib.OutDirError, match="not a directory"):
        out_dir_lib.dataset_files_only(out / "README.md")


def test_prepare_into_a_link_replaces_its_target(tmp_path):
    from wf_data.data.prepare import prepare

    (tmp_path / "in.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "data")
    prepare(tmp_path / "in.jsonl", tmp_path / "out", progress=False)
    prepare(tmp_path / "in.jsonl", tmp_path / "out", progress=False, overwrite=True, name="x")
    assert (tmp_path / "out").is_symlink()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["data"]
    assert (tmp_path / "out" / "x-00000-of-00001.array_record").exists()
