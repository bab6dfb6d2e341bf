"""Reliability of the CLI: every user-caused failure is one line, found before the work, and
outputs are one complete run or nothing.

Through ``cka_geo.cli.main`` with tiny checkpoints and runs. Classes covered:

- no internal error for a user-caused condition (``--out`` a file / below a file / not
  writable, a full disk, bad seeds and devices, bad resume files, a second writer);
- ``--out`` replaced as a whole, never a mix of two runs (faults injected mid-swap, a
  SIGKILL during a swap), foreign folders refused, leftovers of killed runs cleaned up;
- resume refused when an option that shapes the run differs;
- one flag name across subcommands (``--trust-checkpoint``), hints naming only options the
  command has, and one line even for paths holding a newline.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cka_geo import atomic
from cka_geo.checkpoints import save_checkpoint
from cka_geo.cli import build_parser, main
from cka_geo.vit import VisionTransformer, ViTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=16, depth=1, num_heads=2)
CMP = ["--samples", "16", "--batch-size", "8", "--bootstrap", "0", "-q", "--device", "cpu", "--no-figures"]
ARCH = ["--depth", "1", "--embed-dim", "16", "--heads", "2", "--img-size", "16"]
LOOP = ["--threads", "1", "--batch-size", "64", "--stride", "64", "--epochs", "2"]


# ------------------------------------------------------------------ helpers


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main's exit code, stdout and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse, should it exit instead of returning
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[attr-defined]
    return {s for a in parser._actions for s in a.option_strings}


def one_error(code: int, err: str, want: int, *fragments: str, command: str | None = None) -> str:
    """Exactly one stderr line ``cka-geo: error: ...`` with the exit code and fragments asked for.

    With ``command``: every ``--option`` the line mentions exists in that command's parser.
    """
    # the error is one line; compare's plan and progress lines may precede it
    lines = [line for line in err.splitlines() if not line.startswith("cka-geo compare: ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("cka-geo: error: ") and "internal error" not in line, line
    assert code == want, (code, line)
    for f in fragments:
        assert f in line, (f, line)
    if command is not None:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", line))
        assert named <= _options(command), (named - _options(command), line)
    return line


def listing(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes (to show a folder untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.fixture(scope="module")
def ck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pre.pt, ft.pt (tiny ViTs), evil.pt (a pickle that would run code) and results.json."""
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    save_checkpoint(d / "pre.pt", VisionTransformer(CFG), CFG)
    torch.manual_seed(1)
    save_checkpoint(d / "ft.pt", VisionTransformer(CFG), CFG)
    torch.save({"state_dict": {"x": _Evil(str(d / "pwned"))}}, d / "evil.pt")  # torch's own zip format
    (d / "results.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def pre_run(tmp_path_factory: pytest.TempPathFactory, ck: Path) -> Path:
    """A pretrain run stopped after epoch 1 of 2: resumable."""
    out = tmp_path_factory.mktemp("runs") / "mae"
    assert main(["pretrain", "--out", str(out), *ARCH, *LOOP, "--stop-after-epoch", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory: pytest.TempPathFactory, ck: Path) -> Path:
    """A finetune run of pre.pt stopped after epoch 1 of 2: resumable."""
    out = tmp_path_factory.mktemp("runs") / "seg"
    assert main(["finetune", str(ck / "pre.pt"), "--out", str(out), *LOOP, "--stop-after-epoch", "1"]) == 0
    return out


def _argv(command: str, ck: Path, out: str) -> list[str]:
    """A valid command line of ``command`` writing ``out``."""
    return {
        "compare": ["compare", ck / "pre.pt", ck / "ft.pt", *CMP, "--format", "json", "--out", out],
        "probe": ["probe", ck / "pre.pt", "--device", "cpu", "--no-figure", "--cv-folds", "2", "--out", out],
        "pretrain": ["pretrain", *ARCH, *LOOP, "--out", out],
        "finetune": ["finetune", ck / "pre.pt", *LOOP, "--out", out],
        "demo": ["demo", "--quick", "--threads", "1", "--out", out],
        "plot": ["plot", ck / "results.json", "--out", out],
    }[command]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the work of every command fail loudly: refusals must come before it."""
    import cka_geo.commands.demo
    import cka_geo.commands.probe
    import cka_geo.compare
    import cka_geo.plotting
    import cka_geo.train.runs

    def started(*a: object, **k: object) -> None:
        raise AssertionError("the work started before the refusal")

    monkeypatch.setattr(cka_geo.compare, "compare_checkpoints", started)
    monkeypatch.setattr(cka_geo.commands.probe, "_probe", started)
    monkeypatch.setattr(cka_geo.train.runs, "pretrain", started)
    monkeypatch.setattr(cka_geo.train.runs, "load_encoder", started)
    monkeypatch.setattr(cka_geo.commands.demo, "_run", started)
    monkeypatch.setattr(cka_geo.plotting, "load_results", started)


WRITERS = ("compare", "probe", "pretrain", "finetune", "demo", "plot")
REPLACERS = ("compare", "probe", "pretrain", "finetune", "demo")


# ------------------------------------------------- 4. no internal error, found up front


@pytest.mark.parametrize("command", WRITERS)
def test_out_a_file_or_below_a_file_is_refused_before_any_work(command, ck, tmp_path, capsys, no_work):
    (tmp_path / "taken").write_text("mine")
    for out, fragment in ((tmp_path / "taken", "exists and is not a folder"),
                          (tmp_path / "taken" / "sub", "is a file, not a folder")):
        code, _, err = run(_argv(command, ck, str(out)), capsys)
        one_error(code, err, 2, f"--out {out}", fragment, command=command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("command", WRITERS)
def test_an_unwritable_out_location_is_refused_before_any_work(command, ck, tmp_path, capsys, no_work, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access

    def access(path: object, mode: int, *a: object, **k: object) -> bool:  # as a read-only mount says
        if mode & os.W_OK and Path(os.fspath(path)).resolve() == ro.resolve():  # type: ignore[arg-type]
            return False
        return real(path, mode, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    code, _, err = run(_argv(command, ck, str(ro / "new" / "out")), capsys)
    one_error(code, err, 1, f"--out {ro / 'new' / 'out'}", f"cannot write in {ro}", command=command)
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_folder_for_real(ck, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(_argv("compare", ck, str(ro / "out")), capsys)
        one_error(code, err, 1, "cannot write in", command="compare")
    finally:
        ro.chmod(0o700)


def _enospc(*a: object, **k: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(ck, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    out = tmp_path / "out"
    code, _, err = run(_argv("compare", ck, str(out)), capsys)
    one_error(code, err, 1, f"cannot write {out / 'results.json'}", "No space left on device", command="compare")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary


def test_a_full_disk_during_training_leaves_no_half_run(ck, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", _enospc)
    out = tmp_path / "seg"
    code, _, err = run(_argv("finetune", ck, str(out)), capsys)
    one_error(code, err, 1, "cannot write", str(out), "No space left on device", command="finetune")
    assert list(tmp_path.iterdir()) == []  # pre.pt too is gone: nothing to resume, nothing left


def test_torch_zip_writer_failures_are_output_errors(tmp_path):
    from cka_geo.errors import OutputError

    with pytest.raises(OutputError, match=r"cannot write .*x\.pt: \[enforce fail at inline_container"), \
            atomic.atomic_path(tmp_path / "x.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["compare", "PRE", "FT", "--seed", "-1"], "--seed"),
        (["compare", "PRE", "FT", "--seed", str(2**32)], "--seed"),
        (["pretrain", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["finetune", "PRE", "--out", "OUT", "--fraction-seed", "-1"], "--fraction-seed"),
        (["finetune", "PRE", "--out", "OUT", "--seed", str(2**40)], "--seed"),
        (["demo", "--quick", "--out", "OUT", "--seed", str(2**32)], "--seed"),
        (["pretrain", "--out", "OUT", "--weight-decay", "-1"], "--weight-decay"),
    ],
)
def test_seeds_numpy_cannot_take_are_usage_errors(argv, flag, ck, tmp_path, capsys):
    argv = [{"PRE": ck / "pre.pt", "FT": ck / "ft.pt", "OUT": tmp_path / "o"}.get(a, a) for a in argv]
    code, _, err = run(argv, capsys)
    one_error(code, err, 2, f"argument {flag}", command=argv[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:99", "gpu", ""])
@pytest.mark.parametrize("command", ["compare", "probe", "pretrain", "finetune"])
def test_unusable_devices_are_refused_in_one_line_naming_device(command, device, ck, tmp_path, capsys, no_work):
    code, _, err = run([*_argv(command, ck, str(tmp_path / "o")), "--device", device], capsys)
    one_error(code, err, 2, f"--device {device!r}", command=command)
    assert list(tmp_path.iterdir()) == []


def test_resume_files_that_are_not_ours_or_incomplete(pre_run, ck, tmp_path, capsys):
    from cka_geo.train.loop import CHECKPOINT_FORMAT

    before = listing(pre_run)
    junk, partial, alien = tmp_path / "junk.pt", tmp_path / "partial.pt", tmp_path / "alien.pt"
    junk.write_text("not a checkpoint")
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "config": {"train": {}}}, partial)
    good = torch.load(pre_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**good, "model": {"bogus": torch.zeros(1)}}, alien)
    for path, fragment in ((junk, "cannot read training checkpoint"),
                           (ck / "pre.pt", "not a cka-geo training checkpoint"),
                           (partial, "incomplete training checkpoint ('optimizer'"),
                           (alien, "does not fit this run's model")):
        code, _, err = run(["pretrain", "--out", pre_run, *ARCH, *LOOP, "--resume", path], capsys)
        one_error(code, err, 1, str(path), fragment, command="pretrain")
    assert listing(pre_run) == before


def test_a_second_writer_gets_one_line_while_the_first_holds_out(ck, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {SRC!r})
            from cka_geo.commands._output import claim
            with claim({str(out)!r}, "compare"):
                print("holding", flush=True)
                time.sleep(60)
            """)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        code, _, err = run(_argv("compare", ck, str(out)), capsys)
        one_error(code, err, 1, f"--out {out}", f"another cka-geo run (pid {holder.pid})", command="compare")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(_argv("compare", ck, str(out)), capsys)  # the lock dies with its holder
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_racing_writers_of_one_new_folder_both_finish_with_one_complete_run(tmp_path):
    dest = tmp_path / "new"
    a, b = atomic.atomic_dir(dest), atomic.atomic_dir(dest)
    ta, tb = a.__enter__(), b.__enter__()
    (ta / "run").write_text("a")
    (tb / "run").write_text("b")
    (tb / "only-b").write_text("b")
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert listing(dest) == {"only-b": b"b", "run": b"b"}
    assert hidden(tmp_path) == []


def test_racing_processes_end_with_one_complete_run_or_a_clean_refusal(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from cka_geo.commands._output import claim
        from cka_geo.errors import CkaGeoError
        tag = sys.argv[1]
        try:
            with claim({str(out)!r}, "compare") as o, o.replace() as tmp:
                (tmp / "results.json").write_text(tag)
                time.sleep(0.3)
                (tmp / "results.csv").write_text(tag)
        except CkaGeoError as exc:
            print(exc)
            sys.exit(exc.exit_code)
        """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag], stdout=subprocess.PIPE, text=True)
             for tag in "ab"]
    results = [(p.wait(), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    assert all(code == 0 or (code == 1 and "another cka-geo run" in text) for code, text in results), results
    files = listing(out)
    assert sorted(files) == ["results.csv", "results.json"] and len(set(files.values())) == 1
    assert hidden(tmp_path) == []


# ------------------------------------------------ 5. one run or nothing


def test_a_rerun_replaces_the_whole_folder_no_stale_figures(ck, tmp_path, capsys, monkeypatch):
    import cka_geo.plotting

    def fake_figures(results: object, folder: Path, **k: object) -> list[Path]:
        (Path(folder) / "heatmap.png").write_bytes(b"png")
        return [Path(folder) / "heatmap.png"]

    monkeypatch.setattr(cka_geo.plotting, "plot_all", fake_figures)
    out = tmp_path / "out"
    argv = ["compare", ck / "pre.pt", ck / "ft.pt", *CMP[:-1], "--out", out]
    assert run([*argv, "--format", "json", "csv"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "results.csv", "results.json"]
    code, _, err = run([*argv, "--no-figures", "--format", "json", "--seed", "3"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert '"seed": 3' in (out / "results.json").read_text()
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("command", REPLACERS)
def test_a_folder_that_is_not_an_earlier_run_is_refused_and_kept(command, ck, tmp_path, capsys, no_work):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(_argv(command, ck, str(out)), capsys)
    one_error(code, err, 2, f"--out {out}", "'notes.txt'", "choose another --out", command=command)
    assert listing(out) == {"notes.txt": b"keep me"}


def test_compare_does_not_replace_a_training_run_nor_a_folder_holding_its_inputs(
        ft_run, ck, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = listing(ft_run)
    code, _, err = run(_argv("compare", ck, str(ft_run)), capsys)
    one_error(code, err, 2, "'checkpoints', which cka-geo compare does not write", command="compare")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("pre.pt", "ft.pt"):
        shutil.copy(ck / name, inputs / name)
    code, _, err = run(["compare", inputs / "pre.pt", inputs / "ft.pt", *CMP, "--out", inputs], capsys)
    one_error(code, err, 2, f"holds the input {inputs / 'pre.pt'}", command="compare")
    code, _, err = run(["compare", ck / "pre.pt", ck / "ft.pt", *CMP, "--format", "json", "--out", "."], capsys)
    one_error(code, err, 2, "--out .: is the current folder", command="compare")
    assert listing(ft_run) == before and sorted(listing(inputs)) == ["ft.pt", "pre.pt"]


def test_an_empty_folder_is_used(ck, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(_argv("compare", ck, str(out)), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_failure_mid_swap_leaves_the_earlier_run_complete(exchange, ck, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["compare", ck / "pre.pt", ck / "ft.pt", *CMP, "--out", out]
    assert run([*argv, "--format", "json", "csv"], capsys)[0] == 0
    before = listing(out)
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(os.fspath(src)).name.endswith(".tmp") and Path(os.fspath(dst)) == out.resolve():
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # the new folder cannot move in
        real_replace(src, dst)  # type: ignore[arg-type]

    if exchange:
        def exchange_fails(a: Path, b: Path) -> bool:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(atomic, "_exchange", exchange_fails)
    else:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "replace", replace)
    code, _, err = run([*argv, "--format", "json", "--seed", "5"], capsys)
    one_error(code, err, 1, f"cannot write {out}", command="compare")
    assert listing(out) == before
    assert hidden(tmp_path) == []


def test_a_failure_while_writing_the_new_run_leaves_the_earlier_run(ck, tmp_path, capsys, monkeypatch):
    import cka_geo.report

    out = tmp_path / "out"
    argv = ["compare", ck / "pre.pt", ck / "ft.pt", *CMP, "--out", out]
    assert run([*argv, "--format", "json", "csv"], capsys)[0] == 0
    before = listing(out)
    real = cka_geo.report.to_csv
    monkeypatch.setattr(cka_geo.report, "to_csv", lambda r: _enospc() or real(r))
    code, _, err = run([*argv, "--format", "json", "csv", "--seed", "5"], capsys)
    one_error(code, err, 1, "No space left on device", command="compare")
    assert listing(out) == before and hidden(tmp_path) == []


_KILLED_SWAP = """
import os, sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from cka_geo import atomic
atomic._exchange = lambda a, b: False  # the two-rename swap, to be killed between the renames
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(src) == {dest!r}:
        print("moved aside", flush=True)
        time.sleep(60)
os.replace = replace
with atomic.atomic_dir({dest!r}) as tmp:
    (tmp / "results.json").write_text("new")
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_swap_killed_between_its_renames_is_undone_by_the_next_run(ck, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", ck / "pre.pt", ck / "ft.pt", *CMP, "--out", out]
    assert run([*argv, "--format", "json", "csv"], capsys)[0] == 0
    before = listing(out)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SWAP.format(src=SRC, dest=str(out.resolve()))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "moved aside\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(hidden(tmp_path)) == 2  # the old run aside, the new one unfinished
    atomic.clean_stale(out)  # what the next write to out does first
    assert listing(out) == before and hidden(tmp_path) == []
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SWAP.format(src=SRC, dest=str(out.resolve()))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "moved aside\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, _, err = run([*argv, "--format", "json"], capsys)  # a rerun: cleans up, then replaces
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and hidden(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(ck, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = [tmp_path / f".out.cka-geo-{dead.pid}-abc.tmp", tmp_path / f".out.cka-geo-{dead.pid}-def.old",
             out / f".results.json.cka-geo-{dead.pid}-xyz.tmp"]
    for p in stale:
        p.write_text("left by a killed run")
    live = tmp_path / f".out.cka-geo-{os.getppid()}-ghi.tmp"
    live.mkdir()
    assert run(_argv("compare", ck, str(out)), capsys)[0] == 0
    assert not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_finetune_refusing_an_argument_writes_nothing(ck, tmp_path, capsys):
    out = tmp_path / "seg"
    code, _, err = run([*_argv("finetune", ck, str(out)), "--taps", "9"], capsys)
    one_error(code, err, 2, "tap 9", command="finetune")
    assert list(tmp_path.iterdir()) == []  # before: a pre.pt was left in --out


def test_a_training_rerun_that_fails_leaves_the_earlier_run(ck, tmp_path, capsys, monkeypatch):
    out = tmp_path / "seg"
    argv = _argv("finetune", ck, str(out))
    assert run(argv, capsys)[0] == 0
    before = listing(out)
    import cka_geo.train.runs

    monkeypatch.setattr(cka_geo.train.runs, "evaluate", lambda *a, **k: _enospc())
    code, _, err = run([*argv, "--lr", "0.002"], capsys)
    one_error(code, err, 1, "No space left on device", command="finetune")
    assert listing(out) == before and hidden(tmp_path) == []


def test_probe_out_is_replaced_whole(ck, tmp_path, capsys):
    out = tmp_path / "probe"
    out.mkdir()
    (out / "probe_depth.png").write_bytes(b"old figure")
    assert run(_argv("probe", ck, str(out)), capsys)[0] == 0  # --no-figure
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.json"] and hidden(tmp_path) == []


# ------------------------------------------------ 6. resume refuses changed options


@pytest.mark.parametrize(
    ("option", "flag"),
    [
        (["--mask-ratio", "0.5"], "--mask-ratio"),
        (["--weight-decay", "0.1"], "--weight-decay"),
        (["--warmup-steps", "3"], "--warmup-steps"),
        (["--lr", "0.01"], "--lr"),
        (["--batch-size", "32"], "--batch-size"),
        (["--depth", "2"], "--depth"),
        (["--seed", "1"], "--seed"),
        (["--stride", "32"], "--stride"),
        (["--objective", "simclr"], "--objective"),
        (["--decoder-dim", "32"], "--decoder-dim"),
    ],
)
def test_resume_refuses_an_option_that_shapes_the_run(option, flag, pre_run, capsys):
    before = listing(pre_run)
    code, _, err = run(["pretrain", "--out", pre_run, *ARCH, *LOOP, *option, "--resume"], capsys)
    one_error(code, err, 2, "--resume", f"the run was started with {flag} ", command="pretrain")
    assert listing(pre_run) == before


def test_resume_may_change_epochs_device_threads_and_progress(pre_run, tmp_path, capsys):
    run_dir = tmp_path / "mae"
    shutil.copytree(pre_run, run_dir)
    loop = [a if a != "2" else "3" for a in LOOP]  # --epochs 3
    code, out, err = run(["pretrain", "--out", run_dir, *ARCH, *loop, "--resume", "--device", "cpu",
                          "--threads", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "3 epochs" in out and (run_dir / "pretrained.pt").is_file()


def test_finetune_resume_refuses_another_task_encoder_or_run_kind(ft_run, pre_run, ck, capsys):
    before = listing(ft_run)
    base = ["finetune", ck / "pre.pt", "--out", ft_run, *LOOP]
    code, _, err = run([*base, "--task", "classification", "--resume"], capsys)
    one_error(code, err, 2, "the run was started with --task segmentation", command="finetune")
    code, _, err = run([*base, "--label-fraction", "0.5", "--resume"], capsys)
    one_error(code, err, 2, "--label-fraction", command="finetune")
    code, _, err = run(["finetune", ck / "ft.pt", "--out", ft_run, *LOOP, "--resume"], capsys)
    one_error(code, err, 2, "another encoder than CHECKPOINT", command="finetune")
    code, _, err = run([*base, "--resume", pre_run / "checkpoints" / "last.pt"], capsys)
    one_error(code, err, 2, "a cka-geo pretrain run, not finetune", command="finetune")
    assert listing(ft_run) == before


# ------------------------------------------------ 7. one flag name, honest hints, one line


CHECKPOINT_READERS = {"compare", "finetune", "evaluate", "probe"}


def test_trust_checkpoint_is_the_one_spelling_where_checkpoints_are_read():
    for command in ("compare", "plot", "pretrain", "finetune", "evaluate", "demo", "probe"):
        opts = _options(command)
        assert ("--trust-checkpoint" in opts) == (command in CHECKPOINT_READERS), command
    args = build_parser().parse_args(["finetune", "p.pt", "--out", "o", "--trust"])  # deprecated, hidden
    assert args.trust_checkpoint is True
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "--trust " not in sub.choices["finetune"].format_help()  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", sorted(CHECKPOINT_READERS))
def test_the_refused_pickle_hint_names_a_flag_the_command_has(command, ck, tmp_path, capsys):
    evil = ck / "evil.pt"
    argv = {
        "compare": ["compare", ck / "pre.pt", evil, *CMP, "--out", tmp_path / "o"],
        "finetune": ["finetune", evil, *LOOP, "--out", tmp_path / "o"],
        "evaluate": ["evaluate", evil],
        "probe": ["probe", evil, "--device", "cpu", "--out", tmp_path / "o"],
    }[command]
    code, _, err = run(argv, capsys)
    one_error(code, err, 1, "evil.pt", "--trust-checkpoint", command=command)
    assert not (ck / "pwned").exists() and list(tmp_path.iterdir()) == []


def test_a_path_with_a_newline_still_gives_one_line(ck, tmp_path, capsys):
    missing = tmp_path / "two\nlines.pt"
    code, _, err = run(["compare", missing, ck / "ft.pt", *CMP], capsys)
    one_error(code, err, 2, "two\\nlines.pt: no such file", command="compare")
    (tmp_path / "a\nfile").write_text("x")
    code, _, err = run(_argv("compare", ck, str(tmp_path / "a\nfile" / "out")), capsys)
    one_error(code, err, 2, "a\\nfile is a file", command="compare")


def test_the_out_of_memory_hint_names_batch_size_only_where_it_exists(monkeypatch, capsys):
    import cka_geo.commands.demo
    import cka_geo.commands.pretrain

    def oom(args: object) -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cka_geo.commands.demo, "run", oom)
    monkeypatch.setattr(cka_geo.commands.pretrain, "run", oom)
    code, _, err = run(["demo"], capsys)
    one_error(code, err, 1, "out of GPU memory", command="demo")
    code, _, err = run(["pretrain", "--out", "x"], capsys)
    one_error(code, err, 1, "--batch-size", command="pretrain")


def test_save_checkpoint_on_a_full_disk_is_an_oserror_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """torch.save writes through a Python file: the disk's errno, not the zip writer's text."""
    import builtins

    from cka_geo.checkpoints import save as save_mod
    from cka_geo.errors import OutputError
    from cka_geo.vit import VisionTransformer, ViTConfig

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(save_mod, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    dest = tmp_path / "x.pt"
    with pytest.raises(OutputError, match=rf"cannot write {dest}: No space left on device$"):
        save_mod.save_checkpoint(dest, VisionTransformer(cfg), cfg)
    assert list(tmp_path.iterdir()) == []
