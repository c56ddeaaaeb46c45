"""Load tests of the MicroVerse service: Locust scenarios and a headless runner (``python -m load_tests.run``)."""
