"""editlab lab without a browser: each tab's shown command line, run by the CLI in a fresh process, writes the
same bytes as the files the tab shows; bad input gives the CLI's one-line message and the next run still works.

The tabs run on the bundled toy model with few steps (a run takes a second or two).
"""

import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the lab extra is not installed: pip install -e \".[lab]\"")

from editing.cli import main  # noqa: E402
from editing.lab import app, runner, tab_generate, tab_p2p, tab_real_image  # noqa: E402
from editing.lab.context import LabContext  # noqa: E402
from ldm.toy.shapes import render, spec_from_caption  # noqa: E402

SOURCE = "a red circle on a blue background"


@pytest.fixture
def lab(tmp_path):
    return LabContext(folder=tmp_path / "lab", threads=1)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A rendered toy picture, the "real image" of the real-image tab."""
    path = tmp_path_factory.mktemp("upload") / "circle.png"
    pixels, _ = render(spec_from_caption(SOURCE, center=(0.45, 0.55), size=0.4), resolution=64)
    Image.fromarray(pixels).save(path)
    return path


def cli_in_fresh_folder(command_line: str, folder: Path, uploads: dict[str, Path]) -> subprocess.CompletedProcess:
    """Run a shown command line with ``python -m editing.cli`` in an empty folder holding only the uploads."""
    folder.mkdir()
    for name, path in uploads.items():
        shutil.copyfile(path, folder / name)
    argv = shlex.split(command_line)
    assert argv[0] == "editlab"
    return subprocess.run([sys.executable, "-m", "editing.cli", *argv[1:]], cwd=folder, capture_output=True,
                          text=True, timeout=300)


def assert_same_files(shown: list[str], cli_folder: Path) -> None:
    """Every PNG the tab shows has a twin at the same relative path in the CLI's folder, byte for byte."""
    assert shown
    for path in map(Path, shown):
        run_folder = next(folder for folder in path.parents if folder.name.startswith("run-"))
        relative = path.relative_to(run_folder)
        assert (cli_folder / relative).read_bytes() == path.read_bytes(), relative


def test_generate_tab_command_line_writes_the_shown_bytes(lab, tmp_path):
    shown = tab_generate.handle(lab, prompt=SOURCE, negative="a green square", sampler="euler-a", steps=4,
                                guidance=5.0, seed=3)
    assert shown["message"].startswith("done") and shown["image"]
    assert "--scheduler euler-a" in shown["command_line"] and "--negative 'a green square'" in shown["command_line"]
    done = cli_in_fresh_folder(shown["command_line"], tmp_path / "cli", {})
    assert done.returncode == 0, done.stderr
    assert_same_files([shown["image"]], tmp_path / "cli")


def test_p2p_tab_command_line_writes_the_shown_bytes_and_maps_per_step(lab, tmp_path):
    shown = tab_p2p.handle(lab, prompt=SOURCE, edit="a red square on a blue background", mode="word swap",
                           reweight="square=1.5", cross_replace=0.6, self_replace=0.3, blend="circle square",
                           steps=5, guidance=7.5, seed=1)
    assert shown["message"].startswith("done"), shown["message"]
    folder = Path(shown["folder"])
    steps = sorted(p.name for p in (folder / "p2p").glob("attention-source-step-*.png"))
    assert steps == [f"attention-source-step-{i:03d}.png" for i in range(5)]
    assert shown["step"].maximum == 5
    assert tab_p2p.maps_at(shown["folder"], 3) == tuple(str(folder / "p2p" / f"attention-{n}-step-002.png")
                                                         for n in ("source", "edited"))
    first, last = (Image.open(tab_p2p.maps_at(shown["folder"], k)[0]) for k in (1, 5))
    assert first.tobytes() != last.tobytes()  # the maps change over the steps: the slider shows something
    done = cli_in_fresh_folder(shown["command_line"], tmp_path / "cli", {})
    assert done.returncode == 0, done.stderr
    assert_same_files(shown["files"], tmp_path / "cli")  # images, mean maps and the 10 per-step maps
    assert len(shown["files"]) == 4 + 2 * 5


def test_step_maps_average_to_the_mean_maps():
    from editing.p2p.edit import P2PConfig, prompt_to_prompt
    from ldm.model import StableDiffusion
    from ldm.pipeline import SamplingConfig
    from editing.options import TOY_WEIGHTS

    model = StableDiffusion.load(TOY_WEIGHTS)
    result = prompt_to_prompt(model, SOURCE, "a red square on a blue background",
                              SamplingConfig(steps=4, height=64, width=64), P2PConfig(store_steps=True))
    per_step = result.controller.store.step_maps(result.map_level)
    assert per_step.shape[:2] == (4, 2) and per_step.shape[2:] == result.maps.shape[1:]
    # the mean is the running sum / steps: the same numbers added in another order (fp32 rounding)
    torch.testing.assert_close(per_step.mean(dim=0), result.maps, rtol=1e-5, atol=1e-7)
    assert (per_step[0] - per_step[-1]).abs().max() > 1e-3


