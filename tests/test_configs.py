"""Every shipped training config (and each attack config on its injection config) parses in LightningCLI."""

from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
SINGLE = sorted(p for p in (ROOT / "configs/experiment").glob("*.yaml") if "injection" not in p.name)
PAIRS = [(ROOT / f"configs/experiment/{scale}_injection.yaml", p)
         for scale in ("embedded", "vitb32") for p in sorted((ROOT / "configs/attack").glob(f"{scale}_*.yaml"))]


@pytest.mark.parametrize("configs", [[p] for p in SINGLE] + [list(pair) for pair in PAIRS],
                         ids=lambda c: "+".join(p.stem for p in c))
def test_config_parses(configs, capsys):
    args = ["fit"] + [x for p in configs for x in ("--config", str(p))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules." in printed
