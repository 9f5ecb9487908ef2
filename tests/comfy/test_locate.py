"""comfy_locate: which ComfyUI tree the tests use. Runs without ComfyUI."""
from pathlib import Path

import pytest

import comfy_locate

pytestmark = pytest.mark.comfy_not_needed


def make_tree(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "nodes.py").write_text("")
    (root / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    return root


def test_tree_needs_main_nodes_and_comfy(tmp_path):
    assert not comfy_locate.is_comfyui_tree(tmp_path)
    make_tree(tmp_path / "c")
    assert comfy_locate.is_comfyui_tree(tmp_path / "c")
    (tmp_path / "c" / "nodes.py").unlink()
    assert not comfy_locate.is_comfyui_tree(tmp_path / "c")


def test_env_var_wins(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "ComfyUI")
    loc = comfy_locate.locate({"COMFYUI_PATH": str(tree)})
    assert loc.root == tree.resolve() and loc.how == "COMFYUI_PATH" and loc.version == "9.9.9"


def test_invalid_env_var_is_not_replaced_by_another_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_locate, "default_location", lambda: make_tree(tmp_path / "default"))
    loc = comfy_locate.locate({"COMFYUI_PATH": str(tmp_path / "empty")})
    assert loc.root is None and "COMFYUI_PATH" in loc.reason
    assert comfy_locate.find_comfyui({"COMFYUI_PATH": str(tmp_path / "empty")}) is None


def test_default_location_and_none(tmp_path, monkeypatch):
    monkeypatch.setattr(comfy_locate, "REPO_ROOT", tmp_path / "a" / "b" / "repo")
    monkeypatch.setattr(comfy_locate, "default_location", lambda: tmp_path / "nothing")
    loc = comfy_locate.locate({})
    assert loc.root is None and "no ComfyUI tree found" in loc.reason and "COMFYUI_PATH" in loc.reason
    tree = make_tree(tmp_path / "cache" / "ComfyUI")
    monkeypatch.setattr(comfy_locate, "default_location", lambda: tree)
    assert comfy_locate.locate({"COMFYUI_PATH": ""}).root == tree.resolve()


def test_custom_nodes_layout(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "ComfyUI")
    monkeypatch.setattr(comfy_locate, "REPO_ROOT", tree / "custom_nodes" / "casa-lora")
    monkeypatch.setattr(comfy_locate, "default_location", lambda: tmp_path / "nothing")
    loc = comfy_locate.locate({})
    assert loc.root == tree.resolve() and loc.how == "custom_nodes layout"
