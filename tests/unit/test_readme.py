"""The README's settings table says what the Settings class does; its CLI section
names the variables the client commands read."""

from __future__ import annotations

import re
from typing import Any

from pydantic import SecretStr

from taskservice.core.settings import CLIENT_VARIABLES, ENV_PREFIX, Settings
from tests.conftest import ROOT


def settings_rows() -> list[tuple[list[str], str]]:
    """(variables, default cell) of each row of README's "### Settings" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Settings\n", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append((re.findall(r"`([A-Z0-9_]+)`", cells[0]), cells[1]))
    return rows


def documented_default(default: Any) -> str | None:
    """How the table writes a default; None for none (the table says it in words)."""
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None or default == "":
        return None
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def test_the_settings_table_lists_every_setting_with_its_variable_and_default() -> None:
    rows = settings_rows()
    documented = [variable for variables, _ in rows for variable in variables]
    expected = {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}
    assert sorted(documented) == sorted(expected), "README's table and Settings differ"
    for variables, cell in rows:
        for variable in variables:
            shown = documented_default(Settings.model_fields[expected[variable]].default)
            if shown is None:
                assert not cell.startswith("`"), f"{variable} has no default, README says {cell}"
            else:
                # A note may follow in parentheses, e.g. "`json` (`dev`: `console`)".
                assert cell == shown or cell.startswith(shown + " ("), (
                    f"{variable}: README says {cell}, the default is {shown}"
                )


def test_the_cli_section_names_every_variable_the_client_commands_read() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## From the command line and from Python\n", 1)[1].split("\n## ", 1)[0]
    for variable in sorted(CLIENT_VARIABLES):
        assert f"`{variable}`" in section, f"README's CLI section does not name {variable}"