def test_real_image_tabs_command_lines_write_the_shown_bytes(lab, tmp_path, picture):
    p2p = tab_real_image.handle_p2p(lab, image=str(picture), prompt=SOURCE, edit="a red square on a blue background",
                                    inversion="null-text", mode="swap", cross_replace=0.8, self_replace=0.5,
                                    blend="circle square", steps=3, guidance=3.0)
    ddpm = tab_real_image.handle_ddpm(lab, image=str(picture), source_prompt=SOURCE,
                                      target_prompt="a green circle on a blue background", steps=6, skip=2,
                                      source_guidance=3.5, target_guidance=7.5, samples=2, seed=0, statistics=True)
    sdedit = tab_real_image.handle_sdedit(lab, image=str(picture), prompt="a green circle on a blue background",
                                          strength=0.5, steps=6, guidance=7.5, seed=0)
    for shown in (p2p, ddpm, sdedit):
        assert shown["message"].startswith("done"), shown["message"]
    assert len(ddpm["samples"]) == 2 and "variance" in ddpm["statistics"] and "mean" in ddpm["statistics"]
    edit_line, stats_line = ddpm["command_line"].splitlines()
    lines = {"p2p": (p2p["command_line"], p2p["files"]), "ddpm": (edit_line, ddpm["samples"]),
             "sdedit": (sdedit["command_line"], sdedit["files"])}
    for name, (line, files) in lines.items():
        assert "--image input.png" in line
        done = cli_in_fresh_folder(line, tmp_path / name, {"input.png": picture})
        assert done.returncode == 0, done.stderr
        assert_same_files(files, tmp_path / name)
    done = cli_in_fresh_folder(stats_line, tmp_path / "stats", {"input.png": picture})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ddpm["statistics"]  # the statistics table, character for character


def cli_message(argv: list[str], folder: Path, capsys, monkeypatch) -> str:
    """The one line ``editlab`` prints on stderr for a refused input."""
    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_shows_the_cli_message_and_the_next_run_works(lab, tmp_path, picture, capsys, monkeypatch):
    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not an image")
    small = tmp_path / "small.png"
    Image.open(picture).resize((30, 30)).save(small)  # the toy model needs sides that are multiples of 4
    cases = [
        (tab_real_image.handle_sdedit, dict(image=str(unreadable), prompt=SOURCE, steps=2),
         tab_real_image.sdedit_arguments, {"input.png": unreadable}),
        (tab_p2p.handle, dict(prompt=SOURCE, edit="a red square on a light blue background", steps=2),
         tab_p2p.arguments, {}),
        (tab_real_image.handle_ddpm, dict(image=str(small), source_prompt=SOURCE, target_prompt=SOURCE, steps=4,
                                          skip=1, statistics=True), tab_real_image.ddpm_arguments,
         {"input.png": small}),
    ]
    for k, (handle, knobs, arguments, uploads) in enumerate(cases):
        shown = handle(lab, **knobs)
        folder = tmp_path / f"cli-{k}"
        folder.mkdir()
        for name, path in uploads.items():
            shutil.copyfile(path, folder / name)
        command, argv, _ = arguments(**{key: v for key, v in knobs.items() if key != "statistics"})
        expected = cli_message([command, "--threads", "1", *argv], folder, capsys, monkeypatch)
        assert shown["message"] == expected and ": error: " in expected
        assert not shown.get("files")
    assert "multiples of 4" in shown["message"] and "--width 28 --height 28" in shown["message"]
    after = tab_generate.handle(lab, prompt=SOURCE, steps=2)  # the lab still runs
    assert after["message"].startswith("done") and Path(after["image"]).is_file()


def test_stop_ends_a_running_command_and_the_next_run_works(lab):
    shown = {}
    worker = threading.Thread(target=lambda: shown.update(tab_generate.handle(lab, prompt=SOURCE, steps=500)))
    worker.start()
    deadline = time.monotonic() + 120
    while not runner._running and time.monotonic() < deadline:  # wait until the command runs
        time.sleep(0.05)
    time.sleep(0.5)
    assert lab.stop()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert shown["message"] == "editlab generate: stopped" and shown["image"] is None
    assert not lab.stop()  # nothing running: nothing to stop
    after = tab_generate.handle(lab, prompt=SOURCE, steps=2)
    assert after["message"].startswith("done")


def test_missing_tab_modules_are_skipped_and_broken_ones_raise(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(app, "TABS", ["tab_generate", "tab_not_written_yet"])
    with caplog.at_level("INFO", logger="editing.lab.app"):
        modules = app.tab_modules()
    assert [m.TITLE for m in modules] == ["Generate"]
    assert "no tab_not_written_yet.py yet" in caplog.text
    broken = tmp_path / "editing_lab_broken"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "tab_broken.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(app, "__package__", "editing_lab_broken")
    monkeypatch.setattr(app, "TABS", ["tab_broken"])
    with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_installed"):
        app.tab_modules()


def test_lab_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["lab", "--port", "7999"]) == 2
    assert capsys.readouterr().err.strip() == 'editlab lab: error: the lab needs Gradio: pip install -e ".[lab]"'


def test_lab_refuses_missing_weights_and_bad_ports_before_serving(tmp_path, capsys):
    assert main(["lab", "--weights", str(tmp_path / "nothing.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (f"editlab lab: error: weights {tmp_path / 'nothing.safetensors'} not "
                                               "found; give an editlab weights file, a diffusers folder or an original "
                                               "checkpoint file")
    assert main(["lab", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "editlab lab: error: --port 70000: give a port number in [1, 65535]"
