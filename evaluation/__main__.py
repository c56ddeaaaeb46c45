"""``python -m evaluation``: the ``microverse eval`` command group."""

from .cli import eval_group

if __name__ == "__main__":
    eval_group()
