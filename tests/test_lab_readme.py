"""Every ``normlab ...`` command shown in README.md is accepted (issue 14, case 12).

Study, demo and advise commands run with ``--dry-run`` (everything is parsed and validated — study, grid,
data, model, --out — and nothing runs); ``studies`` and ``report`` run for real; ``bench``
commands are parsed by their Typer app without running the benchmarks.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from normlab import cli

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("normlab "):
                commands.append(line)
    for span in re.findall(r"`(normlab [^`]+)`", text):
        if not any(p in span for p in ("…", "...", "NAME")) and span not in commands:
            commands.append(span)
    return commands


def _workspace(root: Path) -> None:
    """The files the README's examples name: my_data.npz, mypkg.models:build/net, imgs/, runs/bs."""
    rng = np.random.default_rng(0)
    np.savez(root / "my_data.npz", x=rng.random((80, 1, 8, 8)).astype(np.float32),
             y=np.arange(80) % 4)
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "def build(norm, input_shape, num_classes, **options):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))\n\n"
        "def net(num_classes):\n"  # a model written without normlab: what `normlab advise` takes
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    from PIL import Image

    for c in ("cat", "dog"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 30 + i), 30 * i, np.uint8)).save(root / "imgs" / c / f"{i}.png")


def _parse_bench(args: list[str]) -> None:
    from normlab.bench import app as bench_app

    group = typer.main.get_command(bench_app)
    ctx = group.make_context("normlab bench", list(args), resilient_parsing=False)
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
    name, sub, rest = group.resolve_command(ctx, [*protected, *ctx.args])
    sub.make_context(name, rest, parent=ctx)  # raises click.UsageError on a bad option


def test_readme_lists_the_commands() -> None:
    cmds = readme_commands()
    assert "normlab study cost --model mypkg.models:build" in cmds
    assert any(c.startswith("normlab bench") for c in cmds) and "normlab demo" in cmds


def test_every_readme_command_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _workspace(tmp_path)
    setup = runner.invoke(cli.app, ["study", "smoke", "--quick", "--seeds", "1", "--epochs", "2",
                                    "--workers", "1", "-q", "--out", "runs/bs"])
    assert setup.exit_code == 0, setup.output
    for command in readme_commands():
        args = shlex.split(command)[1:]
        if args[0] == "bench":
            _parse_bench(args[1:])
            continue
        if args[0] in ("study", "demo", "advise") and "--dry-run" not in args:
            args.append("--dry-run")
        result = runner.invoke(cli.app, args, prog_name="normlab")
        assert result.exit_code == 0, f"{command}: {result.output}"
        if args[0] in ("study", "demo", "advise"):
            assert "dry run, nothing written" in result.output, command
