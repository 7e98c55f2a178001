"""The house: imports go one way (commands -> lesson -> support), and the README's loop runs as written."""
import ast
import csv
import json
import re
import shlex
import threading

import numpy as np
from PIL import Image
from torchvision.models import ResNet34_Weights

import assess
import label
import predict
import train
from conftest import HERE
from support import synthetic

LESSON = {"data", "loss", "resnet_unet", "model", "train", "predict"}
COMMANDS = {"label", "assess"}


def imported(path):
    """The project's modules a file imports, at any depth of it (support.x as support.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    ours = LESSON | COMMANDS | {"support", "tools", "test_all", "conftest"}
    return {n for n in names if n.split(".")[0] in ours}


def test_imports_go_one_way_commands_then_lesson_then_support():
    files = {p.stem if p.parent == HERE else f"{p.parent.name}.{p.stem}": p
             for p in [*HERE.glob("*.py"), *(HERE / "support").glob("*.py"), *(HERE / "tools").glob("*.py")]
             if not p.name.startswith("test_") and p.name != "conftest.py"}
    graph = {m: {n for n in imported(p) if n in files or n.rsplit(".", 1)[0] in files}
             for m, p in files.items()}
    graph = {m: {n if n in files else n.rsplit(".", 1)[0] for n in deps} - {m} for m, deps in graph.items()}
    for m, deps in graph.items():
        if m.startswith("support"):
            assert not {d for d in deps if not d.startswith("support")}, m  # support imports support only
        if m in LESSON:
            assert not deps & (COMMANDS | {d for d in deps if d.startswith("tools")}), m
        assert not any(d.split(".")[0] in ("test_all", "conftest") for d in imported(files[m])), m
    seen, path = set(), []

    def visit(m):  # depth first: a module met again on the path is a circle
        assert m not in path, " -> ".join(path + [m])
        if m not in seen:
            seen.add(m)
            path.append(m)
            for d in graph[m]:
                visit(d)
            path.pop()

    for m in graph:
        visit(m)
    top = {p.name for p in HERE.iterdir() if p.suffix == ".py"}
    assert top == {f"{m}.py" for m in LESSON | COMMANDS} | {"test_all.py", "conftest.py"}  # the card's files


def test_the_readme_gives_each_lesson_file_its_line_count():
    rows = re.findall(r"^\| \d \| `(\w+\.py)` \| (\d+) \|", (HERE / "README.md").read_text(), re.M)
    assert {f"{m}.py" for m in LESSON} == {name for name, _ in rows}
    assert all(len((HERE / name).read_text().splitlines()) == int(n) for name, n in rows), rows


def loop_commands():
    """The commands of the README's loop, as written."""
    text = (HERE / "README.md").read_text()
    block = text.split("## Your own images and clicks", 1)[1].split("```", 2)[1]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("python ")]


def test_the_readme_loop_runs_as_written_on_a_few_images(tmp_path, monkeypatch, capsys):
    """Four photos with no masks, a person simulated from the scenes' truth: click, train, map, sample
    and estimate, fill in the suggestions, train again, map and estimate again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ResNet34_Weights.IMAGENET1K_V1, "get_state_dict",  # no network: random init
                        lambda **k: (_ for _ in ()).throw(OSError("no network")))
    (tmp_path / "my_images").mkdir()
    rng, truth = np.random.default_rng(0), {}
    for name in "abcd":
        image, classes = synthetic.synthetic_scene(rng, 256, 256)  # classes in the README's order
        Image.fromarray(image).save(tmp_path / "my_images" / f"{name}.png")
        truth[f"{name}.png"] = classes
    names = ["Water", "Land", "Road", "Building", "Vegetation"]
    commands = loop_commands()
    assert [c[1] for c in commands][:4] == ["label.py", "train.py", "predict.py", "assess.py"]
    for argv in commands:
        script, args = argv[1], argv[2:]
        if script == "label.py":
            label_as_a_person(args, truth, names)
        else:
            main = {"train.py": train.main, "predict.py": predict.main, "assess.py": assess.main}[script]
            code = main(args)  # train.main returns the model
            assert not isinstance(code, int) or code == 0, argv
    for maps in ("maps/first", "maps/second"):
        accuracy = json.loads((tmp_path / maps / "accuracy.json").read_text())
        assert 0 <= accuracy["overall_accuracy"]["estimate"] <= 1 and accuracy["points"] == 600
    second = (tmp_path / "runs" / "second" / "points.csv").read_text().splitlines()
    assert len(second) > len((tmp_path / "runs" / "first" / "points.csv").read_text().splitlines())


def label_as_a_person(args, truth, names):
    """label.py started with `args`, its clicks made as a person would: new clicks on each image, the
    class of each suggestion, the class of each sample point (the last in the file, as a spreadsheet)."""
    server = label.serve(label.get_args(args + ["--port", "0"]))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown: 50 ms
    try:
        labels, file = server.labels, server.labels.file
        rows = list(csv.DictReader(open(file))) if file.exists() else []
        if not rows:  # new clicks: 12 an image
            rng = np.random.default_rng(1)
            todo = [(n, int(x), int(y)) for n in truth for x, y in rng.integers(0, 256, (12, 2))]
        else:
            todo = [(r["image"].split("/")[-1], int(r["x"]), int(r["y"])) for r in rows]
        if "sample" in rows[0] if rows else False:
            todo = todo[:1]  # one through the page, in blind mode; the rest as a spreadsheet writes them
        for image, x, y in todo:
            labels.change({"image": image, "x": x, "y": y, "class": names[truth[image][y, x]]})
        if rows and "sample" in rows[0]:
            for r in rows:
                r["class"] = names[truth[r["image"].split("/")[-1]][int(r["y"]), int(r["x"])]]
            with open(file, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    finally:
        server.shutdown()
        server.server_close()
