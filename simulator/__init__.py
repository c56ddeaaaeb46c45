"""The procedural micro-world simulator: clips with ground truth (``render``), datasets of them (``dataset``),
their render speed (``speed``) and the analysers that measure the physics back from pixels (``analysis``).

Imports only ``media`` and third-party libraries.
"""
