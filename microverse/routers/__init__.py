"""The HTTP surfaces, one module-level ``APIRouter`` each: ``generate``, ``videos`` (OpenAI), ``judge``, ``health``,
``ui``; ``microverse.api.create_app`` includes them."""
