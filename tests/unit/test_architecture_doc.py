"""docs/architecture.md names only what exists: every path, module, class and function in its backticks and its
diagrams (code blocks) is in the tree, so the newcomer's map cannot go stale again."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "blip2_ray"
DOC = ROOT / "docs" / "architecture.md"

# names of other projects the map mentions (Ray, DeepSpeed, transformers, FastAPI, torchvision, OpenAI)
EXTERNAL = {"TorchTrainer", "streaming_split", "map_batches", "JSONResponse", "OpenAI", "FastAPI", "DeepSpeed",
            "RandomResizedCrop", "BlipImageProcessor", "ViT", "ZeRO"}
PATH = re.compile(r"^(?:[\w.]+/)+(?:[\w.]+\.py)?$|^[\w]+\.py$")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_code_name(part: str) -> bool:
    """snake_case with an underscore, or CamelCase (Blip2Stage1, TaskSpec): a name of code, not a word."""
    return "_" in part.strip("_") or part.startswith("_") or bool(re.match(r"^[A-Z][A-Za-z0-9]*[a-z0-9][A-Z]", part))


def definitions() -> tuple[set[str], dict[str, set[str]]]:
    """(every name the package defines or binds: modules, classes, functions, assignments, fields, parameters;
    each class's and module's own names)."""
    names, members = set(), {}
    for path in [*PKG.rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        tree = ast.parse(path.read_text())
        names.add(path.stem)
        if PKG in path.parents:
            names.update(p.name for p in path.relative_to(PKG).parents if p.name)
        mod = members.setdefault(path.stem, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if node in tree.body:
                    mod.add(node.name)
                if isinstance(node, ast.ClassDef):
                    own = members.setdefault(node.name, set())
                    for item in ast.walk(node):
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            own.add(item.name)
                        elif isinstance(item, (ast.Name, ast.Attribute)) and isinstance(item.ctx, ast.Store):
                            own.add(item.id if isinstance(item, ast.Name) else item.attr)
                    for base in node.bases:  # inherited names of the package's own base classes
                        if isinstance(base, ast.Name):
                            own.add(f"<base>{base.id}")
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)  # a key of a dict the code hands around ("config_class")
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
        for node in tree.body:
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(target, ast.Name):
                    mod.add(target.id)
    return names, members


def _has_member(members: dict[str, set[str]], owner: str, name: str, seen=()) -> bool:
    own = members.get(owner, set())
    if name in own:
        return True
    return any(_has_member(members, b[len("<base>"):], name, seen + (owner,))
               for b in own if b.startswith("<base>") and b[len("<base>"):] not in seen)


def references() -> list[str]:
    """The backticked names of the prose and every name-like token of the diagrams."""
    text = DOC.read_text()
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    prose = re.sub(r"```\n.*?```", "", text, flags=re.S)
    refs = re.findall(r"`([^`\n]+)`", prose)
    for block in blocks:
        refs += re.findall(r"(?<![\w/.])(?:\w+/)+\w+\.py|(?<![\w/.])(?:\w+/)+(?=\s)", block)
        refs += [m for m in IDENT.findall(block) if any(_is_code_name(p) for p in m.split("."))
                 and not m.endswith(".py")]
    return refs


def test_every_name_the_map_uses_exists():
    names, members = definitions()
    missing = []
    for ref in references():
        ref = ref.strip().rstrip("(),:").split("(")[0]
        if PATH.match(ref):
            if not ((PKG / ref).exists() or (ROOT / ref).exists()):
                missing.append(ref)
            continue
        if not IDENT.fullmatch(ref):
            continue  # a command line, a URL, a config value: not a name of code
        parts = ref.split(".")
        if parts[0] in EXTERNAL or parts[0] in ("ray", "deepspeed", "torch", "transformers"):
            continue
        if parts[0] == "blip2_ray":
            parts = parts[1:]
        for part in parts:
            if _is_code_name(part) and part not in names:
                missing.append(ref)
        if len(parts) > 1 and parts[0] in members and _is_code_name(parts[-1]) or (
                len(parts) > 1 and parts[0] in members and parts[0][0].isupper()):
            if not _has_member(members, parts[-2], parts[-1]):
                missing.append(ref)
    assert not missing, f"docs/architecture.md names what does not exist: {sorted(set(missing))}"


def test_the_check_catches_a_stale_name(tmp_path, monkeypatch):
    stale = tmp_path / "architecture.md"
    stale.write_text("`micro_batches` in `train/loop.py`, `Blip2Stage2.generate_batch`, `model/hf_format.py`\n"
                     "```\nserve/app.py      BLIP2Ingress._guard\n```\n")
    monkeypatch.setattr(__import__(__name__), "DOC", stale)
    names, members = definitions()
    refs = references()
    assert {"micro_batches", "Blip2Stage2.generate_batch", "model/hf_format.py", "BLIP2Ingress._guard"} <= set(refs)
    assert "micro_batches" not in names and not _has_member(members, "Blip2Stage2", "generate_batch")
    assert not (PKG / "model/hf_format.py").exists() and not _has_member(members, "BLIP2Ingress", "_guard")
