"""The README documents every setting."""

from microverse.config import Settings
from tests.conftest import REPO_ROOT


def test_readme_documents_every_setting():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [f"MICROVERSE_{n.upper()}" for n in Settings.model_fields if f"MICROVERSE_{n.upper()}" not in readme]
    assert not missing, f"README lacks {missing}: regenerate the table with python scripts/settings_table.py"
