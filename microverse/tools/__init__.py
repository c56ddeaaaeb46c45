"""Developer tools outside the serving core's import path: the inference and service-overhead benches and the
tiny seeded test pipelines. They may import ``training`` (the demo model's builders); the serving core never
imports them."""
