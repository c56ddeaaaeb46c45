"""Print the README's configuration table from ``microverse.config.Settings``."""

from microverse.config import Settings

DEFAULTS = {"lora": "(none)", "storage_dir": "`$MICROVERSE_CACHE_DIR/storage`"}

print("| Variable | Default | What it does |")
print("|---|---|---|")
for name, field in Settings.model_fields.items():
    value = field.get_default(call_default_factory=True)
    default = DEFAULTS.get(name, "(none)" if value is None or value == [] else f"`{value}`")
    print(f"| `MICROVERSE_{name.upper()}` | {default} | {' '.join((field.description or '').split())} |")
