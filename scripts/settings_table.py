"""Print the README's configuration table from ``microverse.config.Settings``."""

from microverse.config import Settings

DEFAULTS = {"lora": "(none)", "storage_dir": "`$MICROVERSE_CACHE_DIR/storage`",
            "embedded_dir": "`$MICROVERSE_CACHE_DIR/models`"}

print("| Variable | Default | What it does |")
print("|---|---|---|")
for name, field in Settings.model_fields.items():
    default = DEFAULTS.get(name, "(none)" if field.default is None else f"`{field.default}`")
    print(f"| `MICROVERSE_{name.upper()}` | {default} | {' '.join((field.description or '').split())} |")
